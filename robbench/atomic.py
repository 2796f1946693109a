"""Files replaced whole: every new text goes to a temporary beside its file and is renamed into place
only when all were written, so a failed write (disk full, a file size limit) or a kill leaves the
previous complete files (a kill between two renames: files of two consecutive versions, each whole)."""
from __future__ import annotations

import os
from pathlib import Path
from robbench import faults


def replace_texts(folder: Path, texts: dict[str, str], *, fault: str | None = None) -> None:
    """Write ``texts`` (file name -> content) into ``folder``: all to ``<name>.tmp`` first, then renamed.
    On an error the temporaries written are removed and the error propagates. ``fault``: the
    :mod:`robbench.faults` point reached between writing and renaming (for the crash tests)."""
    folder = Path(folder)
    written: list[Path] = []
    try:
        for name, text in texts.items():
            tmp = folder / f"{name}.tmp"
            written.append(tmp)
            tmp.write_text(text)
    except BaseException:
        for tmp in written:
            tmp.unlink(missing_ok=True)
        raise
    if fault:
        faults.reached(fault)
    try:
        for name in texts:
            os.replace(folder / f"{name}.tmp", folder / name)
    finally:  # a rename that failed (the name is a directory) leaves no temporary behind
        for tmp in written:
            tmp.unlink(missing_ok=True)


def replace_text(path: Path, text: str) -> None:
    """:func:`replace_texts` for one file."""
    path = Path(path)
    replace_texts(path.parent, {path.name: text})
