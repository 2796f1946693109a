"""Readers (and, for tests, writers) for the standard image-data file formats. Nothing is downloaded.

- IDX (MNIST, Fashion-MNIST): big-endian header ``0 0 <dtype code> <ndim>``, ``ndim`` uint32 sizes,
  then the raw array; files may be gzipped (``.gz``).
- CIFAR-10 binary version: records of 1 label byte + 3072 image bytes (3 x 32 x 32, channel-major).
"""
from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

# IDX type codes -> big-endian numpy dtypes
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

DATA_DIR_ENV = "ROBBENCH_DATA_DIR"
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CIFAR10_TRAIN = [f"data_batch_{i}.bin" for i in range(1, 6)]
CIFAR10_TEST = "test_batch.bin"
_CIFAR_RECORD = 1 + 3 * 32 * 32


class DataFileError(FileNotFoundError):
    """A data set's files are missing or malformed; the message says which files are expected where."""


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into an array of its stored dtype and shape."""
    path = Path(path)
    try:
        with _open(path) as f:
            data = f.read()
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:  # gzip's errors for a cut or foreign file
        raise DataFileError(f"{path}: cannot be decompressed ({type(err).__name__}: {err}): a .gz file cut "
                            "short (an interrupted download or copy?) or one that is not gzip; fetch it "
                            "again, or give the uncompressed file without .gz") from None
    except OSError as err:  # unreadable: permissions, an I/O error
        raise DataFileError(f"{path}: cannot be read ({type(err).__name__}: {err})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        what = "an empty file" if not data else f"bad magic number {data[:4].hex()}"
        raise DataFileError(f"{path}: not an IDX file ({what}; IDX files start with 00 00, a type code and "
                            "the number of dimensions)")
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise DataFileError(f"{path}: IDX header declares {ndim} dimensions, but the file has only {len(data)} "
                            f"bytes; the header is damaged or the file is cut short (MNIST-format files have "
                            "1 dimension (labels) or 3 (images))")
    shape = tuple(int(s) for s in np.frombuffer(data, ">u4", count=ndim, offset=4))
    expected = header + math.prod(shape) * dtype.itemsize  # Python ints: a damaged header cannot overflow
    if len(data) != expected:
        shown = str(shape) if ndim <= 4 else f"of {ndim} dimensions"
        raise DataFileError(f"{path}: IDX header says shape {shown} ({expected} bytes) but the file has "
                            f"{len(data)} bytes: cut short, or its header is damaged")
    return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file (gzipped when the name ends in ``.gz``); used by tests."""
    path = Path(path)
    codes = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_DTYPES.items()}
    arr = np.asarray(array)
    code = codes[arr.dtype.newbyteorder("=")]
    header = bytes([0, 0, code, arr.ndim]) + np.asarray(arr.shape, ">u4").tobytes()
    body = arr.astype(np.dtype(_IDX_DTYPES[code])).tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + body)


