"""COCO-format detection data: a validated dataset and pycocotools evaluation.

:class:`CocoDetection` reads an image folder and an ``instances_*.json`` and returns
torchvision-detection targets. The annotation file is checked when loaded:

* missing top-level keys (``images``, ``annotations``, ``categories``) or missing fields
  (image ``id/file_name/width/height``; annotation ``id/image_id/category_id/bbox``;
  category ``id``), annotations of unknown images or **unknown category ids**, duplicate
  ids, non-numeric boxes and a ``file_name`` that could point **outside the image
  folder** (absolute, a drive, ``..``) raise :class:`CocoFormatError` naming the file and the field;
* boxes reaching **outside the image are clipped** to it (one warning per file with the
  count); boxes empty after clipping (or with ``w, h <= 0``) are dropped with a warning;
* ``area`` defaults to ``w * h`` and ``iscrowd`` to 0;
* **images without annotations** are kept for evaluation and skipped for training
  (``skip_empty=True``); crowd boxes are kept for evaluation, never trained on.

Evaluation (:func:`coco_evaluate`) runs pycocotools ``COCOeval`` on the validated ground
truth (:attr:`CocoDetection.coco`), so clipped boxes are what detections are scored against.
:func:`write_coco_splits` writes a synthetic set in this format (``sact detect make-data``).
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import InputError

__all__ = ["CocoFormatError", "CocoDetection", "load_coco_json", "coco_evaluate", "to_coco_results", "AP_NAMES",
           "collate", "coco_paths", "split_paths", "write_coco_splits"]

#: Names of ``COCOeval.stats[0:6]``.
AP_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


class CocoFormatError(InputError):
    """The annotation file is not valid COCO detection json (the message names file and field)."""


def _require(obj: Any, keys: Sequence[str], where: str, path: Path) -> None:
    if not isinstance(obj, dict):
        raise CocoFormatError(f"{path}: {where} must be an object, got {type(obj).__name__}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise CocoFormatError(f"{path}: {where} lacks {', '.join(repr(k) for k in missing)}")


def _file_name_problem(name: Any) -> str | None:
    """Why ``file_name`` could reach outside the image folder (None if it cannot)."""
    from pathlib import PurePosixPath, PureWindowsPath

    if not isinstance(name, str) or not name or "\x00" in name:
        return "must be a non-empty string"
    for pure in (PurePosixPath(name), PureWindowsPath(name)):
        if pure.is_absolute() or pure.anchor or ".." in pure.parts:
            return "must be a path inside the image folder (no absolute path, drive or '..')"
    return None


def load_coco_json(path: str | Path) -> dict:
    """Read and validate a COCO detection annotation file (rules in the module docstring).

    Returns:
        The cleaned dataset dict (``images``, ``annotations`` with clipped boxes and
        defaults filled in, ``categories``), ready for ``pycocotools.coco.COCO``.

    Raises:
        CocoFormatError: unreadable json, missing keys or fields, unknown ids.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CocoFormatError(f"{path}: cannot read COCO json: {e}") from e
    _require(data, ("images", "annotations", "categories"), "the top level", path)
    for key in ("images", "annotations", "categories"):
        if not isinstance(data[key], list):
            raise CocoFormatError(f"{path}: '{key}' must be a list, got {type(data[key]).__name__}")
    images, cats = {}, {}
    for i, c in enumerate(data["categories"]):
        _require(c, ("id",), f"categories[{i}]", path)
        cats[c["id"]] = {"name": str(c["id"]), **c}
    if not cats:
        raise CocoFormatError(f"{path}: 'categories' is empty")
    for i, im in enumerate(data["images"]):
        _require(im, ("id", "file_name", "width", "height"), f"images[{i}]", path)
        if im["id"] in images:
            raise CocoFormatError(f"{path}: images[{i}] repeats image id {im['id']!r}")
        problem = _file_name_problem(im["file_name"])
        if problem:
            raise CocoFormatError(f"{path}: images[{i}] file_name {im['file_name']!r} {problem}")
        if not (isinstance(im["width"], int) and isinstance(im["height"], int) and im["width"] > 0 and im["height"] > 0):
            raise CocoFormatError(f"{path}: images[{i}] width/height must be positive ints, got "
                                  f"{im['width']!r}, {im['height']!r}")
        images[im["id"]] = im
    anns, ids, clipped, dropped = [], set(), 0, 0
    for i, a in enumerate(data["annotations"]):
        _require(a, ("id", "image_id", "category_id", "bbox"), f"annotations[{i}]", path)
        if a["id"] in ids:
            raise CocoFormatError(f"{path}: annotations[{i}] repeats annotation id {a['id']!r}")
        ids.add(a["id"])
        if a["image_id"] not in images:
            raise CocoFormatError(f"{path}: annotations[{i}] (id {a['id']}) has unknown image_id {a['image_id']!r}")
        if a["category_id"] not in cats:
            raise CocoFormatError(f"{path}: annotations[{i}] (id {a['id']}) has unknown category_id "
                                  f"{a['category_id']!r}; known: {sorted(cats)}")
        box = a["bbox"]
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            raise CocoFormatError(f"{path}: annotations[{i}] (id {a['id']}) bbox must be [x, y, w, h] numbers, got {box!r}")
        im = images[a["image_id"]]
        x0, y0, x1, y1 = box[0], box[1], box[0] + box[2], box[1] + box[3]
        cx0, cy0 = min(max(x0, 0), im["width"]), min(max(y0, 0), im["height"])
        cx1, cy1 = min(max(x1, 0), im["width"]), min(max(y1, 0), im["height"])
        if cx1 <= cx0 or cy1 <= cy0:
            dropped += 1
            continue
        if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
            clipped += 1
        w, h = cx1 - cx0, cy1 - cy0
        anns.append({**a, "bbox": [cx0, cy0, w, h], "area": float(a.get("area", w * h)),
                     "iscrowd": int(a.get("iscrowd", 0))})
    if clipped:
        warnings.warn(f"{path}: {clipped} box(es) reach outside their image and were clipped to it", stacklevel=2)
    if dropped:
        warnings.warn(f"{path}: {dropped} empty box(es) (w or h <= 0 inside the image) were dropped", stacklevel=2)
    return {"info": data.get("info", {}), "licenses": data.get("licenses", []), "images": list(images.values()),
            "annotations": anns, "categories": list(cats.values())}


