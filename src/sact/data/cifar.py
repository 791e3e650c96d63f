"""CIFAR-10 from torchvision's ``cifar-10-batches-py`` files, with the reference preprocessing.

Reference (SACT ``cifar_input.py``): train = zero-pad to 36x36, random 32x32 crop,
random horizontal flip, per-image standardisation of the [0, 255] values;
test = standardisation only.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import transforms as T

from .transforms import cifar_preprocess

__all__ = ["CIFAR10", "CIFAR10_CLASSES", "cifar_eval_transform", "cifar_train_transform"]

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


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 file {path} not found; {_HINT}")
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")  # trusted data only, like torchvision
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


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
        ValueError: a batch has the wrong layout.
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
            batch = _unpickle(folder / name)
            x = np.asarray(batch.get("data"))
            y = np.asarray(batch.get("labels"), dtype=np.int64)
            if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072 or y.shape != (len(x),):
                raise ValueError(f"{folder / name}: expected uint8 data [N,3072] and N labels")
            data.append(x.reshape(-1, 3, 32, 32))
            labels.append(y)
        self.data = np.concatenate(data)
        self.targets = np.concatenate(labels)
        meta = folder / "batches.meta"
        names = _unpickle(meta).get("label_names") if meta.is_file() else None
        self.classes = tuple(n.decode() if isinstance(n, bytes) else n for n in names) if names else CIFAR10_CLASSES
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = torch.from_numpy(self.data[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])
