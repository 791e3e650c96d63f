"""ImageNet-style class folders with the reference (Inception) preprocessing.

An image that cannot be read (corrupt, truncated, not an image, above the pixel cap of
:func:`sact.data.images.open_image`) is skipped with a warning naming it: the item is
``None`` and :func:`sact.engine.datasets.collate` leaves it out of the batch and counts
it. With ``strict=True`` the first such image raises
:class:`~sact.data.images.UnreadableImage` instead.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable
from pathlib import Path

from torchvision import transforms as T
from torchvision.datasets import ImageFolder

from .folder import check_class_count, image_extensions
from .images import DEFAULT_MAX_PIXELS, UnreadableImage, open_image
from .transforms import Preprocess, imagenet_preprocess

__all__ = ["ImageNetFolder", "imagenet_eval_transform", "imagenet_train_transform"]


def imagenet_train_transform(image_size: int = 224, *, preprocess: Preprocess | None = None) -> Callable:
    """Inception training augmentation: PIL image (or float ``[3, H, W]`` tensor in [0, 1])
    -> float ``[C, S, S]``, values mapped as ``preprocess`` says (default Inception [-1, 1], 3 channels).

    Stand-ins for the TF reference (``inception_preprocessing.py``):
    ``RandomResizedCrop(S, scale=(0.05, 1), ratio=(0.75, 1.33))`` (bilinear) for
    ``sample_distorted_bounding_box`` (area [0.05, 1], aspect [0.75, 1.33]; TF also
    picks a random resize method); random horizontal flip; ``ColorJitter(
    brightness=32/255, contrast=0.5, saturation=0.5, hue=0.2)`` in random order
    (torchvision's brightness is a factor in [1 - 32/255, 1 + 32/255], TF's an
    additive delta of the same size); then the value mapping of ``preprocess`` (its
    ``kind``, ``in_chans``, ``mean``/``std``; its crop and resize are not applied):
    [-1, 1] by default, torchvision's mean/std for torchvision-initialised models.
    """
    value = Preprocess(kind="inception", in_chans=3) if preprocess is None else \
        dataclasses.replace(preprocess, image_size=None, central_crop=None)
    return T.Compose([
        T.RandomResizedCrop(image_size, scale=(0.05, 1.0), ratio=(0.75, 1.33),
                            interpolation=T.InterpolationMode.BILINEAR),
        T.RandomHorizontalFlip(),
        T.ColorJitter(brightness=32 / 255, contrast=0.5, saturation=0.5, hue=0.2),
        value,
    ])  # fmt: skip


def imagenet_eval_transform(image_size: int = 224) -> Preprocess:
    """Inception evaluation: TF ``central_crop(0.875)``, bilinear resize to S x S, [-1, 1]."""
    return imagenet_preprocess(image_size)


class ImageNetFolder(ImageFolder):
    """``root/<split>/<class>/<image files>`` class folders (classes sorted by folder name;
    any format Pillow reads). ``sact train --dataset imagenet|folder`` uses
    :class:`sact.data.ImageFolderDataset` (same files, plus a validation split).

    Args:
        root: folder holding ``train/`` and/or ``val/``.
        split: ``"train"`` or ``"val"``.
        transform: applied to the RGB PIL image; default the reference transform
            of the split (:func:`imagenet_train_transform` / :func:`imagenet_eval_transform`).
        label_offset: added to every label; 1 for the reference's 1001-class
            convention (index 0 = background).
        image_size: output side of the default transforms.
        strict: raise on an unreadable image instead of skipping it.
        max_pixels: images above this many pixels are unreadable.

    Items are ``(image [3, S, S] in [-1, 1], label)`` with the default transforms, or
    ``None`` for an unreadable image (skipped with a warning naming it).

    Raises:
        ValueError: bad split, label_offset or image_size.
        FileNotFoundError: ``root/<split>`` is missing, or a class folder holds no image.
        DataError: ``root/<split>`` holds a single class folder.
        UnreadableImage: (when an item is read, ``strict=True``) the image and why.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        split: str = "train",
        transform: Callable | None = None,
        label_offset: int = 0,
        image_size: int = 224,
        strict: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if not isinstance(label_offset, int) or label_offset < 0:
            raise ValueError(f"label_offset must be a non-negative int, got {label_offset!r}")
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        folder = Path(root).expanduser() / split
        if not folder.is_dir():
            raise FileNotFoundError(f"ImageNet folder {folder} not found (expected {folder}/<class>/<image files>)")
        if transform is None:
            make = imagenet_train_transform if split == "train" else imagenet_eval_transform
            transform = make(image_size)
        if not isinstance(max_pixels, int) or max_pixels < 1:
            raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")
        super().__init__(str(folder), transform=transform, is_valid_file=_is_image_file,
                         loader=functools.partial(_rgb_image, max_pixels=max_pixels))
        check_class_count(folder, self.classes)
        self.split, self.label_offset, self.strict = split, label_offset, strict

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            image = self.loader(path)
        except UnreadableImage as e:
            if self.strict:
                raise
            warnings.warn(f"skipped {e}", stacklevel=2)
            return None
        if self.transform is not None:
            image = self.transform(image)
        return image, label + self.label_offset


def _is_image_file(path: str) -> bool:
    """Any format Pillow opens (not only torchvision's list of extensions)."""
    name = Path(path).name
    return not name.startswith(".") and Path(name).suffix.lower() in image_extensions()


def _rgb_image(path: str, *, max_pixels: int):
    image = open_image(path, max_pixels=max_pixels)
    return image if image.mode == "RGB" else image.convert("RGB")
