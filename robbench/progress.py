"""The coordinator's one progress display: tasks done of total, running and failed, elapsed time.

A task is one model made ready (trained, loaded or built) or one batch evaluated, wherever an executor
runs it. Nested displays (a model's training bar when it trains in this process) render inside it.
"""
from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class TaskDisplay:
    """Context manager around a rich Progress with one bar; ``enabled=False`` shows nothing."""

    def __init__(self, console: Console, total: int, enabled: bool = True):
        self._bar = Progress(TextColumn("  tasks"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("running {task.fields[running]}  failed {task.fields[failed]}"),
                             TimeElapsedColumn(), console=console, disable=not enabled, transient=False)
        self._task = self._bar.add_task("tasks", total=total, running=0, failed=0)
        self.total, self.done, self.failed = total, 0, 0

    def __enter__(self) -> "TaskDisplay":
        self._bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._bar.__exit__(*exc)

    def model(self, failed: bool, skipped: int = 0) -> None:
        """A model task finished; a failed model's ``skipped`` batches will never run."""
        self.total -= skipped
        self._finish(failed)

    def batch(self, failed: bool) -> None:
        """A batch task finished (failed: some of its rows are errors)."""
        self._finish(failed)

    def running(self, count: int) -> None:
        self._bar.update(self._task, running=count)

    def _finish(self, failed: bool) -> None:
        self.done += 1
        self.failed += int(failed)
        self._bar.update(self._task, total=self.total, completed=self.done, failed=self.failed)
