"""Data sets in torchvision's on-disk formats (tiny files built here), and fitting images to a model."""
from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch

from robbench import cli, datafiles
from robbench.imagefit import fit_images, resize_center_crop
from robbench.plugins import get_registries
from robbench.protocols import DataOptions

PIL = pytest.importorskip("PIL.Image")


def _load(name: str, root, **kw):
    return get_registries().datasets.get(name).load(DataOptions(data_dir=root, **kw))


# --- CIFAR-10, python version ----------------------------------------------------------------------
def write_cifar10_python(root, n: int = 3):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        with open(folder / name, "wb") as f:  # the layout torchvision downloads: a dict with bytes keys
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [b"x.png"] * n}, f, protocol=2)
        batches[name] = (data, labels)
    return batches


def test_cifar10_reads_torchvisions_python_version(tmp_path):
    batches = write_cifar10_python(tmp_path)
    split = _load("cifar10", tmp_path)
    assert split.train_x.shape == (15, 3, 32, 32) and split.test_x.shape == (3, 3, 32, 32)
    data, labels = batches["test_batch"]
    assert torch.equal(split.test_x, torch.from_numpy(data.reshape(-1, 3, 32, 32).astype(np.float32) / 255))
    assert split.test_y.tolist() == labels
    assert split.train_y.tolist() == sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar10_python_batches_that_hold_code_are_refused(tmp_path):
    write_cifar10_python(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": [0]}, f, protocol=2)
    with pytest.raises(datafiles.DataFileError, match="refusing to load (posix|os|nt).system"):
        _load("cifar10", tmp_path)


# --- CelebA and ImageFolder ------------------------------------------------------------------------
def _save(path, array: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.fromarray(array).save(path)


def write_celeba(root, sizes=(20, 16)):
    base = root / "celeba"
    rng = np.random.default_rng(1)
    lines = []
    for i, part in enumerate([0, 0, 0, 1, 2, 2]):
        name = f"{i + 1:06d}.jpg"
        _save(base / "img_align_celeba" / name, rng.integers(0, 256, (*sizes, 3), dtype=np.uint8))
        lines.append(f"{name} {part}")
    (base / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")


def test_celeba_reads_torchvisions_layout_lazily(tmp_path):
    write_celeba(tmp_path)
    split = _load("celeba", tmp_path)
    assert tuple(split.train_x.shape) == (3, 3, 20, 16) and len(split.test_x) == 2
    batch = split.test_x[[1, 0]]
    assert batch.shape == (2, 3, 20, 16) and 0 <= float(batch.min()) and float(batch.max()) <= 1
    with PIL.open(tmp_path / "celeba" / "img_align_celeba" / "000006.jpg") as img:
        ref = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
    assert torch.equal(batch[0], ref)


def test_image_folder_uses_train_test_and_sorted_class_names(tmp_path):
    rng = np.random.default_rng(2)
    images = {}
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("dog", "cat"):
            for i in range(n):
                arr = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
                _save(tmp_path / split / cls / f"{i}.png", arr)
                images[(split, cls, i)] = arr
    data = _load("image_folder", tmp_path)
    assert tuple(data.train_x.shape) == (6, 3, 6, 6) and tuple(data.test_x.shape) == (4, 3, 6, 6)
    assert data.test_y.tolist() == [0, 0, 1, 1]  # cat = 0, dog = 1, as torchvision's ImageFolder
    expected = torch.from_numpy(images[("test", "dog", 1)].astype(np.float32) / 255).permute(2, 0, 1)
    assert torch.equal(data.test_x[3], expected)


def test_image_folder_without_splits_is_split_by_class(tmp_path):
    rng = np.random.default_rng(3)
    for cls in ("a", "b"):
        for i in range(5):
            _save(tmp_path / cls / f"{i}.png", rng.integers(0, 256, (4, 4), dtype=np.uint8))  # grey -> RGB
    data = _load("image_folder", tmp_path, test_fraction=0.2)
    assert len(data.test_x) == 2 and sorted(data.test_y.tolist()) == [0, 1] and len(data.train_x) == 8
    assert data.test_x[[0]].shape == (1, 3, 4, 4)


def test_missing_celeba_files_are_named(tmp_path):
    with pytest.raises(datafiles.DataFileError, match="list_eval_partition.txt"):
        _load("celeba", tmp_path)


def test_run_on_a_celeba_root_writes_a_leaderboard(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBBENCH_CACHE", str(tmp_path / "cache"))
    write_celeba(tmp_path / "data")
    out = tmp_path / "run"
    code = cli.main(["run", "--dataset", "celeba", "--data-dir", str(tmp_path / "data"), "--models",
                     "linear_gaussian", "--estimators", "encoder_stats", "--points", "2", "--backend", "torch",
                     "--out", str(out), "--no-progress"])
    assert code == 0
    (rec,) = json.loads((out / "leaderboard.json").read_text())["rows"]
    assert rec["points"] == 2 and rec["failed"] == 0


# --- fitting images to a model ---------------------------------------------------------------------
def test_resize_center_crop_and_range_mapping():
    x = torch.arange(2 * 1 * 4 * 6, dtype=torch.float32).view(2, 1, 4, 6) / 48
    crop = resize_center_crop(x, (4, 4))
    assert torch.equal(crop, x[..., 1:5])  # same height: only the centre columns are cut
    fitted = fit_images(x, (0.0, 1.0), (3, 2, 2), (-1.0, 1.0))
    assert fitted.shape == (2, 3, 2, 2)
    assert torch.equal(fitted[:, 0], fitted[:, 2])  # grey repeated into RGB
    assert float(fitted.min()) >= -1 and float(fitted.max()) <= 1
    assert torch.allclose(fit_images(torch.ones(1, 1, 2, 2), (0.0, 1.0), (1, 2, 2), (-1.0, 1.0)),
                          torch.ones(1, 1, 2, 2))
    with pytest.raises(ValueError, match="resizes"):
        fit_images(torch.ones(1, 5), (0.0, 1.0), (1, 2, 2), (0.0, 1.0))


def test_a_second_load_of_an_unchanged_folder_opens_no_image_and_a_changed_file_is_rechecked(tmp_path, monkeypatch):
    """Every load (also --dry-run) opened every image file to check it (CelebA: ~182k files). The result is
    now kept in the cache under a fingerprint of the file list (paths, sizes, modification times): an
    unchanged folder is not opened again (but for the first image, whose size sets the set's), and a file
    that changed is checked again, so a damaged one is still named when the set loads."""
    monkeypatch.setenv("ROBBENCH_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(4)
    root = tmp_path / "images"
    for cls in ("a", "b"):
        for i in range(5):
            _save(root / cls / f"{i}.png", rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    opened = []
    real_open = PIL.open

    def counting_open(fp, *args, **kwargs):
        opened.append(str(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(PIL, "open", counting_open)
    first = _load("image_folder", root, test_fraction=0.2)
    assert len(set(opened)) == 10  # every file checked
    opened.clear()
    second = _load("image_folder", root, test_fraction=0.2)
    assert len(opened) == 1 and torch.equal(first.test_x[:], second.test_x[:])  # the size probe only
    opened.clear()
    damaged = root / "b" / "3.png"
    damaged.write_bytes(damaged.read_bytes()[:40])  # cut short: another size
    with pytest.raises(datafiles.DataFileError, match=f"image file {damaged} cannot be read"):
        _load("image_folder", root, test_fraction=0.2)
    _save(damaged, rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    opened.clear()
    _load("image_folder", root, test_fraction=0.2)
    assert str(damaged) in opened  # repaired, checked again, and then remembered
    opened.clear()
    _load("image_folder", root, test_fraction=0.2)
    assert len(opened) == 1
