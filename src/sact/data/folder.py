"""Your own images: class folders of any image type Pillow reads.

Two layouts (``ROOT`` is what ``--data-dir`` names):

* ``ROOT/train/<class>/...`` and ``ROOT/val/<class>/...`` -- the classes are the
  folder names under ``train/`` (sorted); ``val/`` may lack some of them (or hold an
  empty folder for one), but may not add others;
* ``ROOT/<class>/...`` (or only ``ROOT/train/<class>/...``) with a validation fraction:
  each class's images are shuffled with a fixed seed and ``round(fraction * n)`` of
  them (at least one, and never all, for a class of two or more) are held out, so the
  split depends only on the file names, the fraction and the seed.

The folder that defines the classes (``train/``, the single tree, or ``val/`` alone when
evaluating) must hold at least two class folders, each with at least one image: one
class would train to a meaningless 100% top-1, and an empty folder would be a class no
image ever has (:func:`check_class_count`).

Files are found recursively under each class folder, sorted; hidden entries (``.x``) and
files whose extension Pillow does not register are ignored. An image that cannot be
decoded is skipped with a warning naming it (the item is ``None``; see
:func:`sact.engine.datasets.collate`), or raises with ``strict=True``.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from ..errors import DataError
from .images import DEFAULT_MAX_PIXELS, UnreadableImage, open_image
from .transforms import to_float_image

__all__ = ["image_extensions", "visible_files", "folder_images", "list_class_folders", "check_class_count", "split_by_class", "class_folder_splits",
           "ImageFolderDataset"]


@functools.lru_cache(maxsize=1)
def image_extensions() -> frozenset[str]:
    """Lower-case file extensions (with the dot) of every format Pillow can open here."""
    from PIL import Image

    return frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def visible_files(folder: Path) -> list[Path]:
    """The files under ``folder``, recursively and sorted, hidden entries (``.name``) and what is inside them skipped."""
    return sorted(f for f in folder.rglob("*")
                  if f.is_file() and not any(part.startswith(".") for part in f.relative_to(folder).parts))


def folder_images(folder: Path, exts: frozenset[str] | None = None) -> list[Path]:
    """:func:`visible_files` of ``folder`` with an image extension (``exts``, default :func:`image_extensions`)."""
    exts = image_extensions() if exts is None else exts
    return [f for f in visible_files(folder) if f.suffix.lower() in exts]


def check_class_count(root: str | Path, classes: Sequence[str]) -> None:
    """A classification dataset needs at least two classes.

    Raises:
        DataError: ``classes`` (found in ``root``) has fewer than two names.
    """
    if len(classes) < 2:
        raise DataError(f"found {len(classes)} class in {root} ({', '.join(classes) or 'none'}); classification needs "
                        f"at least 2 (one folder per class: {root}/<class>/<image files>)")


def list_class_folders(root: str | Path,
                       classes: Sequence[str] | None = None) -> tuple[list[str], list[tuple[str, int]]]:
    """The classes and image files of a class-folder tree.

    Args:
        root: folder holding one sub-folder per class.
        classes: the class list to use (e.g. the training classes for ``val/``); a
            sub-folder outside it is an error, a missing or empty one is fine. Default:
            the sorted sub-folder names, which must be at least two, each holding an image.

    Returns:
        ``(classes, samples)``: ``samples`` are ``(file path, class index)`` pairs, by class
        then path.

    Raises:
        DataError: ``root`` is not a folder, has no class folders, a class folder outside
            ``classes``, or no image file at all; without ``classes``: a single class
            folder, or a class folder without images (named).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder {root} not found")
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise DataError(f"{root} holds no class folders (expected {root}/<class>/<image files>)")
    own = classes is None  # the classes are this folder's: each must be real
    if own:
        classes = found
        check_class_count(root, classes)
    else:
        extra = sorted(set(found) - set(classes))
        if extra:
            raise DataError(f"{root} has class folders the training data lacks: {extra[:5]}")
    exts = image_extensions()
    samples, empty = [], []
    for index, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue
        files = folder_images(folder, exts)
        samples += [(str(f), index) for f in files]
        if not files:
            empty.append(str(folder))
    if not samples:
        raise DataError(f"{root} holds no image files in its class folders (any format Pillow reads: .jpg, .png, ...)")
    if own and empty:
        raise DataError(f"{len(empty)} class folder(s) without images: {', '.join(empty[:5])}"
                        f"{', ...' if len(empty) > 5 else ''}; each would be a class no image has: add images (any "
                        "format Pillow reads) or remove the folder")
    return list(classes), samples


