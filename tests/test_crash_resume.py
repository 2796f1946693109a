"""Crash and resume: a run SIGKILLed at chosen moments, then resumed, ends exactly like a clean run.

Each invocation is a real `python -m robbench run` process that kills itself at a named point
(``ROBBENCH_CRASH_AT``, see robbench/faults.py): while a checkpoint is being saved, while the compiled
extension is being built (holding its build lock, with torch's own lock file left as a killed compile
leaves it), after some result rows are committed, and between writing and renaming the leaderboard files.
The next invocation must not hang, must clean up what the killed one left, and the final rows must be
complete and identical to those of an uninterrupted run. Tiny model and few points: seconds per process.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from robbench import kernels
from robbench.cli import main

CONFIG = {
    "dataset": "digits", "models": ["vae"], "attacks": ["noise"], "estimators": ["encoder_stats", "margin"],
    "points": 3, "point_batch": 1, "train": {"epochs": 1},
    "model_params": {"vae": {"latent_dim": 2, "hidden": 16}},
    "estimator_params": {"margin": {"samples_initial": 64, "samples_max": 256, "tolerance": 0.5,
                                    "max_radius": 4.0, "keep_adversarial": False}},
}
TIMEOUT = 180  # seconds per process: far above what one needs, so only a hang reaches it


@pytest.fixture(scope="module")
def built_extension() -> Path | None:
    """The compiled extension's build folder (built once if needed), or None without a compiler."""
    if not kernels.load():
        return None
    return kernels.ext_dir() / "robbench_ops"


def _cache(root: Path, built: Path | None) -> Path:
    """A private cache holding a copy of the built extension (so no test pays for a build)."""
    cache = root / "cache"
    (cache / "ext").mkdir(parents=True)
    if built is not None:
        shutil.copytree(built, cache / "ext" / built.name, ignore=shutil.ignore_patterns("lock"))
    return cache


def _run(config: Path, out: Path, cache: Path, crash_at: str | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "ROBBENCH_CACHE": str(cache), "ROBBENCH_BUILD_WAIT": "30"}
    env.pop("ROBBENCH_CRASH_AT", None)
    if crash_at:
        env["ROBBENCH_CRASH_AT"] = crash_at
    return subprocess.run([sys.executable, "-m", "robbench", "run", "--config", str(config), "--out", str(out),
                           "--no-progress"], env=env, capture_output=True, text=True, timeout=TIMEOUT)


def _rows(out: Path) -> list[tuple]:
    with sqlite3.connect(out / "results.sqlite") as db:
        return db.execute("SELECT job_key, point_id, status, metrics, error FROM results "
                          "ORDER BY job_key, point_id").fetchall()


def _leftovers(*roots: Path) -> list[Path]:
    """Temporaries and lock files anywhere under the roots (there should be none after a finished run)."""
    found = []
    for root in roots:
        found += [p for p in root.rglob("*") if p.name.endswith((".tmp", ".lock")) or p.name == "lock"]
    return found


def test_killed_runs_resume_to_exactly_the_clean_result(tmp_path, monkeypatch, built_extension):
    config = tmp_path / "crash.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    out, cache = tmp_path / "run", _cache(tmp_path / "a", built_extension)

    # 1. Killed while saving the trained checkpoint: its temporary is left in the cache.
    done = _run(config, out, cache, "checkpoint-save")
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert list((cache / "models").glob("*.tmp")) and not list((cache / "models").glob("*.pt"))

    # 2. Killed during the extension build (after the attack-free rows were written): the build lock and,
    #    as a compile killed inside torch leaves it, torch's lock file stay behind.
    if built_extension is not None:
        done = _run(config, out, cache, "ext-build")
        assert done.returncode == -signal.SIGKILL, done.stderr
        assert not list((cache / "models").glob("*.tmp"))  # the stale checkpoint temporary was removed
        assert (cache / "ext" / "robbench_ops.build.lock").exists()
        (cache / "ext" / "robbench_ops" / "lock").touch()

    # 3. Killed after the second batch of rows was committed.
    done = _run(config, out, cache, "rows-written:2")
    assert done.returncode == -signal.SIGKILL, done.stderr
    if built_extension is not None:
        assert "removing the stale build lock" in done.stderr  # no hang: cleared, then built (no-op)
    assert 0 < len(_rows(out)) < 6

    # 4. Killed between writing the leaderboard temporaries and renaming them.
    done = _run(config, out, cache, "leaderboard-write")
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert list(out.glob("leaderboard.*.tmp"))

    # 5. The resumed run finishes.
    done = _run(config, out, cache, None)
    assert done.returncode == 0, done.stderr

    # The uninterrupted run, in this process (one interpreter start less), with its own model cache.
    clean_out, clean_cache = tmp_path / "clean", _cache(tmp_path / "b", built_extension)
    monkeypatch.setenv("ROBBENCH_CACHE", str(clean_cache))
    monkeypatch.delenv("ROBBENCH_CRASH_AT", raising=False)
    assert main(["run", "--config", str(config), "--out", str(clean_out), "--no-progress"]) == 0

    resumed, clean = _rows(out), _rows(clean_out)
    assert len(clean) == 6 and all(status == "ok" for _, _, status, _, _ in clean)
    assert resumed == clean  # complete, no duplicates, identical numbers
    assert _same_board(out / "leaderboard.json", clean_out / "leaderboard.json")
    assert _leftovers(out, cache) == []


def _same_board(a: Path, b: Path) -> bool:
    """Leaderboards equal up to wall time (the resumed run's rows were timed in several processes)."""
    def strip(path: Path) -> list[dict]:
        return [{k: v for k, v in rec.items() if k != "seconds"} for rec in json.loads(path.read_text())["rows"]]
    return strip(a) == strip(b)
