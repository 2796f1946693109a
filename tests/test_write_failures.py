"""Disk-full-like write failures, for real: each `robbench run` here is a subprocess whose file size limit
(RLIMIT_FSIZE; Python ignores SIGXFSZ, so a write past it fails with EFBIG, as a full disk fails with
ENOSPC) stops one of its writes. What was committed stays, the message says what failed and how to go on,
and rerunning the same command without the limit resumes to the full result."""
from __future__ import annotations

import os
import resource
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="needs RLIMIT_FSIZE")


def _run(out: Path, cache: Path, points: int, limit: int | None, hidden: int = 64) -> subprocess.CompletedProcess:
    def cap() -> None:
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    env = {**os.environ, "ROBBENCH_CACHE": str(cache)}
    env.pop("ROBBENCH_CRASH_AT", None)
    return subprocess.run([sys.executable, "-m", "robbench", "run", "--dataset", "digits", "--models", "vae",
                           "--param", f"vae.hidden={hidden}", "--epochs", "1", "--estimators", "encoder_stats",
                           "--points", str(points), "--backend", "torch", "--out", str(out), "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=180, preexec_fn=cap)


def _statuses(out: Path) -> list[str]:
    with sqlite3.connect(out / "results.sqlite") as db:
        return [row[0] for row in db.execute("SELECT status FROM results ORDER BY point_id")]


def test_a_checkpoint_that_cannot_be_cached_does_not_fail_the_run(tmp_path):
    """The model trains, its checkpoint (~90 KB) exceeds the 60 KB limit: the run warns that it could not
    cache it, naming the cause, and evaluates the model it has (before: every row failed with torch's
    'unexpected pos 2176 vs 2070' and the training was thrown away)."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    done = _run(out, cache, 4, 60_000, hidden=128)  # the checkpoint: ~90 KB
    assert done.returncode == 0, done.stderr
    assert "could not cache the trained model" in done.stderr and "File too large" in done.stderr, done.stderr
    assert _statuses(out) == ["ok"] * 4
    assert not list((cache / "models").glob("*")), "no checkpoint and no temporary left in the cache"


def test_results_that_cannot_be_written_stop_the_run_with_a_clear_message_and_resume(tmp_path):
    """The store cannot grow past the limit: exit status 1 (not 2, the input is fine), a message that says
    the write failed, that what was committed is kept and how to resume (before: 'the results database
    cannot be used: disk I/O error', as if it were corrupt); then the same command resumes to 300 rows."""
    out, cache = tmp_path / "run", tmp_path / "cache"  # checkpoint ~45 KB, store of 4 rows 48 KB
    assert _run(out, cache, 4, None).returncode == 0  # trains and caches the model; 4 rows
    done = _run(out, cache, 300, 60_000)
    assert done.returncode == 1, done.stderr
    assert "could not write" in done.stderr and "results.sqlite" in done.stderr, done.stderr
    assert "rerun the same command to resume" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert _statuses(out) == ["ok"] * 4
    done = _run(out, cache, 300, None)
    assert done.returncode == 0, done.stderr
    assert _statuses(out) == ["ok"] * 300


@pytest.mark.parametrize("error", [sqlite3.OperationalError("attempt to write a readonly database"),
                                   sqlite3.OperationalError("database is locked")])
def test_another_database_error_still_exits_2_with_its_message(monkeypatch, capsys, error):
    """The disk-full handler catches sqlite3.OperationalError before the DatabaseError handler; an error
    that is not about room was re-raised from there, past that handler: a traceback instead of
    'the results database cannot be used' and status 2 (as before the disk-full handling)."""
    from robbench import cli

    def fail(*_args, **_kwargs):
        raise error

    monkeypatch.setattr(cli, "cmd_plugins", fail)
    assert cli.main(["plugins"]) == cli.USAGE_ERROR
    assert f"the results database cannot be used: {error}" in capsys.readouterr().err


@pytest.mark.parametrize("free, full", [(50 * 2 ** 30, False), (8192, True)])
def test_a_sqlite_disk_io_error_is_called_a_full_disk_only_when_the_disk_is_full(monkeypatch, tmp_path, free, full):
    """SQLite's generic "disk I/O error" (a file size limit, a failing disk, a network file system, ...) was
    reported as "(disk full, or a file size limit reached?)" whatever the free space: the message now says
    what is known (an I/O error on the results database, its path, the free space) and calls the disk full
    only when shutil.disk_usage says so."""
    import shutil
    from collections import namedtuple

    from robbench import cli

    usage = namedtuple("usage", "total used free")
    seen = []

    def disk_usage(path):
        seen.append(Path(path))
        return usage(100 * 2 ** 30, 100 * 2 ** 30 - free, free)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    out = tmp_path / "run"
    out.mkdir()
    text = cli.write_failure(sqlite3.OperationalError("disk I/O error"), out)
    assert f"could not write {out / 'results.sqlite'}: disk I/O error" in text, text
    assert seen and seen[0] == out
    assert "rerun the same command to resume" in text
    if full:
        assert "its disk is full (8.0 KiB free)" in text and "free space" in text, text
    else:
        assert "disk full" not in text and "disk is full" not in text and "free space" not in text, text
        assert "an I/O error on the results database" in text and "not full" in text, text
        assert "50.0 GiB free" in text and "file size limit" in text, text