class CocoDetection(Dataset):
    """COCO-format detection dataset returning torchvision-detection targets.

    Args:
        image_dir: folder holding the images (``file_name`` is relative to it).
        ann_file: the ``instances_*.json``.
        in_chans: 1 (greyscale) or 3 (RGB): images are converted on load.
        skip_empty: leave out images without (non-crowd) annotations (training).
        hflip: probability of a horizontal flip (training augmentation; 0 for eval).

    Items are ``(image float [in_chans, H, W] in [0, 1], target)`` with target
    ``{"boxes" float [N, 4] (x0, y0, x1, y1), "labels" int64 [N] (1..K), "image_id" int}``;
    labels are contiguous: category ``categories[k]`` (sorted by id) is label ``k + 1``.

    Attributes:
        coco: ``pycocotools.coco.COCO`` over the validated annotations.
        label_to_category: label -> COCO category id. ``class_names``: by label - 1.
    """

    def __init__(self, image_dir: str | Path, ann_file: str | Path, *, in_chans: int = 1, skip_empty: bool = False,
                 hflip: float = 0.0) -> None:
        from pycocotools.coco import COCO

        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
        if not 0.0 <= hflip <= 1.0:
            raise ValueError(f"hflip must be a probability, got {hflip}")
        self.image_dir, self.ann_file = Path(image_dir), Path(ann_file)
        self.in_chans, self.hflip = in_chans, hflip
        data = load_coco_json(ann_file)
        with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress lines
            self.coco = COCO()
            self.coco.dataset = data
            self.coco.createIndex()
        cat_ids = sorted(self.coco.cats)
        self.label_to_category = {k + 1: c for k, c in enumerate(cat_ids)}
        self._category_to_label = {c: k for k, c in self.label_to_category.items()}
        self.class_names = [self.coco.cats[c].get("name", str(c)) for c in cat_ids]
        ids = sorted(self.coco.imgs)
        if skip_empty:
            ids = [i for i in ids if any(not a["iscrowd"] for a in self.coco.imgToAnns[i])]
        self.ids = ids

    @property
    def num_classes(self) -> int:
        """Categories plus background."""
        return len(self.label_to_category) + 1

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        from ..data import to_float_image
        from ..data.images import UnreadableImage, open_image

        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        path = self.image_dir / info["file_name"]
        try:
            image = to_float_image(open_image(path), self.in_chans)  # [C, H, W] in [0, 1]; pixel cap checked first
        except UnreadableImage as e:
            raise CocoFormatError(f"{self.ann_file}: image id {image_id}: {e}") from e
        if tuple(image.shape[-2:]) != (info["height"], info["width"]):
            raise CocoFormatError(f"{self.ann_file}: image id {image_id} is {tuple(image.shape[-2:])} (h, w) on disk "
                                  f"but {(info['height'], info['width'])} in the json")
        anns = [a for a in self.coco.imgToAnns[image_id] if not a["iscrowd"]]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([self._category_to_label[a["category_id"]] for a in anns], dtype=torch.int64)
        if self.hflip and torch.rand(()) < self.hflip:
            image = image.flip(-1)
            boxes = torch.stack([info["width"] - boxes[:, 2], boxes[:, 1], info["width"] - boxes[:, 0], boxes[:, 3]], 1)
        return image, {"boxes": boxes, "labels": labels, "image_id": int(image_id)}


