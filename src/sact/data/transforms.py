"""Serialisable preprocessing (:class:`Preprocess`) and the shared image maths.

A :class:`Preprocess` is what checkpoints store (``to_dict``) and what inference
code uses to turn any image (PIL of any mode, tensor or numpy array) into a
model input ``[C, H, W]``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Preprocess",
    "central_crop_box",
    "cifar_preprocess",
    "cluttered_preprocess",
    "imagenet_preprocess",
    "per_image_standardize",
    "to_float_image",
    "torchvision_preprocess",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_KINDS = ("unit", "standardize", "inception", "normalize")
_RESIZES = ("square", "shorter")
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # scaled by 1/65535
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's "L"


def per_image_standardize(x: torch.Tensor) -> torch.Tensor:
    """TF ``per_image_standardization``: ``(x - mean) / max(std, 1/sqrt(n))``.

    Args:
        x: ``[C, H, W]`` or ``[B, C, H, W]``; statistics are over the last 3 dims
            (``n = C*H*W``, population std).

    Returns:
        Float tensor of the same shape.
    """
    x = x.float()
    dims = (-3, -2, -1)
    n = x.shape[-3] * x.shape[-2] * x.shape[-1]
    mean = x.mean(dim=dims, keepdim=True)
    std = x.std(dim=dims, keepdim=True, correction=0)
    return (x - mean) / std.clamp_min(1.0 / math.sqrt(n))


def central_crop_box(height: int, width: int, fraction: float) -> tuple[int, int, int, int]:
    """The box TF ``tf.image.central_crop(image, fraction)`` keeps.

    ``start = int((size - size * fraction) / 2)``, ``kept = size - 2 * start`` for
    each of height and width (e.g. 100 px at 0.875: start 6, kept 88).

    Returns:
        ``(top, left, crop_height, crop_width)``.

    Raises:
        ValueError: ``fraction`` not in (0, 1].
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"central crop fraction must be in (0, 1], got {fraction}")
    top = int((height - height * fraction) / 2)
    left = int((width - width * fraction) / 2)
    return top, left, height - 2 * top, width - 2 * left


def _pil_to_tensor(image: Image.Image, in_chans: int) -> torch.Tensor:
    if image.mode in _WIDE_MODES or image.mode == "F":
        a = np.asarray(image).astype(np.float32)
        a = np.clip(a / 65535.0 if image.mode != "F" else a, 0.0, 1.0)
        return torch.from_numpy(a)[None]
    target = "L" if in_chans == 1 else "RGB"
    if image.mode != target:
        try:
            image = image.convert(target)
        except ValueError:  # e.g. no direct CMYK -> L conversion
            image = image.convert("RGB").convert(target)
    a = np.asarray(image, dtype=np.uint8).astype(np.float32) / 255.0
    return torch.from_numpy(a[None] if a.ndim == 2 else a.transpose(2, 0, 1).copy())


def _array_to_tensor(image: torch.Tensor | np.ndarray) -> torch.Tensor:
    is_numpy = isinstance(image, np.ndarray)
    x = torch.from_numpy(np.ascontiguousarray(image)) if is_numpy else image
    if x.ndim == 2:
        x = x[None]
    elif x.ndim == 3 and is_numpy and x.shape[-1] in (1, 3, 4):
        x = x.permute(2, 0, 1)  # numpy images are [H, W, C]
    if x.ndim != 3 or x.shape[0] not in (1, 3, 4):
        raise ValueError(f"expected an image [H,W], [C,H,W] (tensor) or [H,W,C] (numpy), got {tuple(image.shape)}")
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    if x.dtype == torch.uint16 or (is_numpy and image.dtype == np.uint16):
        return x.to(torch.int32).float() / 65535.0
    if x.dtype == torch.bool or x.is_floating_point():
        return x.float()
    raise ValueError(f"unsupported image dtype {image.dtype}")


