"""Inter-process locks on files, released by the kernel when their owner dies (even by SIGKILL).

A lock is an ``flock`` on a small file that holds the owner's pid, host, start time and command, so a
process that finds the lock taken can say who holds it. Because the kernel drops an ``flock`` with the
process, a lock file left behind by a killed process is simply taken over: there is nothing to guess
from pids or ages. The file is removed on release; acquiring re-checks that the locked file is still
the one at the path, so a release racing with a waiter cannot hand the lock to two processes.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any


class LockBusy(RuntimeError):
    """The lock is held by another live process; ``holder`` describes it (pid, command, since when)."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"{path} is held by {holder}")
        self.path, self.holder = path, holder


class FileLock:
    """An exclusive lock on ``path`` (its parent must exist). Use :meth:`try_acquire` / :meth:`acquire`
    and :meth:`release`, or ``with FileLock(path).held(wait=...)``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def locked(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        """Take the lock if nobody holds it; never blocks. Raises OSError if the file cannot be created."""
        if self._fd is not None:
            return True
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            try:  # the holder may have released (and unlinked) between our open and our flock
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                 "command": " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:])[:300]}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(owner).encode())
        self._fd = fd
        return True

    def acquire(self, wait: float, poll: float = 0.2) -> bool:
        """Try for at most ``wait`` seconds; True when the lock is ours."""
        deadline = time.monotonic() + max(0.0, wait)
        while not self.try_acquire():
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll)
        return True

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def holder(self) -> dict[str, Any] | None:
        """What the current holder wrote into the file (None when unreadable or just being written)."""
        try:
            return json.loads(self.path.read_text() or "null")
        except (OSError, ValueError):
            return None

    def describe_holder(self) -> str:
        info = self.holder()
        if not info:
            return "another process"
        since = time.strftime("%H:%M:%S", time.localtime(info.get("since", 0)))
        command = f" running `{info['command']}`" if info.get("command") else ""
        return f"process {info.get('pid')} on {info.get('host')}{command} since {since}"

    def __enter__(self) -> "FileLock":
        if not self.try_acquire():
            raise LockBusy(self.path, self.describe_holder())
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OverflowError:  # beyond any pid
        return False
    return True