def read_cifar10_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 binary batch: images (N, 3, 32, 32) uint8 and labels (N,) int64."""
    path = Path(path)
    raw = np.fromfile(path, np.uint8)
    if raw.size == 0 or raw.size % _CIFAR_RECORD:
        raise DataFileError(f"{path}: {raw.size} bytes is not a whole number of CIFAR-10 records "
                            f"({_CIFAR_RECORD} bytes each)")
    records = raw.reshape(-1, _CIFAR_RECORD)
    return records[:, 1:].reshape(-1, 3, 32, 32), records[:, 0].astype(np.int64)


def write_cifar10_batch(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray) -> None:
    """Write images (N, 3, 32, 32) uint8 and labels (N,) in the CIFAR-10 binary format; used by tests."""
    records = np.concatenate([np.asarray(labels, np.uint8)[:, None],
                              np.asarray(images, np.uint8).reshape(len(labels), -1)], axis=1)
    records.tofile(path)


# ---------------------------------------------------------------------------------------------
# Locating files
# ---------------------------------------------------------------------------------------------
def resolve_data_dir(data_dir: str | os.PathLike | None, dataset: str) -> Path:
    """``data_dir``, else ``$ROBBENCH_DATA_DIR``; a clear error when neither is set or it is missing."""
    chosen = data_dir or os.environ.get(DATA_DIR_ENV)
    if not chosen:
        raise DataFileError(f"data set {dataset!r} reads local files: pass --data-dir DIR (or set "
                            f"{DATA_DIR_ENV}=DIR). robbench never downloads data.")
    path = Path(chosen).expanduser()
    if not path.is_dir():
        cwd = "" if path.is_absolute() else f" (relative paths are read from the current directory, {os.getcwd()})"
        raise DataFileError(f"data set {dataset!r}: data directory {path} "
                            f"{'is a file, not a directory' if path.exists() else 'does not exist'}{cwd}")
    return path


def _find(dirs: Sequence[Path], name: str) -> Path | None:
    for d in dirs:
        for candidate in (d / name, d / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def incomplete(dirs: Sequence[Path], names: Sequence[str], gz: bool = False) -> str:
    """`` Found incomplete: DIR has A but lacks B, C.`` for each of ``dirs`` that holds some of the files
    ``names`` (each also as ``NAME.gz`` when ``gz``) but not all; "" when none does. The part of a
    missing-files message that says which file is missing where (a half-copied or mixed-up folder)."""
    parts = []
    for d in dict.fromkeys(dirs):  # "DIR" and "DIR/." once
        have = [n for n in names if (d / n).is_file() or (gz and (d / f"{n}.gz").is_file())]
        if have and len(have) < len(names):
            parts.append(f"{d} has {', '.join(have)} but lacks {', '.join(n for n in names if n not in have)}")
    return f" Found incomplete: {'; '.join(parts)}." if parts else ""


def packed(root: Path) -> str:
    """`` Found DIR/cifar-10-python.tar.gz: unpack it ...`` when a CIFAR-10 archive lies unpacked in ``root``."""
    archives = [root / n for n in ("cifar-10-python.tar.gz", "cifar-10-binary.tar.gz") if (root / n).is_file()]
    return "".join(f" Found {a}: unpack it there (tar xzf {a.name} -C {root})." for a in archives)


def find_idx_files(root: Path, subdirs: Sequence[str], dataset: str) -> dict[str, Path]:
    """Locate the four IDX files of an MNIST-format data set in ``root/<subdir>`` (first complete one)."""
    dirs = [root / s for s in subdirs]
    for d in dirs:
        found = {key: _find([d], name) for key, name in IDX_FILES.items()}
        if all(found.values()):
            return found  # type: ignore[return-value]
    names = ", ".join(f"{n}[.gz]" for n in IDX_FILES.values())
    where = ", ".join(str(d) for d in dirs)
    # Kaggle's copies name the files train-images.idx3-ubyte (a dot before idx): say what to rename
    dotted = [p for d in dirs for n in IDX_FILES.values() for p in d.glob(n.replace("-idx", ".idx") + "*")]
    renames = (f" Found {', '.join(str(p) for p in dotted[:4])}: rename them to the names above (a '-' before "
               "'idx', not '.').") if dotted else ""
    raise DataFileError(f"data set {dataset!r}: expected the IDX files {names} together in one of: "
                        f"{where}.{incomplete(dirs, list(IDX_FILES.values()), gz=True)}{renames} "
                        "robbench never downloads data.")


def find_cifar10_files(root: Path, dataset: str) -> tuple[list[Path], Path]:
    """The five training batches and the test batch of CIFAR-10's binary version, in ``root`` or its
    ``cifar-10-batches-bin`` / ``<dataset>`` sub-directories."""
    dirs = [root / "cifar-10-batches-bin", root / dataset / "cifar-10-batches-bin", root / dataset, root]
    for d in dirs:
        paths = [d / n for n in CIFAR10_TRAIN] + [d / CIFAR10_TEST]
        if all(p.is_file() for p in paths):
            return paths[:-1], paths[-1]
    names = ", ".join(CIFAR10_TRAIN + [CIFAR10_TEST])
    raise DataFileError(f"data set {dataset!r}: expected the binary-version files {names} (the 'CIFAR-10 "
                        f"binary version' archive) in one of: {', '.join(str(d) for d in dirs)}."
                        f"{incomplete(dirs, CIFAR10_TRAIN + [CIFAR10_TEST])}{packed(root)}")