def to_float_image(image: Image.Image | torch.Tensor | np.ndarray, in_chans: int) -> torch.Tensor:
    """Converts an image to float ``[in_chans, H, W]`` in [0, 1].

    PIL: modes ``I;16*`` and ``I`` are divided by 65535, ``F`` is taken as [0, 1];
    every other mode goes through PIL's ``convert("L")`` / ``convert("RGB")``, so
    alpha (RGBA, LA, PA) is dropped, not composited. Tensors are ``[H,W]`` or
    ``[C,H,W]``, numpy arrays ``[H,W]`` or ``[H,W,C]``; uint8 is divided by 255,
    uint16 by 65535, floats are assumed in [0, 1]. A 4th channel is dropped,
    3 -> 1 channel uses the ITU-R 601-2 luma weights (like PIL), 1 -> 3 repeats.

    Raises:
        ValueError: bad ``in_chans``, shape or dtype.
    """
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
    if isinstance(image, Image.Image):
        x = _pil_to_tensor(image, in_chans)
    elif isinstance(image, (torch.Tensor, np.ndarray)):
        x = _array_to_tensor(image)
    else:
        raise ValueError(f"unsupported image type {type(image).__name__}")
    if x.shape[0] == 4:
        x = x[:3]
    if x.shape[0] == 3 and in_chans == 1:
        x = torch.tensordot(x.new_tensor(_LUMA), x, dims=1)[None]
    elif x.shape[0] == 1 and in_chans == 3:
        x = x.expand(3, -1, -1)
    return x.contiguous()


