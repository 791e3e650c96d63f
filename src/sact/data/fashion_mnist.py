"""Fashion-MNIST: locating the files and reading the idx format with numpy.

The four files (``{train,t10k}-{images-idx3,labels-idx1}-ubyte``, gzipped or
not) are looked up in a user folder, then in the Debian package
``dataset-fashion-mnist``, then optionally downloaded with torchvision.
"""

from __future__ import annotations

import functools
import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

__all__ = [
    "DEBIAN_DIR",
    "FASHION_MNIST_CLASSES",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "read_idx",
    "write_idx",
]

#: Where the Debian package ``dataset-fashion-mnist`` installs the files.
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")

#: The 10 class names, indexed by label.
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_ALL_FILES = _FILES["train"] + _FILES["test"]

# idx type code -> numpy dtype (big-endian on disk).
_IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Reads an idx file (LeCun's MNIST format), gzipped if the name ends in ``.gz``.

    Args:
        path: the file.

    Returns:
        The array, with the shape stored in the header and a native-endian dtype.

    Raises:
        ValueError: if the file is not valid gzip, its magic number is wrong or
            its size does not match its header.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: corrupt gzip file ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path}: bad idx magic number 0x{raw[:4].hex()} (expected 0x0000TTNN with "
            "type TT in 08,09,0b,0c,0d,0e); the file is corrupt or not an idx file"
        )
    ndim, dtype = raw[3], _IDX_DTYPES[raw[2]]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated idx header ({len(raw)} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: corrupt idx file: header says shape {dims} ({expected} data bytes) "
            f"but the file holds {len(raw) - header}"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Writes ``array`` as an idx file (gzipped if the name ends in ``.gz``).

    Args:
        path: the file to write.
        array: uint8, int8, int16, int32, float32 or float64 array, 1 to 255 dims.

    Returns:
        ``path`` as a Path.

    Raises:
        ValueError: for an unsupported dtype.
    """
    path = Path(path)
    array = np.asarray(array)
    codes = {dt.newbyteorder("=").str: code for code, dt in _IDX_DTYPES.items()}
    code = codes.get(array.dtype.newbyteorder("=").str)
    if code is None:
        raise ValueError(f"write_idx: unsupported dtype {array.dtype}")
    data = (
        bytes([0, 0, code, array.ndim])
        + struct.pack(f">{array.ndim}I", *array.shape)
        + array.astype(_IDX_DTYPES[code]).tobytes()
    )
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def _file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / (name + ".gz"), folder / name):
        if candidate.is_file():
            return candidate
    return None


def _has_all(folder: Path) -> bool:
    return all(_file(folder, name) is not None for name in _ALL_FILES)


def find_fashion_mnist(data_dir: str | Path | None = None, *, download: bool = False) -> Path:
    """Finds the folder holding the four Fashion-MNIST files.

    A ``data_dir`` is searched alone (also ``data_dir/FashionMNIST/raw`` and
    ``data_dir/raw``, torchvision's layouts): a folder the user named that lacks the
    files is an error, never a silent switch to another copy. Without ``data_dir``,
    :data:`DEBIAN_DIR` is used. Only if ``download`` is true, torchvision downloads the
    files into ``data_dir`` (default ``~/.cache/sact``) when they are not found.

    Args:
        data_dir: a folder to search first (and to download into).
        download: download with torchvision when nothing is found.

    Returns:
        The folder containing ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``.

    Raises:
        FileNotFoundError: nothing found and ``download`` is false; the message
            names the folders searched and the ways to provide the data.
    """
    candidates = []
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        candidates = [root, root / "FashionMNIST" / "raw", root / "raw"]
        for folder in candidates:
            if _has_all(folder):
                return folder
        if not download:  # a folder the user named is never silently replaced by another
            state = "does not exist" if not root.exists() else "does not hold the four *-ubyte[.gz] files"
            raise FileNotFoundError(
                f"Fashion-MNIST data folder {data_dir} {state} (searched {', '.join(str(p) for p in candidates)}). "
                f"Check the path, or leave out --data-dir to use the system copy in {DEBIAN_DIR} "
                "(`apt-get install dataset-fashion-mnist`), or pass --download to fetch it there with torchvision."
            )
    elif _has_all(DEBIAN_DIR):
        return DEBIAN_DIR
    if download:
        from torchvision.datasets import FashionMNIST

        root = Path(data_dir).expanduser() if data_dir is not None else Path.home() / ".cache" / "sact"
        root.mkdir(parents=True, exist_ok=True)
        FashionMNIST(str(root), train=True, download=True)  # fetches all four files
        folder = root / "FashionMNIST" / "raw"
        if not _has_all(folder):
            raise FileNotFoundError(f"torchvision download did not produce the files in {folder}")
        return folder
    searched = ", ".join(str(p) for p in [*candidates, DEBIAN_DIR])
    raise FileNotFoundError(
        f"Fashion-MNIST not found (searched {searched}). Either pass --data-dir with a folder "
        "holding the four *-ubyte[.gz] files, or run `apt-get install dataset-fashion-mnist`, "
        "or pass --download to fetch it with torchvision."
    )


@functools.lru_cache(maxsize=8)
def _load(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    image_name, label_name = _FILES[split]
    image_file, label_file = _file(folder, image_name), _file(folder, label_name)
    images, labels = read_idx(image_file), read_idx(label_file)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{image_file}: expected uint8 images [N,28,28], got {images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(
            f"{label_file}: expected {len(images)} uint8 labels, got {labels.dtype} {labels.shape}"
        )
    if labels.size and labels.max() > 9:
        raise ValueError(f"{label_file}: label {labels.max()} out of range 0..9")
    labels = labels.astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_fashion_mnist(
    split: str, data_dir: str | Path | None = None, *, download: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Loads one Fashion-MNIST split (cached in-process, arrays are read-only).

    Args:
        split: ``"train"`` (60000 items) or ``"test"`` (10000 items).
        data_dir: see :func:`find_fashion_mnist`.
        download: see :func:`find_fashion_mnist`.

    Returns:
        ``(images, labels)``: uint8 ``[N, 28, 28]`` and int64 ``[N]`` (0..9).

    Raises:
        ValueError: unknown split, or corrupt files.
        FileNotFoundError: see :func:`find_fashion_mnist`.
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = find_fashion_mnist(data_dir, download=download).resolve()
    return _load(folder, split)
