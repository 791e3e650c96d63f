"""CIFAR-10 from torchvision's ``cifar-10-batches-py`` files, with the reference preprocessing.

Reference (SACT ``cifar_input.py``): train = zero-pad to 36x36, random 32x32 crop,
random horizontal flip, per-image standardisation of the [0, 255] values;
test = standardisation only.

The batches are Python pickles. They are read with a restricted unpickler
(:func:`read_cifar_batch`) that admits only what real CIFAR-10 files contain --
dicts, lists, strings, bytes, numbers and numpy arrays rebuilt by numpy's own
reconstruction functions -- so a file that names any other callable (the way a pickle
runs code) is refused before anything runs.
"""

from __future__ import annotations

import codecs
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import transforms as T

from ..errors import DataError
from .transforms import cifar_preprocess

__all__ = ["CIFAR10", "CIFAR10_CLASSES", "cifar_eval_transform", "cifar_train_transform", "read_cifar_batch"]

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
_HINT = (
    "expected torchvision's cifar-10-batches-py layout: extract "
    "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz into the root, "
    "or run torchvision.datasets.CIFAR10(root, download=True)"
)


def cifar_train_transform() -> Callable[[torch.Tensor], torch.Tensor]:
    """Reference training augmentation: ``uint8 [3,32,32]`` -> standardised float ``[3,32,32]``.

    Zero-pad by 2 (36x36), random 32x32 crop, random horizontal flip (torch's
    global RNG), then :func:`~sact.data.transforms.cifar_preprocess`.
    """
    return T.Compose([T.RandomCrop(32, padding=2, fill=0), T.RandomHorizontalFlip(), cifar_preprocess()])


def cifar_eval_transform() -> Callable[[torch.Tensor], torch.Tensor]:
    """Reference evaluation: per-image standardisation only (:func:`cifar_preprocess`)."""
    return cifar_preprocess()


def _reconstruct(subtype, shape, dtype):
    """numpy's ``_reconstruct`` as numpy's own pickles call it (an empty ndarray, filled by its state)."""
    if subtype is not np.ndarray or tuple(shape) != (0,):
        raise pickle.UnpicklingError("numpy array reconstruction with unexpected arguments")
    return _NP_RECONSTRUCT(np.ndarray, (0,), dtype)


def _latin1_encode(text, encoding="utf-8"):
    """``_codecs.encode`` as Python 3 protocol-2 pickles use it for bytes (latin-1 only)."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"bytes encoded as {encoding!r}")
    return codecs.encode(text, "latin1")


_NP_RECONSTRUCT = np.ndarray((0,)).__reduce__()[0]  # numpy.(_)core.multiarray._reconstruct
_NP_FROMBUFFER = np.zeros(1, np.uint8).__reduce_ex__(5)[0]  # numpy.(_)core.numeric._frombuffer
_NP_SCALAR = np.uint8(0).__reduce__()[0]  # numpy.(_)core.multiarray.scalar
_ALLOWED = {
    **{(mod, "_reconstruct"): _reconstruct for mod in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(mod, "scalar"): _NP_SCALAR for mod in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(mod, "_frombuffer"): _NP_FROMBUFFER for mod in ("numpy.core.numeric", "numpy._core.numeric")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _CifarUnpickler(pickle.Unpickler):
    """Admits only the globals real CIFAR-10 batches reference (numpy arrays, bytes)."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused to load global '{module}.{name}' (not part of a CIFAR-10 batch)") from None


def read_cifar_batch(path: str | Path) -> dict:
    """Reads one CIFAR-10 python batch (or ``batches.meta``) without running any code.

    Returns:
        The batch dict with ``str`` keys (``data``, ``labels``, ``label_names``...).

    Raises:
        FileNotFoundError: no such file.
        DataError: the file is not a CIFAR-10 batch: corrupt, truncated, or it names a
            callable other than numpy's array reconstruction (a pickle that would run
            code); nothing of it runs.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 file {path} not found; {_HINT}")
    try:
        with open(path, "rb") as f:
            d = _CifarUnpickler(f, encoding="bytes").load()
    except Exception as e:  # truncated / forged pickles raise many types
        raise DataError(f"{path} is not a CIFAR-10 batch: {type(e).__name__}: {e}") from e
    if not isinstance(d, dict):
        raise DataError(f"{path} is not a CIFAR-10 batch: holds a {type(d).__name__}, not a dict")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}


class CIFAR10(Dataset):
    """CIFAR-10 from pickled batches (``data_batch_1..5``, ``test_batch``, ``batches.meta``).

    Args:
        root: the ``cifar-10-batches-py`` folder, or a folder containing it.
        train: the 50000 training images, else the 10000 test images.
        transform: applied to the image; see :func:`cifar_train_transform`,
            :func:`cifar_eval_transform`. None returns the raw uint8 tensor.

    Items are ``(image, label)``: image uint8 ``[3, 32, 32]`` before the transform
    (float ``[3, 32, 32]`` after the reference ones), label an int 0..9.

    Raises:
        FileNotFoundError: a batch file is missing (the message names it).
        DataError: a batch is corrupt, forged (see :func:`read_cifar_batch`) or has the
            wrong layout.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        train: bool,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        folder = Path(root).expanduser()
        if (folder / "cifar-10-batches-py").is_dir():
            folder = folder / "cifar-10-batches-py"
        names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        data, labels = [], []
        for name in names:
            batch = read_cifar_batch(folder / name)
            x, y = batch.get("data"), batch.get("labels")
            ok = isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 2 and x.shape[1] == 3072
            ok = ok and isinstance(y, (list, np.ndarray)) and len(y) == len(x)
            ok = ok and all(type(v) is int or isinstance(v, np.integer) for v in y)
            ok = ok and (len(y) == 0 or 0 <= min(y) and max(y) <= 9)
            if not ok:
                raise DataError(f"{folder / name}: expected uint8 data [N,3072] and N labels in 0..9")
            y = np.asarray(y, dtype=np.int64)
            data.append(x.reshape(-1, 3, 32, 32))
            labels.append(y)
        self.data = np.concatenate(data)
        self.targets = np.concatenate(labels)
        meta = folder / "batches.meta"
        names = read_cifar_batch(meta).get("label_names") if meta.is_file() else None
        if names is not None and not (isinstance(names, list) and len(names) == 10
                                      and all(isinstance(n, (str, bytes)) for n in names)):
            raise DataError(f"{meta}: label_names must be a list of 10 names")
        names = [n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names or ()]
        self.classes = tuple(names) if names else CIFAR10_CLASSES
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = torch.from_numpy(self.data[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])