@dataclass(frozen=True)
class Preprocess:
    """How to turn an image into a model input; serialisable with :meth:`to_dict`.

    Steps: convert to float ``[in_chans, H, W]`` in [0, 1] (:func:`to_float_image`),
    crop/resize, then map values according to ``kind``.

    Attributes:
        kind: ``"unit"`` keep [0, 1]; ``"standardize"`` TF per-image standardisation of
            the [0, 255] values (CIFAR); ``"inception"`` map to [-1, 1]; ``"normalize"``
            ``(x - mean) / std`` (torchvision style).
        in_chans: 1 (greyscale) or 3 (RGB).
        image_size: output side, or None to keep the size (after any central crop).
        central_crop: fraction of height and width kept around the centre, or None.
        mean: per-channel mean, only (and required) for ``kind="normalize"``.
        std: per-channel std, only (and required) for ``kind="normalize"``.
        resize: ``"square"`` (TF/reference): TF ``central_crop`` then TF1's bilinear
            resize (:func:`tf1_resize_bilinear`) to ``image_size`` x ``image_size``
            (aspect not kept, no antialiasing);
            ``"shorter"`` (torchvision): antialiased bilinear resize of the shorter
            side to ``round(image_size / central_crop)``, then centre crop
            ``image_size`` x ``image_size``.
    """

    kind: str
    in_chans: int = 3
    image_size: int | None = None
    central_crop: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    resize: str = "square"

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {self.kind!r}")
        if self.in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {self.in_chans!r}")
        if self.image_size is not None and (not isinstance(self.image_size, int) or self.image_size < 1):
            raise ValueError(f"image_size must be a positive int or None, got {self.image_size!r}")
        if self.central_crop is not None and not 0.0 < self.central_crop <= 1.0:
            raise ValueError(f"central_crop must be in (0, 1] or None, got {self.central_crop!r}")
        if self.resize not in _RESIZES:
            raise ValueError(f"resize must be one of {_RESIZES}, got {self.resize!r}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if (value is None) != (self.kind != "normalize"):
                raise ValueError(f"{name} must be given exactly when kind='normalize', got {name}={value!r}")
            if value is not None:
                value = tuple(float(v) for v in value)
                if len(value) != self.in_chans:
                    raise ValueError(f"{name} needs {self.in_chans} values, got {value!r}")
                object.__setattr__(self, name, value)
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std!r}")

    def __call__(self, image: Image.Image | torch.Tensor | np.ndarray) -> torch.Tensor:
        """Preprocesses one image.

        Args:
            image: PIL image (any mode), tensor ``[H,W]``/``[C,H,W]`` or numpy
                ``[H,W]``/``[H,W,C]``; see :func:`to_float_image`.

        Returns:
            Float32 tensor ``[in_chans, H', W']``.
        """
        x = to_float_image(image, self.in_chans)
        x = self._resize(x)
        if self.kind == "standardize":
            x = per_image_standardize(x * 255.0)
        elif self.kind == "inception":
            x = x * 2.0 - 1.0
        elif self.kind == "normalize":
            x = (x - x.new_tensor(self.mean)[:, None, None]) / x.new_tensor(self.std)[:, None, None]
        return x.contiguous()

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if self.resize == "shorter" and self.image_size is not None:
            short = round(self.image_size / (self.central_crop or 1.0))
            size = (short, max(1, int(short * w / h))) if h <= w else (max(1, int(short * h / w)), short)
            x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
            s = self.image_size
            top, left = int(round((size[0] - s) / 2)), int(round((size[1] - s) / 2))
            return x[:, top : top + s, left : left + s]
        if self.central_crop is not None:
            top, left, ch, cw = central_crop_box(h, w, self.central_crop)
            x = x[:, top : top + ch, left : left + cw]
        if self.image_size is not None:
            x = tf1_resize_bilinear(x, (self.image_size, self.image_size))
        return x

    def to_dict(self) -> dict:
        """Plain JSON/YAML-friendly dict (tuples become lists)."""
        d = asdict(self)
        for name in ("mean", "std"):
            if d[name] is not None:
                d[name] = list(d[name])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: unknown keys or invalid values.
        """
        if not isinstance(d, dict):
            raise ValueError(f"Preprocess.from_dict expects a dict, got {type(d).__name__}")
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown Preprocess keys {sorted(unknown)}")
        return cls(**d)


def tf1_resize_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """TF1 ``tf.image.resize_bilinear(align_corners=False)``, which the reference used.

    Unlike PyTorch's bilinear resize it has no half-pixel offset: output pixel ``i`` samples
    the input at ``i * in / out``. ``x`` ``[C, H, W]`` -> ``[C, size[0], size[1]]``.
    """
    h, w = x.shape[-2:]
    oh, ow = size

    def axis(n_in: int, n_out: int):
        src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
        i0 = src.floor().long().clamp(max=n_in - 1)
        i1 = (i0 + 1).clamp(max=n_in - 1)
        return i0, i1, (src - i0).to(x.dtype)

    y0, y1, fy = axis(h, oh)
    x0, x1, fx = axis(w, ow)
    top = x[:, y0][:, :, x0] * (1 - fx) + x[:, y0][:, :, x1] * fx
    bottom = x[:, y1][:, :, x0] * (1 - fx) + x[:, y1][:, :, x1] * fx
    return top * (1 - fy)[:, None] + bottom * fy[:, None]


def cluttered_preprocess(image_size: int | None = None) -> Preprocess:
    """Cluttered Fashion-MNIST: greyscale in [0, 1] (canvas size kept unless given)."""
    return Preprocess(kind="unit", in_chans=1, image_size=image_size)


def cifar_preprocess() -> Preprocess:
    """CIFAR reference evaluation: RGB, per-image standardisation of [0, 255] values."""
    return Preprocess(kind="standardize", in_chans=3)


def imagenet_preprocess(image_size: int = 224) -> Preprocess:
    """ImageNet reference (Inception) evaluation: TF central crop 87.5%, bilinear
    resize to ``image_size`` x ``image_size``, values in [-1, 1]."""
    return Preprocess(kind="inception", in_chans=3, image_size=image_size, central_crop=0.875)


def torchvision_preprocess(image_size: int = 224) -> Preprocess:
    """torchvision ImageNet weights: resize shorter side to ``image_size / 0.875``
    (256 for 224), centre crop, normalise with :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD`."""
    return Preprocess(
        kind="normalize",
        in_chans=3,
        image_size=image_size,
        central_crop=0.875,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        resize="shorter",
    )
