"""Data sets stored in torchvision's on-disk formats, read without torchvision and never downloaded.

- ``cifar10`` (the built-in, in :mod:`robbench_plugins.datasets`) also reads torchvision's
  ``cifar-10-batches-py`` through :func:`read_cifar10_python`: the pickles are opened with a restricted
  unpickler that admits only numpy arrays, dtypes and plain Python values, so a tampered file cannot run
  code.
- ``celeba``: ``ROOT/celeba/img_align_celeba/*.jpg`` with ``ROOT/celeba/list_eval_partition.txt``
  (torchvision's ``CelebA`` layout); split 0 is train, 2 is test (1, valid, is not used). Labels are 0.
- ``image_folder``: torchvision's ``ImageFolder`` layout, ``ROOT/<class>/<image>``; with
  ``ROOT/train/<class>/...`` and ``ROOT/test/<class>/...`` those are the splits, otherwise a seeded,
  stratified split by ``test_fraction``. Class indices follow the sorted class names, as in torchvision.

MNIST and Fashion-MNIST in torchvision's layout (``ROOT/MNIST/raw``, ``ROOT/FashionMNIST/raw``) are read
by the built-in ``mnist_full`` and ``fashion_mnist``. Images of the folder-based sets are read lazily
(:class:`LazyImages`, decoded with Pillow when indexed; every file is checked when the set is loaded,
:func:`check_image`) at the size of the first image, RGB, in [0, 1];
:mod:`robbench.imagefit` then resizes and crops them to what a model declares.
"""
from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from robbench import datafiles
from robbench.paths import cache_dir
from robbench.hookspecs import hookimpl
from robbench.imagefit import resize_center_crop
from robbench.protocols import DataOptions, DatasetSpec, SplitData

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's


# ---------------------------------------------------------------------------------------------
# CIFAR-10, python version: restricted unpickling
# ---------------------------------------------------------------------------------------------
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),  # how Python 2 pickles of byte strings are written under protocol 2
}


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds numpy arrays and plain values and refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: CIFAR-10 batches hold only numpy "
                                     f"arrays, and any other object could run code")


def restricted_load(path: Path) -> Any:
    """Unpickle ``path`` admitting only numpy arrays and basic Python types (latin-1 for Python 2 pickles)."""
    with open(path, "rb") as f:
        return _ArrayUnpickler(f, encoding="latin1").load()


