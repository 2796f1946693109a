"""The README's plugin guide, run as written: pip-install examples/my_plugin (a real install into a
temporary target) and run the README's command; a plugin that fails to import is reported and skipped."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _readme_command(prefix: str) -> list[str]:
    """The first line of the README's code blocks that starts with ``prefix``, split like a shell would."""
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.strip().startswith(prefix):
            return shlex.split(line.strip())
    raise AssertionError(f"README has no command starting with {prefix!r}")


def _env(site: Path, tmp_path: Path) -> dict[str, str]:
    from robbench.paths import cache_dir

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["ROBBENCH_CACHE"] = str(tmp_path / "cache")
    built = cache_dir() / "ext"  # reuse the compiled kernel of this environment (models stay private)
    if built.is_dir() and not (tmp_path / "cache").exists():
        (tmp_path / "cache").mkdir()
        (tmp_path / "cache" / "ext").symlink_to(built, target_is_directory=True)
    env["COLUMNS"] = "250"
    return env


def _robbench(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    assert args[0] == "robbench"
    return subprocess.run([sys.executable, "-m", "robbench.cli", *args[1:]], env=env, cwd=cwd,
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pip-install examples/my_plugin (a copy, so the build leaves nothing in the repository) into a target."""
    work = tmp_path_factory.mktemp("my_plugin")
    src = shutil.copytree(ROOT / "examples" / "my_plugin", work / "src")
    site = work / "site"
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(site), str(src)]
    if importlib.util.find_spec("setuptools") is not None:
        cmd.insert(5, "--no-build-isolation")  # build offline with the setuptools already installed
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert list(site.glob("robbench_my_plugin-0.1.0.dist-info"))
    return site


def test_installed_plugin_is_listed_with_its_distribution_and_parameters(installed_plugin, tmp_path):
    done = _robbench(["robbench", "plugins"], _env(installed_plugin, tmp_path), tmp_path)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if " my_vae " in line or " shift " in line]
    assert len(rows) == 2 and all("robbench-my-plugin 0.1.0" in row for row in rows)
    assert any("gamma=[1.0, 2.0]" in row for row in rows) and any("sign=1.0" in row for row in rows)


def test_readme_command_runs_the_installed_plugin(installed_plugin, tmp_path):
    cmd = _readme_command("robbench run --models my_vae")
    done = _robbench(cmd + ["--no-progress"], _env(installed_plugin, tmp_path), tmp_path)
    assert done.returncode == 0, done.stderr + done.stdout
    (board,) = list((tmp_path / "runs").glob("*/leaderboard.json"))
    rows = json.loads(board.read_text())["rows"]
    pairs = {(row["model"], row["attack"]) for row in rows}
    assert pairs == {(f"my_vae(gamma={g})", a) for g in (1.0, 2.0) for a in ("shift", "max_damage")}
    assert all(row["failed"] == 0 and row["margin_mean"] is not None for row in rows)
    # a uniform shift is a weak attack: its margins are never below the maximum-damage attack's
    by = {(row["model"], row["attack"]): row["margin_mean"] for row in rows}
    assert all(by[(m, "shift")] >= by[(m, "max_damage")] - 0.1 for m, _ in pairs)


def test_a_plugin_that_fails_to_import_is_reported_and_skipped(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "broken_plugin.py").write_text("import a_module_that_does_not_exist\n")
    info = site / "robbench_broken-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: robbench-broken\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[robbench]\nbroken = broken_plugin\n")
    env = _env(site, tmp_path)
    listed = _robbench(["robbench", "plugins"], env, tmp_path)
    assert listed.returncode == 1, listed.stderr  # listed, and a failing status (test_plugin_author.py)
    text = re.sub(r"\s+", " ", listed.stdout)
    assert "plugin broken (broken_plugin, from robbench-broken 0.1) failed to load and was skipped" in text
    assert "No module named 'a_module_that_does_not_exist'" in text
    assert "beta_vae" in text  # everything else still loads
    run = _robbench(["robbench", "run", "--dataset", "digits", "--models", "linear_gaussian", "--estimators",
                     "encoder_stats", "--points", "2", "--out", str(tmp_path / "run"), "--no-progress"], env, tmp_path)
    assert run.returncode == 0, run.stderr
    assert "plugin broken failed to load" in re.sub(r"\s+", " ", run.stdout)