def collate(batch: Sequence[tuple[Tensor, dict]]) -> tuple[list[Tensor], list[dict]]:
    """Lists of images and targets (images may differ in size)."""
    return [b[0] for b in batch], [b[1] for b in batch]


def to_coco_results(detections: Sequence[dict[str, Tensor]], image_ids: Sequence[int],
                    label_to_category: dict[int, int]) -> list[dict]:
    """Detections (``boxes`` x0y0x1y1, ``scores``, ``labels``) -> COCO result dicts (``bbox`` xywh)."""
    out = []
    for det, image_id in zip(detections, image_ids):
        boxes = det["boxes"].detach().cpu().tolist()
        for (x0, y0, x1, y1), s, lab in zip(boxes, det["scores"].tolist(), det["labels"].tolist()):
            out.append({"image_id": int(image_id), "category_id": int(label_to_category[int(lab)]),
                        "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(s)})
    return out


def coco_evaluate(coco_gt, results: Sequence[dict], *, image_ids: Sequence[int] | None = None,
                  verbose: bool = False) -> dict[str, float]:
    """Box AP with pycocotools.

    Args:
        coco_gt: ``pycocotools.coco.COCO`` ground truth.
        results: COCO result dicts (``image_id, category_id, bbox [x, y, w, h], score``).
        image_ids: evaluate on these images only (default: all of ``coco_gt``).
        verbose: print COCOeval's summary table.

    Returns:
        ``{"AP", "AP50", "AP75", "APs", "APm", "APl"}`` in [0, 1] (pycocotools' -1, "no
        ground truth of that size", is kept). No detections at all gives 0 for each
        AP whose ground truth exists (loadRes rejects an empty list, so this is special-cased).

    Raises:
        ValueError: a detection lacks a key or names an unknown image or category.
    """
    from pycocotools.cocoeval import COCOeval

    ids = sorted(coco_gt.imgs) if image_ids is None else list(image_ids)
    for i, r in enumerate(results):
        missing = [k for k in ("image_id", "category_id", "bbox", "score") if not isinstance(r, dict) or k not in r]
        if missing:
            raise ValueError(f"detection {i} lacks {missing}")
        if r["image_id"] not in coco_gt.imgs:
            raise ValueError(f"detection {i} has image_id {r['image_id']!r}, not in the ground truth")
        if r["category_id"] not in coco_gt.cats:
            raise ValueError(f"detection {i} has category_id {r['category_id']!r}, not in the ground truth")
    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with sink:
        if results:
            coco_dt = coco_gt.loadRes(list(results))
        else:
            from pycocotools.coco import COCO

            coco_dt = COCO()
            coco_dt.dataset = {"images": coco_gt.dataset["images"], "categories": coco_gt.dataset["categories"],
                               "annotations": []}
            coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.params.imgIds = ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {name: float(v) for name, v in zip(AP_NAMES, ev.stats[:6])}


def coco_paths(config, split_key: str) -> tuple[Path, Path]:
    """:func:`split_paths` of the ``"train"`` or ``"val"`` split of a :class:`~sact.engine.TrainConfig`
    (its ``data_dir`` and ``<split_key>_split``, ``_images``, ``_ann``)."""
    return split_paths(config.data_dir, getattr(config, f"{split_key}_split"), getattr(config, f"{split_key}_images"),
                       getattr(config, f"{split_key}_ann"), split_key=split_key)


def split_paths(data_dir, split: str, images=None, ann=None, *, split_key: str = "val") -> tuple[Path, Path]:
    """``(image folder, instances json)`` of one split.

    Explicit ``images`` / ``ann`` win; otherwise ``data_dir/images/<split>/`` and
    ``data_dir/annotations/instances_<split>.json`` (the layout ``sact detect make-data`` writes).
    ``split_key`` (``"train"`` or ``"val"``) names the options in the error.

    Raises:
        InputError: neither a ``data_dir`` nor both files.
    """
    if data_dir is not None:
        root = Path(data_dir)
        images = images or root / "images" / split
        ann = ann or root / "annotations" / f"instances_{split}.json"
    if images is None or ann is None:
        raise InputError(f"detection needs data_dir (--data) or both {split_key}_images and {split_key}_ann "
                         f"(--{split_key}-images, --{split_key}-ann)")
    return Path(images), Path(ann)


def write_coco_splits(out_dir: str | Path, *, num_train: int, num_val: int, seed: int = 0,
                      canvas_size: int | None = None, data_dir: str | Path | None = None, overwrite: bool = False,
                      log: Callable[[str], None] = print) -> dict[str, Path]:
    """Writes the ``train`` and ``test`` splits of multi-object Cluttered Fashion-MNIST in
    COCO format (``sact detect make-data``; :func:`sact.data.write_coco` per split).

    Args:
        out_dir: output root: ``images/<split>/`` and ``annotations/instances_<split>.json``.
        num_train, num_val: images of the ``train`` and ``test`` split.
        seed, canvas_size, data_dir: as for :func:`sact.data.write_coco`.
        overwrite: replace the annotation files of a data set already in ``out_dir``.
        log: gets one line per split written.

    Returns:
        ``{split: instances json}``.

    Raises:
        InputError: a count below 1.
        OutputExistsError: annotation files exist and not ``overwrite`` (nothing written).
    """
    from ..data import write_coco
    from ..io.files import prepare_outputs

    counts = {"train": num_train, "test": num_val}
    for split, n in counts.items():
        if n < 1:
            raise InputError(f"--num-{'train' if split == 'train' else 'val'} must be >= 1, got {n}")
    names = [f"annotations/instances_{split}.json" for split in counts]
    written = {}
    with prepare_outputs(out_dir, files=names, overwrite=overwrite):
        for split, n in counts.items():
            written[split] = write_coco(out_dir, split=split, num_images=n, seed=seed, canvas_size=canvas_size,
                                        data_dir=data_dir)
            log(f"{split}: {n} images -> {written[split]}")
    return written