def _pixel_values(data: np.ndarray) -> bool:
    """Whether ``data`` holds whole pixel values 0..255 that cast to uint8 unchanged: integers, or floats
    that are whole numbers (a batch re-saved as float 0..255 loaded correctly before the range check)
    reaching above 1 (floats in [0, 1] are scaled pixels, which a cast would turn black)."""
    if not data.size:
        return data.dtype.kind in "uif"
    if data.dtype.kind not in "uif" or data.min() < 0 or data.max() > 255:
        return False
    if data.dtype.kind == "f":  # by rows: no full-size temporary for a 10000 x 3072 float64 batch
        return bool(data.max() > 1) and all(np.array_equal(rows, np.floor(rows)) for rows in np.array_split(
            data, max(1, len(data) // 1000)))
    return True


def read_cifar10_python(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch of ``cifar-10-batches-py``: images (N, 3, 32, 32) uint8 and labels (N,) int64."""
    path = Path(path)
    try:
        batch = restricted_load(path)
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise datafiles.DataFileError(f"{path}: not a CIFAR-10 python batch ({err})") from None
    if not isinstance(batch, dict):
        raise datafiles.DataFileError(f"{path}: expected a dict of data and labels, got {type(batch).__name__}")
    batch = {(k.decode() if isinstance(k, bytes) else k): v for k, v in batch.items()}
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or labels is None or data.ndim != 2 or data.shape[1] != 3072 \
            or len(labels) != len(data):
        raise datafiles.DataFileError(f"{path}: expected 'data' (N, 3072) uint8 and N 'labels'")
    if not _pixel_values(data):
        # a cast would turn float pixels in [0, 1] into black images without a word
        raise datafiles.DataFileError(f"{path}: 'data' holds {data.dtype} values"
                                      f"{f' in [{data.min()}, {data.max()}]' if data.size else ''}; CIFAR-10 "
                                      "batches hold uint8 pixels 0..255 (floats only as whole numbers 0..255)")
    return data.astype(np.uint8).reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


CIFAR10_PY_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR10_PY_TEST = "test_batch"


def cifar10_python_dirs(root: Path) -> list[Path]:
    """Where torchvision's ``cifar-10-batches-py`` files may be, first match wins."""
    return [root / "cifar-10-batches-py", root / "cifar10" / "cifar-10-batches-py", root]


def find_cifar10_python(root: Path) -> tuple[list[Path], Path] | None:
    for d in cifar10_python_dirs(root):
        paths = [d / n for n in CIFAR10_PY_TRAIN] + [d / CIFAR10_PY_TEST]
        if all(p.is_file() for p in paths):
            return paths[:-1], paths[-1]
    return None


def load_cifar10_python(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """Train/test images and labels from ``cifar-10-batches-py`` under ``root``, or None if absent."""
    found = find_cifar10_python(root)
    if found is None:
        return None
    train = [read_cifar10_python(p) for p in found[0]]
    test_x, test_y = read_cifar10_python(found[1])
    return np.concatenate([b[0] for b in train]), np.concatenate([b[1] for b in train]), test_x, test_y


# ---------------------------------------------------------------------------------------------
# Image files, read lazily
# ---------------------------------------------------------------------------------------------
def _unreadable(path: Path, err: BaseException) -> datafiles.DataFileError:
    return datafiles.DataFileError(f"image file {path} cannot be read: {type(err).__name__}: {err}; "
                                   "fix or remove it")


def _ends_with_eoi(path: Path) -> bool:
    """Whether a JPEG file ends with its end-of-image marker (FF D9): a truncated one does not."""
    with open(path, "rb") as f:
        f.seek(0, 2)
        if f.tell() < 2:
            return False
        f.seek(-2, 2)
        return f.read(2) == b"\xff\xd9"


def check_image(path: Path) -> None:
    """DataFileError naming ``path`` unless Pillow can read it as an image: the header of every file, the
    chunk checksums of a PNG (``verify``), the end-of-image marker of a JPEG (decoded in full when it is
    missing: truncated, or trailing bytes), a full decode for other formats. About 20 µs a PNG or JPEG
    file (a full decode of a 178 x 218 JPEG: 300 µs), so a data set is checked when it is loaded rather
    than failing when training reaches the file."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            if img.format == "PNG":
                img.verify()
                return
            if img.format == "JPEG" and _ends_with_eoi(path):
                return
        with Image.open(path) as img:
            img.load()
    except Exception as err:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError, ...
        raise _unreadable(path, err) from None


# Raise when check_image finds more than before: "checked" records of the older check then no longer count.
CHECK_VERSION = 1
CHECKED_DIR = "image_checks"  # in the cache directory: one empty file per file list that passed


def _checked_record(paths: Sequence[Path]) -> Path:
    """Where the record that ``paths`` passed :func:`check_image` lives: the cache directory, under a sha256
    of each file's absolute path, size and modification time (a stat per file; no file is opened)."""
    h = hashlib.sha256(f"check_image v{CHECK_VERSION};".encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.abspath(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return cache_dir() / CHECKED_DIR / h.hexdigest()


def check_images(paths: Sequence[Path]) -> None:
    """:func:`check_image` for every file, unless this very list (same paths, sizes, modification times)
    passed before: CelebA's ~182k files are then not opened again at each load. A file that changed (size
    or mtime) changes the fingerprint, and the whole list is checked again. A file damaged without either
    changing is still named when it is decoded (:func:`_read_image`)."""
    try:
        record: Path | None = _checked_record(paths)
    except OSError:  # a file vanished: check_image names it
        record = None
    if record is not None and record.is_file():
        return
    for path in paths:
        check_image(path)
    if record is not None:
        try:
            record.parent.mkdir(parents=True, exist_ok=True)
            record.touch()
        except OSError:  # a read-only cache: the files are simply checked again next time
            pass


def _read_image(path: Path, size: tuple[int, int]) -> Tensor:
    """RGB image file -> (3, *size) float32 in [0, 1] (resized shorter side + centre crop when needed).
    A file that cannot be decoded (damaged after the data set was loaded, or a defect only a full decode
    finds) raises DataFileError naming it: a data problem stops the run (exit 2), it fails no model."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    except Exception as err:  # noqa: BLE001 - as check_image
        raise _unreadable(path, err) from None
    t = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
    if tuple(t.shape[1:]) != tuple(size):
        t = resize_center_crop(t[None], size)[0]
    return t


class LazyImages:
    """Image files seen as a float tensor (N, 3, H, W) in [0, 1]: indexing with an int, a slice, a list or a
    tensor of indices decodes just those files. H, W: the first image's size (others are fitted to it).
    Every file is checked when the set is made (:func:`check_images`, which remembers a list that passed;
    ``check=False`` skips it)."""

    def __init__(self, paths: Sequence[Path], size: tuple[int, int] | None = None, *, check: bool = True):
        self.paths = list(paths)
        if not self.paths:
            raise datafiles.DataFileError("no image files found")
        if check:
            check_images(self.paths)
        if size is None:
            from PIL import Image

            with Image.open(self.paths[0]) as img:
                size = (img.height, img.width)
        self.size = tuple(size)
        self.shape = torch.Size((len(self.paths), 3, *self.size))
        self.dtype = torch.float32

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: Any) -> Tensor:
        if isinstance(index, int):
            return _read_image(self.paths[index], self.size)
        if isinstance(index, slice):
            idx = range(len(self.paths))[index]
        else:
            idx = torch.as_tensor(index).reshape(-1).tolist()
        if not len(idx):
            return torch.empty((0, 3, *self.size))
        return torch.stack([_read_image(self.paths[i], self.size) for i in idx])

    def fingerprint(self) -> str:
        """sha256 of the file names, sizes and modification times (contents are not read)."""
        h = hashlib.sha256()
        for p in self.paths:
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
        return h.hexdigest()


def _labels(values: Sequence[int]) -> Tensor:
    return torch.as_tensor(list(values), dtype=torch.int64)


def load_celeba(options: DataOptions) -> SplitData:
    """CelebA in torchvision's layout: img_align_celeba/ + list_eval_partition.txt (0 train, 2 test)."""
    root = datafiles.resolve_data_dir(options.data_dir, "celeba")
    candidates = [root / "celeba", root]
    for base in candidates:
        images, partition = base / "img_align_celeba", base / "list_eval_partition.txt"
        if images.is_dir() and partition.is_file():
            break
    else:
        raise datafiles.DataFileError(
            f"data set 'celeba': expected img_align_celeba/ and list_eval_partition.txt in one of "
            f"{', '.join(str(c) for c in candidates)} (torchvision's CelebA layout). robbench never downloads data.")
    splits: dict[int, list[Path]] = {0: [], 1: [], 2: []}
    for line in partition.read_text().split("\n"):
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit() or int(parts[1]) not in splits:
            continue
        splits[int(parts[1])].append(images / parts[0])
    missing = [p for p in splits[0] + splits[2] if not p.is_file()]
    if missing:
        raise datafiles.DataFileError(f"data set 'celeba': {len(missing)} images listed in {partition} are "
                                      f"missing, e.g. {missing[0]}")
    if not splits[0] or not splits[2]:
        raise datafiles.DataFileError(f"data set 'celeba': {partition} lists no train (0) or no test (2) images")
    train = LazyImages(splits[0])
    test = LazyImages(splits[2], train.size)
    return SplitData(train, _labels([0] * len(train)), test, _labels([0] * len(test)))  # type: ignore[arg-type]


def _class_images(folder: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    paths, labels = [], []
    for index, name in enumerate(classes):
        files = sorted(p for p in (folder / name).rglob("*") if p.suffix.lower() in IMG_EXTENSIONS)
        paths += files
        labels += [index] * len(files)
    return paths, labels


def load_image_folder(options: DataOptions) -> SplitData:
    """torchvision's ImageFolder layout (ROOT/<class>/<image>), with ROOT/train and ROOT/test as splits
    when both exist, else a seeded stratified split."""
    root = datafiles.resolve_data_dir(options.data_dir, "image_folder")
    if (root / "train").is_dir() and (root / "test").is_dir():
        classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
        train_p, train_y = _class_images(root / "train", classes)
        test_p, test_y = _class_images(root / "test", classes)
    else:
        classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        paths, labels = _class_images(root, classes)
        if len(paths) < 2:
            raise datafiles.DataFileError(f"data set 'image_folder': {root} holds {len(paths)} images in class "
                                          f"folders ROOT/<class>/<image> ({', '.join(IMG_EXTENSIONS)})")
        rng = np.random.default_rng(options.seed)
        y = np.asarray(labels)
        test_idx = []
        for c in np.unique(y):
            idx = np.flatnonzero(y == c)
            rng.shuffle(idx)
            test_idx += idx[: max(1, int(round(options.test_fraction * len(idx))))].tolist()
        test_set = set(test_idx)
        train_idx = rng.permutation([i for i in range(len(paths)) if i not in test_set]).tolist()
        test_idx = sorted(test_set)
        train_p, train_y = [paths[i] for i in train_idx], [labels[i] for i in train_idx]
        test_p, test_y = [paths[i] for i in test_idx], [labels[i] for i in test_idx]
    if not classes or not train_p or not test_p:
        raise datafiles.DataFileError(f"data set 'image_folder': expected class folders with images under {root} "
                                      f"(or under {root / 'train'} and {root / 'test'}). robbench never downloads data.")
    train = LazyImages(train_p)
    test = LazyImages(test_p, train.size)
    return SplitData(train, _labels(train_y), test, _labels(test_y))  # type: ignore[arg-type]


DATASETS = [
    DatasetSpec("celeba", "CelebA from torchvision's layout (img_align_celeba/, list_eval_partition.txt) in "
                "the data directory; RGB, read lazily", load_celeba, "conv"),
    DatasetSpec("image_folder", "images in class folders (torchvision ImageFolder layout) in the data "
                "directory; train/ and test/ when present; RGB, read lazily", load_image_folder, "conv"),
]


@hookimpl
def register_datasets(register: Callable) -> None:
    for spec in DATASETS:
        register(spec)
