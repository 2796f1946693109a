"""The merged leaderboard and exported entries are replaced whole: a write that fails half-way (here for
real: a subprocess whose file size limit, RLIMIT_FSIZE, stops the write of leaderboard.json) leaves the
previous complete set, never a truncated JSON beside a newer Markdown and CSV, and no temporaries."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import pytest

from robbench import cli

pytestmark = pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="needs RLIMIT_FSIZE")
NAMES = ("leaderboard.md", "leaderboard.csv", "leaderboard.json")


def _run(tmp_path, name: str, *extra: str):
    out = tmp_path / name
    assert cli.main(["run", "--dataset", "digits", "--models", "linear_gaussian", "--estimators", "encoder_stats",
                     "--points", "3", "--backend", "torch", "--out", str(out), "--no-progress", *extra]) == 0
    return out


def _limited(args: list[str], limit: int) -> subprocess.CompletedProcess:
    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return subprocess.run([sys.executable, "-m", "robbench", *args], capture_output=True, text=True, timeout=120,
                          preexec_fn=cap, env={**os.environ})


def test_a_failed_merge_write_keeps_the_previous_merged_leaderboard(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBBENCH_CACHE", str(tmp_path / "cache"))
    a = _run(tmp_path, "a")
    b = _run(tmp_path, "b", "--param", "linear_gaussian.s=0.25")
    merged = tmp_path / "merged"
    assert cli.main(["leaderboard", "--merge", str(a), "--out", str(merged)]) == 0
    before = {name: (merged / name).read_text() for name in NAMES}
    limit = 1500
    assert max(len(before[n]) for n in NAMES[:2]) * 2 < limit < len(before["leaderboard.json"])
    done = _limited(["leaderboard", "--merge", str(a), str(b), "--out", str(merged)], limit)
    assert done.returncode == 1, done.stderr
    assert "could not write" in done.stderr and "File too large" in done.stderr, done.stderr
    assert {name: (merged / name).read_text() for name in NAMES} == before
    assert sorted(p.name for p in merged.iterdir()) == sorted(NAMES)
    json.loads((merged / "leaderboard.json").read_text())  # whole


def test_a_failed_export_keeps_the_previous_entries(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBBENCH_CACHE", str(tmp_path / "cache"))
    a = _run(tmp_path, "a")
    assert cli.main(["export", str(a)]) == 0
    before = (a / "entries.json").read_text()
    done = _limited(["export", str(a)], 1000)
    assert done.returncode == 1 and "could not write" in done.stderr, done.stderr
    assert (a / "entries.json").read_text() == before
    assert not list(a.glob("*.tmp"))
