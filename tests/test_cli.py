"""Command-line errors: rejected before any work, exit status 2, a message saying what is allowed."""
from __future__ import annotations

import subprocess
import sys

import pytest

from robbench.cli import main


def test_unknown_model_exits_2_and_lists_models(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--models", "nosuch", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'nosuch'" in err and "beta_vae" in err and "vae" in err
    assert not out.exists()


@pytest.mark.parametrize("args, expected", [
    (["--attacks", "nosuch"], "unknown attack 'nosuch'; available:"),
    (["--estimators", "margin,nosuch"], "unknown estimator 'nosuch'; available:"),
    (["--dataset", "nosuch"], "unknown dataset 'nosuch'; available:"),
    (["--m", "2"], "bad value for 'm': 2.0; allowed: a number in (0, 1)"),
    (["--backend", "fpga"], "bad value for 'backend': 'fpga'"),
    (["--param", "beta_vae.beta=[]"], "beta_vae.beta: an empty list"),
    (["--model-seeds", "a,b"], "bad value for 'model_seeds'"),
    (["--executor", "dask"], "bad value for 'executor': 'dask'; allowed: local, ray"),
    (["--ray-address", "auto"], "'ray_address' is set ('auto') but 'executor' is 'local'"),
])
def test_bad_input_exits_2_with_message(tmp_path, capsys, args, expected):
    out = tmp_path / "run"
    assert main(["run", *args, "--out", str(out)]) == 2
    assert expected in capsys.readouterr().err
    assert not out.exists()


def test_bad_yaml_config_names_key(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("points: 5\nmodel_params:\n  beta_vae:\n    beta: [1, 2]\n    widht: 3\n")
    assert main(["run", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    assert "unknown parameter 'widht' for beta_vae" in capsys.readouterr().err


def test_missing_config_file(tmp_path, capsys):
    assert main(["run", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_leaderboard_of_a_non_run_directory(tmp_path, capsys):
    assert main(["leaderboard", str(tmp_path)]) == 2
    assert "is it a robbench run directory" in capsys.readouterr().err


def _console_script() -> str:
    """The ``robbench`` script of the environment running the tests: next to ``sys.executable`` (a venv's
    python run without activating the venv has no robbench on PATH), else on PATH."""
    import shutil
    from pathlib import Path

    here = Path(sys.executable).parent
    for name in ("robbench", "robbench.exe"):
        if (here / name).is_file():
            return str(here / name)
    found = shutil.which("robbench")
    assert found, f"no robbench console script next to {sys.executable} nor on PATH"
    return found


@pytest.mark.parametrize("command", [[_console_script()], [sys.executable, "-m", "robbench"]],
                         ids=["console-script", "python-m"])
def test_console_script_and_python_m_work(command):
    done = subprocess.run([*command, "--help"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for name in ("run", "train", "plugins", "leaderboard", "bench", "report", "reproduce"):
        assert name in done.stdout
    bad = subprocess.run([*command, "run", "--models", "nosuch", "--dry-run"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown model 'nosuch'" in bad.stderr


def test_train_command_trains_and_caches_without_evaluating(tmp_path, monkeypatch, capsys):
    import json
    import sqlite3

    monkeypatch.setenv("ROBBENCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    args = ["train", "--dataset", "digits", "--models", "vae", "--epochs", "1", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    assert "trained in" in capsys.readouterr().out
    assert list((tmp_path / "cache" / "models").glob("vae-*.pt"))
    with sqlite3.connect(out / "results.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 0
        (info,) = db.execute("SELECT info FROM models").fetchone()
    assert json.loads(info)["test_elbo"] < 0
    assert main(args) == 0  # the second time the checkpoint comes from the cache
    assert "loaded from cache" in capsys.readouterr().out


def test_ray_executor_without_ray_exits_2_with_the_install_hint(tmp_path, monkeypatch, capsys):
    """As if Ray were not installed: rejected before any work, with the extra to install."""
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ModuleNotFoundError
    monkeypatch.delitem(sys.modules, "robbench.executors.ray", raising=False)
    out = tmp_path / "run"
    assert main(["run", "--executor", "ray", "--points", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "bad value for 'executor': 'ray'" in err and 'pip install "robbench[ray]"' in err
    assert not out.exists()
