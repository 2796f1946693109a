"""A run directory in use: checked and created before any work, held by one invocation at a time, and
cleared of the temporary files a killed invocation left behind.

Semantics of concurrent runs: one ``robbench run``/``train`` per run directory at a time. A second
invocation on a directory in use exits with status 2 and names the process that holds it; a lock left
by a killed process is taken over silently (the kernel released it with the process).
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from robbench.locks import FileLock

LOCK_NAME = ".robbench.lock"


class RunDirError(Exception):
    """The run directory cannot be used (a file, not writable, or in use); the message says why."""


def check(path: str | Path) -> None:
    """RunDirError unless ``path`` is a directory or can be created as one (creates nothing: --dry-run)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"--out {path}: a file of that name exists; the run directory must be a directory")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise RunDirError(f"--out {path}: {parent} is a file, so no directory can be created under it")


def prepare(path: str | Path) -> Path:
    """Create ``path`` (and its parents) or check that it is a usable directory."""
    path = Path(path)
    check(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunDirError(f"--out {path}: cannot create the run directory ({err.strerror or err})") from None
    return path


def clean_temporaries(path: Path) -> list[Path]:
    """Remove ``*.tmp`` files in the run directory and its ``arrays/`` (only call while holding the lock:
    then every temporary belongs to a dead invocation). Returns what was removed."""
    removed = []
    for tmp in [*path.glob("*.tmp"), *(path / "arrays").glob("*/*.tmp")]:
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


@contextmanager
def claimed(path: str | Path) -> Iterator[Path]:
    """Prepare ``path``, hold its lock for the duration, and clean stale temporaries first.

    A directory this call created and nothing was written to (a run refused before any work) is removed
    again, so a run that cannot start leaves nothing behind."""
    created = not Path(path).exists()
    path = prepare(path)
    lock = FileLock(path / LOCK_NAME)
    try:
        ok = lock.try_acquire()
    except OSError as err:
        raise RunDirError(f"--out {path}: the run directory is not writable ({err.strerror or err})") from None
    if not ok:
        raise RunDirError(f"run directory {path} is in use by {lock.describe_holder()}; one robbench "
                          "invocation per run directory at a time: wait for it to finish or choose another --out")
    try:
        clean_temporaries(path)
        yield path
    finally:
        lock.release()  # also unlinks the lock file
        if created:
            try:
                path.rmdir()  # only succeeds while the directory is empty
            except OSError:
                pass