def split_by_class(samples: Sequence[tuple[str, int]], fraction: float, seed: int) -> tuple[list, list]:
    """Splits ``samples`` into ``(train, val)``, class by class, with a fixed seed.

    Each class's files (sorted by path) are shuffled with ``numpy.random.default_rng([seed,
    class])``; the first ``round(fraction * n)`` go to ``val``, clamped to ``[1, n - 1]`` for
    ``n >= 2`` (a class of one image stays in ``train``). Both lists keep the input order.

    Raises:
        ValueError: ``fraction`` not in (0, 1).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
    by_class: dict[int, list[tuple[str, int]]] = {}
    for s in samples:
        by_class.setdefault(s[1], []).append(s)
    held = set()
    for label, items in by_class.items():
        n = len(items)
        k = min(max(round(fraction * n), 1), n - 1) if n >= 2 else 0
        order = np.random.default_rng([seed, label]).permutation(n)
        ordered = sorted(items)  # once: the permutation indexes the sorted list
        held.update(ordered[i][0] for i in order[:k])
    return [s for s in samples if s[0] not in held], [s for s in samples if s[0] in held]


def class_folder_splits(root: str | Path, *, val_fraction: float | None = None, seed: int = 0,
                        require_split_folders: bool = False, need_train: bool = True) -> tuple[list[str], list, list]:
    """``(classes, train samples, val samples)`` of an image-folder dataset (layouts in the module docstring).

    Args:
        root: the dataset folder.
        val_fraction: hold out this share of every class when there is no ``val/``.
        seed: seed of that split.
        require_split_folders: ``train/`` and ``val/`` must exist (the ImageNet layout).
        need_train: False for evaluation only: a ``val/`` folder alone is enough (its
            class folders are the classes; no training samples are returned).

    Raises:
        DataError: a layout that does not fit the arguments (the message says what to pass),
            or a folder without images.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data folder {root} not found")
    train, val = root / "train", root / "val"
    if not need_train and val.is_dir() and not train.is_dir() and val_fraction is None:
        classes, val_samples = list_class_folders(val)
        return classes, [], val_samples
    if train.is_dir() and val.is_dir():
        if val_fraction is not None:
            raise DataError(f"{root} has train/ and val/ folders; val_fraction (--val-fraction) splits a folder "
                            "without val/: drop it")
        classes, train_samples = list_class_folders(train)
        _, val_samples = list_class_folders(val, classes)
        return classes, train_samples, val_samples
    if require_split_folders:
        raise DataError(f"{root} needs train/<class>/ and val/<class>/ folders (dataset imagenet); for other "
                        "layouts use --dataset folder")
    if val_fraction is None:
        raise DataError(f"{root} has no train/ and val/ folders: pass --val-fraction F (e.g. 0.1) to hold out that "
                        "share of every class for evaluation (fixed by the seed), or add a val/ folder")
    classes, samples = list_class_folders(train if train.is_dir() else root)
    train_samples, val_samples = split_by_class(samples, val_fraction, seed)
    if not val_samples:
        raise DataError(f"{root}: val_fraction {val_fraction} holds out no image (every class has a single image)")
    return classes, train_samples, val_samples


class ImageFolderDataset(Dataset):
    """Images from a list of ``(file, class index)`` pairs (see :func:`class_folder_splits`).

    Args:
        samples: ``(path, class index)`` pairs.
        classes: class names, by index.
        transform: applied to the image as a float ``[3, H, W]`` tensor in [0, 1] (any
            Pillow mode is converted, 16-bit ones scaled by 1/65535); e.g. a
            :class:`sact.data.Preprocess`, which also converts to greyscale when its
            ``in_chans`` is 1.
        label_offset: added to every label (1 for the reference's 1001-class models).
        strict: raise on an unreadable image instead of skipping it.
        max_pixels: images above this many pixels are unreadable (decompression bombs).

    Items are ``(transform(image), label + label_offset)``, or ``None`` for an unreadable
    image (skipped with a warning naming it).
    """

    def __init__(self, samples: Sequence[tuple[str, int]], classes: Sequence[str], *, transform: Callable,
                 label_offset: int = 0, strict: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        if not isinstance(label_offset, int) or label_offset < 0:
            raise ValueError(f"label_offset must be a non-negative int, got {label_offset!r}")
        if not isinstance(max_pixels, int) or max_pixels < 1:
            raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")
        self.samples, self.classes = list(samples), list(classes)
        self.targets = [label for _, label in self.samples]
        self.transform, self.label_offset, self.strict, self.max_pixels = transform, label_offset, strict, max_pixels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            image = open_image(path, max_pixels=self.max_pixels)
        except UnreadableImage as e:
            if self.strict:
                raise
            warnings.warn(f"skipped {e}", stacklevel=2)
            return None
        # every mode (16-bit, palette, CMYK, alpha...) -> float [3, H, W] in [0, 1]; the
        # transform's Preprocess converts to greyscale when the model takes one channel
        return self.transform(to_float_image(image, 3)), label + self.label_offset
