"""Fashion-MNIST files: idx reader/writer, lookup order, real data."""

import gzip

import numpy as np
import pytest

from sact.data import fashion_mnist as fm

NAMES = fm._ALL_FILES


def write_fake(folder, n_train=5, n_test=3, gz=True):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        fm.write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        fm.write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", rng.integers(0, 10, n, dtype=np.uint8))
    return folder


@pytest.fixture
def no_debian(monkeypatch, tmp_path):
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "no-debian")


@pytest.mark.parametrize("suffix", [".gz", ""])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_round_trip(tmp_path, suffix, dtype):
    a = (np.arange(2 * 3 * 4) * 7 - 5).astype(dtype).reshape(2, 3, 4)
    path = fm.write_idx(tmp_path / f"x-idx3-ubyte{suffix}", a)
    b = fm.read_idx(path)
    assert b.dtype == a.dtype and b.shape == (2, 3, 4)
    np.testing.assert_array_equal(a, b)


def test_idx_header_layout(tmp_path):
    path = fm.write_idx(tmp_path / "lab", np.array([1, 2, 3], np.uint8))
    assert path.read_bytes() == bytes([0, 0, 8, 1, 0, 0, 0, 3, 1, 2, 3])  # magic 2049 as in MNIST


def test_idx_corrupt(tmp_path):
    bad_magic = tmp_path / "bad"
    bad_magic.write_bytes(bytes([0x1F, 0x8B, 8, 1, 0, 0, 0, 1, 7]))
    with pytest.raises(ValueError, match="magic number"):
        fm.read_idx(bad_magic)
    truncated = tmp_path / "short"
    truncated.write_bytes(bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 28, 0, 0, 0, 28]) + bytes(100))
    with pytest.raises(ValueError, match=r"shape \(2, 28, 28\)"):
        fm.read_idx(truncated)
    not_gzip = tmp_path / "x.gz"
    not_gzip.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="corrupt gzip"):
        fm.read_idx(not_gzip)
    with pytest.raises(ValueError, match="dtype"):
        fm.write_idx(tmp_path / "y", np.zeros(3, np.uint64))


@pytest.mark.parametrize("layout", [".", "FashionMNIST/raw"])
@pytest.mark.parametrize("gz", [True, False])
def test_find_and_load_fake(tmp_path, no_debian, layout, gz):
    folder = write_fake(tmp_path / "d" / layout, gz=gz)
    assert fm.find_fashion_mnist(tmp_path / "d").resolve() == folder.resolve()
    images, labels = fm.load_fashion_mnist("train", tmp_path / "d")
    assert images.shape == (5, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (5,) and labels.dtype == np.int64
    assert not images.flags.writeable  # shared cache
    raw = fm.read_idx(fm._file(folder, "t10k-images-idx3-ubyte"))
    np.testing.assert_array_equal(fm.load_fashion_mnist("test", tmp_path / "d")[0], raw)
    assert fm.load_fashion_mnist("train", tmp_path / "d")[0] is images  # lru cache


def test_not_found_message_names_all_options(tmp_path, no_debian):
    with pytest.raises(FileNotFoundError) as info:
        fm.find_fashion_mnist(tmp_path / "empty")
    message = str(info.value)
    for option in ("--data-dir", "apt-get install dataset-fashion-mnist", "--download"):
        assert option in message
    with pytest.raises(FileNotFoundError):
        fm.find_fashion_mnist()


def test_debian_dir_only_without_a_named_folder(tmp_path, monkeypatch):
    debian = write_fake(tmp_path / "debian")
    monkeypatch.setattr(fm, "DEBIAN_DIR", debian)
    assert fm.find_fashion_mnist() == debian
    # a mistyped --data-dir is an error naming it, never a silent switch to the system copy
    with pytest.raises(FileNotFoundError, match="elsewhere does not exist"):
        fm.find_fashion_mnist(tmp_path / "elsewhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="does not hold"):
        fm.find_fashion_mnist(tmp_path / "empty")


def test_load_validation(tmp_path, no_debian):
    folder = write_fake(tmp_path / "d")
    with pytest.raises(ValueError, match="'val'"):
        fm.load_fashion_mnist("val", folder)
    fm.write_idx(folder / "train-labels-idx1-ubyte.gz", np.zeros(4, np.uint8))  # 5 images, 4 labels
    with pytest.raises(ValueError, match="expected 5 uint8 labels"):
        fm.load_fashion_mnist("train", folder)
    with gzip.open(folder / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1, 0, 0, 0, 3, 1, 2, 12]))
    with pytest.raises(ValueError, match="label 12"):
        fm.load_fashion_mnist("test", folder)


HAVE_REAL = (fm.DEBIAN_DIR / "train-images-idx3-ubyte.gz").exists()


@pytest.mark.skipif(not HAVE_REAL, reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    for split, n in (("train", 60000), ("test", 10000)):
        images, labels = fm.load_fashion_mnist(split)
        assert images.shape == (n, 28, 28) and images.dtype == np.uint8
        assert labels.shape == (n,) and labels.dtype == np.int64
        assert np.bincount(labels).tolist() == [n // 10] * 10  # balanced classes
        assert images.max() == 255 and images.min() == 0
    assert len(fm.FASHION_MNIST_CLASSES) == 10
