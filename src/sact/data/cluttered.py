"""Cluttered Fashion-MNIST: the project's built-in dataset (classification and detection).

Each canvas is black, holds ``num_clutter`` square patches cut from random
*other* Fashion-MNIST items of the same split (dimmed by a random factor), and
one (or several) rescaled items pasted at random positions. Composition is the
pixelwise maximum, so the objects are never darkened by clutter. Sample ``i`` is
a pure function of ``(seed, split, i)``: the same whatever the access order,
worker process or machine.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist

__all__ = [
    "ClutterConfig",
    "ClutteredFashionMNIST",
    "MULTI_OBJECT_CONFIG",
    "MultiObjectClutteredFashionMNIST",
    "detection_collate",
    "mask_to_rle",
    "write_coco",
]

_SPLIT_IDS = {"train": 0, "test": 1}
_ITEM = 28  # Fashion-MNIST item side


@dataclasses.dataclass(frozen=True)
class ClutterConfig:
    """How canvases are drawn.

    Attributes:
        canvas_size: canvas side S in pixels.
        min_scale: smallest item scale; a pasted item's side is ``round(28 * scale)``
            (bilinear resize), at most S.
        max_scale: largest item scale.
        num_clutter: clutter patches per canvas.
        clutter_size: side of the square clutter patches, cut from the central part
            of a random other item of the same split (4 px margin when it fits).
        clutter_intensity: ``(low, high)`` range of the uniform factor that dims each patch.
        mask_threshold: an object pixel (in [0, 1], after resizing) belongs to its mask
            when greater than this.
        min_objects: fewest objects per canvas (multi-object variant only).
        max_objects: most objects per canvas (multi-object variant only).
        max_iou: largest IoU allowed between two objects' boxes (multi-object only);
            an object that cannot be placed in ``max_tries`` tries is left out.
        max_tries: placement tries per object (multi-object only).
    """

    canvas_size: int = 64
    min_scale: float = 0.9
    max_scale: float = 1.6
    num_clutter: int = 6
    clutter_size: int = 8
    clutter_intensity: tuple[float, float] = (0.3, 0.7)
    mask_threshold: float = 0.1
    min_objects: int = 2
    max_objects: int = 4
    max_iou: float = 0.2
    max_tries: int = 50

    def __post_init__(self) -> None:
        problems = self._problems()
        if problems:
            raise ValueError(f"ClutterConfig: invalid {'; '.join(problems)}")
        object.__setattr__(self, "clutter_intensity", tuple(float(v) for v in self.clutter_intensity))

    def _problems(self) -> list[str]:
        """Every field of the wrong type, then every value out of range, as ``name=value (must be ...)``."""
        bad = {}
        for f in dataclasses.fields(self):
            is_type, words = _FIELD_TYPES[f.type]  # the annotation's text (postponed annotations)
            if not is_type(getattr(self, f.name)):
                bad[f.name] = f"{f.name}={getattr(self, f.name)!r} (must be {words})"
        low, high = self.clutter_intensity if "clutter_intensity" not in bad else (0, 0)
        ranges = {  # name: (ok, what is allowed, other fields it reads)
            "canvas_size": (lambda: 8 <= self.canvas_size <= MAX_CANVAS_SIZE, f"in [8, {MAX_CANVAS_SIZE}]", ()),
            "min_scale": (lambda: 0 < self.min_scale <= self.max_scale, "> 0 and <= max_scale", ("max_scale",)),
            "num_clutter": (lambda: 0 <= self.num_clutter <= 1000, "in [0, 1000]", ()),
            "clutter_size": (lambda: 1 <= self.clutter_size <= min(_ITEM, self.canvas_size),
                             f"in [1, {_ITEM}] and <= canvas_size", ("canvas_size",)),
            "clutter_intensity": (lambda: 0 <= low <= high <= 1, "(low, high) with 0 <= low <= high <= 1", ()),
            "mask_threshold": (lambda: 0 <= self.mask_threshold < 1, "in [0, 1)", ()),
            "min_objects": (lambda: 1 <= self.min_objects <= self.max_objects, ">= 1 and <= max_objects",
                            ("max_objects",)),
            "max_objects": (lambda: self.max_objects <= 100, "<= 100", ()),
            "max_iou": (lambda: 0 <= self.max_iou <= 1, "in [0, 1]", ()),
            "max_tries": (lambda: 1 <= self.max_tries <= 10000, "in [1, 10000]", ()),
        }
        out_of_range = [f"{name}={getattr(self, name)!r} (must be {want})" for name, (ok, want, reads) in ranges.items()
                        if not ({name, *reads} & set(bad)) and not ok()]
        return [*bad.values(), *out_of_range]

    @classmethod
    def from_dict(cls, d: Any) -> ClutterConfig:
        """The config of a mapping of field names (a training config's ``clutter``).

        Raises:
            ValueError: not a mapping, unknown keys (listed), or invalid values (listed).
        """
        known = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(d, dict):
            raise ValueError(f"ClutterConfig: expected a mapping of {', '.join(known)}, got {type(d).__name__}")
        unknown = sorted(str(k) for k in d if k not in known)
        if unknown:
            raise ValueError(f"ClutterConfig: unknown keys {unknown}; known: {', '.join(known)}")
        return cls(**d)


#: Largest canvas side (a 4096 x 4096 float32 canvas is 64 MiB).
MAX_CANVAS_SIZE = 4096


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ClutterConfig annotation -> (check, in words)
_FIELD_TYPES = {
    "int": (_is_int, "an int"),
    "float": (_is_number, "a finite number"),
    "tuple[float, float]": (lambda v: isinstance(v, (tuple, list)) and len(v) == 2 and all(map(_is_number, v)),
                            "two numbers (low, high)"),
}


#: Default for the multi-object variant: a larger canvas and more clutter.
MULTI_OBJECT_CONFIG = ClutterConfig(canvas_size=96, num_clutter=12)


def _tight_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class _Generator:
    """Shared drawing code; holds the split's uint8 items (shared, read-only)."""

    def __init__(self, split: str, num_samples: int, seed: int, config: ClutterConfig, data_dir) -> None:
        if split not in _SPLIT_IDS:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if not isinstance(config, ClutterConfig):
            raise ValueError(f"config must be a ClutterConfig, got {config!r}")
        self.split, self.num_samples, self.seed, self.config = split, num_samples, seed, config
        self.items, self.labels = load_fashion_mnist(split, data_dir)
        if len(self.items) < 2:
            raise ValueError(f"need at least 2 Fashion-MNIST {split} items, got {len(self.items)}")

    def __len__(self) -> int:
        return self.num_samples

    def _rng(self, index: int) -> tuple[int, np.random.Generator]:
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        index %= self.num_samples
        return index, np.random.default_rng([self.seed, _SPLIT_IDS[self.split], index])

    def _item(self, rng: np.random.Generator, exclude: Sequence[int] = ()) -> tuple[int, np.ndarray]:
        """Draws an item index not in ``exclude`` and its resized float image."""
        cfg = self.config
        idx = int(rng.integers(len(self.items)))
        while idx in exclude:
            idx = int(rng.integers(len(self.items)))
        side = min(round(_ITEM * rng.uniform(cfg.min_scale, cfg.max_scale)), cfg.canvas_size)
        image = Image.fromarray(self.items[idx].astype(np.float32) / 255.0)  # mode "F"
        resized = np.asarray(image.resize((side, side), Image.Resampling.BILINEAR), dtype=np.float32)
        return idx, np.clip(resized, 0.0, 1.0)

    def _clutter(self, rng: np.random.Generator, exclude: Sequence[int]) -> np.ndarray:
        cfg = self.config
        s, c, k = cfg.canvas_size, cfg.clutter_size, cfg.num_clutter
        canvas = np.zeros((s, s), np.float32)
        margin = min(4, (_ITEM - c) // 2)
        sources = rng.integers(len(self.items), size=k)
        offsets = rng.integers(margin, _ITEM - c - margin + 1, size=(k, 2))
        places = rng.integers(0, s - c + 1, size=(k, 2))
        gains = rng.uniform(*cfg.clutter_intensity, size=k).astype(np.float32)
        for j, (oy, ox), (py, px), gain in zip(sources, offsets, places, gains):
            while j in exclude:  # clutter comes from other items only
                j = rng.integers(len(self.items))
            patch = self.items[j, oy : oy + c, ox : ox + c].astype(np.float32) * (gain / 255.0)
            np.maximum(canvas[py : py + c, px : px + c], patch, out=canvas[py : py + c, px : px + c])
        return canvas

    def _paste(self, rng: np.random.Generator, item: np.ndarray, boxes: list) -> tuple | None:
        """Places ``item`` with its tight box's IoU <= max_iou against ``boxes``."""
        cfg = self.config
        side = item.shape[0]
        local = _tight_box(item > cfg.mask_threshold) or (0, 0, side, side)
        for _ in range(cfg.max_tries):
            x, y = (int(v) for v in rng.integers(0, cfg.canvas_size - side + 1, size=2))
            box = (local[0] + x, local[1] + y, local[2] + x, local[3] + y)
            if all(_iou(box, other) <= cfg.max_iou for other in boxes):
                return x, y, box
        return None

    def _draw(self, index: int, num_objects: int | None) -> dict:
        cfg = self.config
        index, rng = self._rng(index)
        if num_objects is None:
            num_objects = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
        s = cfg.canvas_size
        layer = np.zeros((s, s), np.float32)
        ids, labels, boxes, masks = [], [], [], []
        for k in range(num_objects):
            idx, item = self._item(rng, exclude=ids)
            placed = self._paste(rng, item, boxes)
            if placed is None:
                continue
            x, y, box = placed
            side = item.shape[0]
            mask = np.zeros((s, s), bool)
            mask[y : y + side, x : x + side] = item > cfg.mask_threshold
            np.maximum(layer[y : y + side, x : x + side], item, out=layer[y : y + side, x : x + side])
            ids.append(idx)
            labels.append(int(self.labels[idx]))
            boxes.append(box)
            masks.append(mask)
        image = np.maximum(self._clutter(rng, exclude=ids), layer)
        return {
            "image": torch.from_numpy(image)[None],
            "labels": torch.tensor(labels, dtype=torch.int64),
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "masks": torch.from_numpy(np.stack(masks)),
            "item_ids": ids,
        }


class ClutteredFashionMNIST(_Generator, Dataset):
    """One Fashion-MNIST item on a cluttered canvas (classification; box and mask for analysis).

    Train canvases use only train-split items (object and clutter), test canvases
    only test-split items.

    Args:
        split: ``"train"`` or ``"test"``.
        num_samples: dataset length.
        seed: non-negative int; sample ``i`` depends only on ``(seed, split, i)``.
        config: drawing parameters (``min_objects``/``max_objects``/``max_iou`` unused).
        data_dir: where to find Fashion-MNIST, see :func:`find_fashion_mnist`.
        transform: applied to the image tensor only (it must not move pixels if the
            box and mask are used).

    Items are dicts:
        ``image``: float32 ``[1, S, S]`` in [0, 1] (before ``transform``);
        ``label``: int, 0..9; ``box``: float32 ``[4]`` ``(x0, y0, x1, y1)``, the tight
        box of ``mask`` in pixel-edge coordinates (pixel ``(r, c)`` covers
        ``[c, c+1) x [r, r+1)``, so ``x1 = last column + 1``); if the mask is empty
        (nearly blank item) the pasted square; ``mask``: bool ``[S, S]``, pixels where
        the pasted item exceeds ``config.mask_threshold`` (the image there is at
        least the item's value, as composition is the maximum).
    """

    def __init__(
        self,
        *,
        split: str = "train",
        num_samples: int = 10000,
        seed: int = 0,
        config: ClutterConfig = ClutterConfig(),
        data_dir: str | Path | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__(split, num_samples, seed, config, data_dir)
        self.transform = transform
        self.classes = FASHION_MNIST_CLASSES

    def __getitem__(self, index: int) -> dict:
        d = self._draw(index, num_objects=1)
        image = d["image"] if self.transform is None else self.transform(d["image"])
        return {"image": image, "label": int(d["labels"][0]), "box": d["boxes"][0], "mask": d["masks"][0]}

    def stack(self, indices: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """Draws several samples as one batch.

        Args:
            indices: which samples (default: all).

        Returns:
            ``image`` ``[B, 1, S, S]``, ``label`` int64 ``[B]``, ``box`` ``[B, 4]``,
            ``mask`` bool ``[B, S, S]``.
        """
        indices = range(len(self)) if indices is None else indices
        samples = [self[i] for i in indices]
        return {
            "image": torch.stack([s["image"] for s in samples]),
            "label": torch.tensor([s["label"] for s in samples], dtype=torch.int64),
            "box": torch.stack([s["box"] for s in samples]),
            "mask": torch.stack([s["mask"] for s in samples]),
        }


class MultiObjectClutteredFashionMNIST(_Generator, Dataset):
    """Several Fashion-MNIST items per cluttered canvas (detection / instance masks).

    ``K`` is drawn in ``[config.min_objects, config.max_objects]``; objects whose
    tight boxes would overlap an earlier one with IoU > ``config.max_iou`` after
    ``config.max_tries`` tries are left out (K >= 1 always). Objects are distinct
    items, clutter comes from yet other items of the same split.

    Args:
        split, num_samples, seed, data_dir, transform: as :class:`ClutteredFashionMNIST`.
        config: drawing parameters (default :data:`MULTI_OBJECT_CONFIG`, 96x96).

    Items are dicts: ``image`` float32 ``[1, S, S]``; ``labels`` int64 ``[K]``
    (0..9; add 1 for a background-at-0 convention); ``boxes`` float32 ``[K, 4]``
    ``(x0, y0, x1, y1)`` tight boxes as in :class:`ClutteredFashionMNIST`;
    ``masks`` bool ``[K, S, S]`` (each item's full silhouette; silhouettes may
    overlap where objects do). Use :func:`detection_collate` to batch.
    """

    def __init__(
        self,
        *,
        split: str = "train",
        num_samples: int = 10000,
        seed: int = 0,
        config: ClutterConfig = MULTI_OBJECT_CONFIG,
        data_dir: str | Path | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__(split, num_samples, seed, config, data_dir)
        self.transform = transform
        self.classes = FASHION_MNIST_CLASSES

    def __getitem__(self, index: int) -> dict:
        d = self._draw(index, num_objects=None)
        image = d["image"] if self.transform is None else self.transform(d["image"])
        return {"image": image, "labels": d["labels"], "boxes": d["boxes"], "masks": d["masks"]}


def detection_collate(batch: Sequence[dict]) -> tuple[torch.Tensor, list[dict]]:
    """Batches multi-object samples: ``(images [B, 1, S, S], [targets])`` (torchvision style)."""
    images = torch.stack([b["image"] for b in batch])
    return images, [{k: v for k, v in b.items() if k != "image"} for b in batch]


def mask_to_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE of a bool ``[H, W]`` mask (column-major runs, starting with 0s)."""
    flat = np.asarray(mask, bool).ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"counts": counts, "size": [int(mask.shape[0]), int(mask.shape[1])]}


def write_coco(
    out_dir: str | Path,
    *,
    split: str,
    num_images: int,
    seed: int = 0,
    config: ClutterConfig = MULTI_OBJECT_CONFIG,
    canvas_size: int | None = None,
    data_dir: str | Path | None = None,
) -> Path:
    """Writes a multi-object Cluttered Fashion-MNIST split in COCO format.

    Files: ``out_dir/images/<split>/{id:06d}.png`` (8-bit greyscale) and
    ``out_dir/annotations/instances_<split>.json``. Image ids are ``1..num_images``
    (image id ``i + 1`` is sample ``i`` of :class:`MultiObjectClutteredFashionMNIST`
    with the same arguments), annotation ids start at 1, ``category_id`` is
    ``label + 1`` (1..10, Fashion-MNIST names), ``bbox`` is ``[x, y, w, h]`` of the
    tight box, ``segmentation`` is the item's mask as uncompressed RLE
    (``{"counts": [...], "size": [h, w]}``), ``area`` its pixel count, ``iscrowd`` 0.

    Args:
        out_dir: output root (created).
        split: ``"train"`` or ``"test"``.
        num_images: number of images.
        seed: as for the dataset; output is deterministic.
        config: drawing parameters.
        canvas_size: overrides ``config.canvas_size`` if given.
        data_dir: where to find Fashion-MNIST.

    Returns:
        The annotation file's path.
    """
    if canvas_size is not None:
        config = dataclasses.replace(config, canvas_size=canvas_size)
    data = MultiObjectClutteredFashionMNIST(
        split=split, num_samples=num_images, seed=seed, config=config, data_dir=data_dir
    )
    out_dir = Path(out_dir)
    image_dir = out_dir / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "annotations").mkdir(parents=True, exist_ok=True)
    s = config.canvas_size
    images, annotations = [], []
    for i in range(num_images):
        sample, image_id = data[i], i + 1
        name = f"{image_id:06d}.png"
        pixels = (sample["image"][0].numpy() * 255.0).round().astype(np.uint8)
        Image.fromarray(pixels).save(image_dir / name)  # mode "L"
        images.append({"id": image_id, "file_name": name, "width": s, "height": s})
        for label, box, mask in zip(sample["labels"], sample["boxes"], sample["masks"]):
            x0, y0, x1, y1 = (float(v) for v in box)
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": int(label) + 1,
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": float(mask.sum()),
                "iscrowd": 0,
                "segmentation": mask_to_rle(mask.numpy()),
            })
    coco = {
        "info": {"description": f"Cluttered Fashion-MNIST ({split}, seed {seed})", "version": "1.0"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": name, "supercategory": "fashion"} for i, name in enumerate(FASHION_MNIST_CLASSES)
        ],
    }
    path = out_dir / "annotations" / f"instances_{split}.json"
    path.write_text(json.dumps(coco))
    return path
