"""``sact.predict``: what is in these images? Top-k classes, FLOPs and ponder cost per image.

Images are decoded and preprocessed exactly as the training and evaluation datasets do
(:class:`sact.data.ImageFolderDataset`): :func:`sact.data.images.open_image` (pixel cap
checked before decoding, no EXIF rotation), :func:`sact.data.to_float_image` to RGB, then
the checkpoint's :class:`sact.data.Preprocess` (:func:`sact.tools.ponder.model_preprocess`).
:func:`find_images` turns command-line arguments (files, folders, globs) into image files.
"""

from __future__ import annotations

import glob
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import InputError

__all__ = ["Prediction", "predict", "predict_checkpoint", "format_table", "find_images", "checkpoint_class_names"]


@dataclass(frozen=True)
class Prediction:
    """The prediction for one image.

    Attributes:
        image: the file's path as given, or the image's index in the input (PIL images, tensors).
        topk: ``(class index, class name or None, probability)`` for the ``k`` most probable
            classes, most probable first (softmax of the logits).
        flops: FLOPs the model spent on this image (2 x multiply-adds).
        ponder_cost: the image's ponder cost (sum over stages of the mean of the stage's map).
        input_size: ``(H, W)`` the model saw (FLOPs depend on it).
    """

    image: str | int
    topk: tuple[tuple[int, str | None, float], ...]
    flops: int
    ponder_cost: float
    input_size: tuple[int, int]

    def to_dict(self) -> dict:
        """Plain JSON-friendly dict (one line of ``sact predict --out``)."""
        return {
            "image": self.image,
            "topk": [{"class": i, "name": name, "probability": p} for i, name, p in self.topk],
            "flops": self.flops,
            "ponder_cost": self.ponder_cost,
            "input_size": list(self.input_size),
        }


def find_images(paths: Sequence[str | Path]) -> list[Path]:
    """The image files named by ``paths``: files, folders and glob patterns.

    A file is taken as named (whatever its extension); a folder is searched recursively
    and a glob (``*``, ``?``, ``[...]``, ``**``) is expanded, both sorted, keeping only files
    with an extension Pillow opens (:func:`sact.data.image_extensions`) and skipping hidden
    entries. Duplicates are dropped, the first occurrence kept.

    Raises:
        InputError: a path that does not exist, a glob that matches nothing, or no image at all.
    """
    from ..data import image_extensions
    from ..data.folder import folder_images

    known = image_extensions()
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            found.append(path)  # named on purpose: tried whatever its extension
        elif path.is_dir():
            found += folder_images(path, known)
        elif glob.has_magic(str(raw)):
            matches = [Path(m) for m in sorted(glob.glob(str(raw), recursive=True))]
            if not matches:
                raise InputError(f"no file matches {raw}")
            for m in matches:
                found += folder_images(m, known) if m.is_dir() else [m] if m.suffix.lower() in known else []
        else:
            raise InputError(f"no such file or folder: {raw}")
    files, seen = [], set()
    for f in found:
        if f.resolve() not in seen:
            seen.add(f.resolve())
            files.append(f)
    if not files:
        raise InputError(f"no image found in {' '.join(map(str, paths))} (extensions Pillow opens: .png, .jpg, ...)")
    return files


def checkpoint_class_names(model: nn.Module) -> list[str | None] | None:
    """Class name per logit index from a checkpoint's ``meta["classes"]``, or None.

    A model trained with a label offset (the reference's 1001-class models: logit 0 is
    the background) has ``None`` for the logits below the offset.
    """
    meta = getattr(model, "checkpoint_meta", None) or {}
    classes = meta.get("classes")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        return None
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    offset = meta.get("label_offset", config.get("label_offset", 0))
    offset = offset if isinstance(offset, int) and not isinstance(offset, bool) and offset >= 0 else 0
    return [None] * offset + list(classes)


def _inputs(images) -> list:
    """``images`` as a flat list of single items (path, PIL image, numpy array or ``[C, H, W]`` tensor)."""
    import numpy as np

    if isinstance(images, (str, Path, np.ndarray)) or hasattr(images, "getbands"):  # one file, array or PIL image
        return [images]
    if isinstance(images, Tensor):
        if images.dim() not in (3, 4):
            raise ValueError(f"expected a tensor [C, H, W] or [B, C, H, W], got shape {tuple(images.shape)}")
        return list(images) if images.dim() == 4 else [images]
    items = []
    for item in images:
        items += list(item) if isinstance(item, Tensor) and item.dim() == 4 else [item]
    return items


def _prepared(items: list, pre, in_chans: int, max_pixels: int) -> Iterator[tuple[str | int, Tensor]]:
    """Each item as ``(name, [C, H, W] model input)``, decoded and preprocessed as the training datasets do."""
    from ..data import to_float_image
    from ..data.images import open_image

    for i, item in enumerate(items):
        if isinstance(item, Tensor):  # already preprocessed
            if item.dim() != 3 or item.shape[0] != in_chans:
                raise ValueError(f"image {i}: expected a preprocessed tensor [{in_chans}, H, W], "
                                 f"got shape {tuple(item.shape)}")
            yield i, item
        elif isinstance(item, (str, Path)):
            # as ImageFolderDataset.__getitem__ (training, sact eval): RGB floats, then the Preprocess
            yield str(item), pre(to_float_image(open_image(item, max_pixels=max_pixels), 3))
        else:  # PIL image or numpy array
            yield i, pre(to_float_image(item, 3))


def _batches(prepared: Iterator, batch_size: int) -> Iterator[tuple[list, Tensor]]:
    """Consecutive inputs of equal shape stacked into batches of at most ``batch_size``."""
    names, xs = [], []
    for name, x in prepared:
        if xs and (len(xs) == batch_size or x.shape != xs[0].shape):
            yield names, torch.stack(xs)
            names, xs = [], []
        names.append(name)
        xs.append(x)
    if xs:
        yield names, torch.stack(xs)


def predict(
    model: nn.Module,
    images,
    *,
    topk: int = 5,
    class_names: Sequence[str | None] | None = None,
    preprocess=None,
    batch_size: int = 32,
    max_pixels: int | None = None,
    progress: bool | None = False,
) -> list[Prediction]:
    """Top-k classes, FLOPs and ponder cost of each image.

    Args:
        model: a classification model (from :func:`sact.load_checkpoint` /
            :func:`sact.create_model`) or its :func:`sact.to_sparse` wrapper. Run in eval
            mode (restored afterwards) without gradients.
        images: image file paths, PIL images (any mode), numpy arrays ``[H, W, C]``, or
            tensors ``[C, H, W]`` / ``[B, C, H, W]`` already preprocessed; one of them or a
            list of them.
        topk: how many classes per image (at most the number of classes).
        class_names: name per logit index; default the checkpoint's (:func:`checkpoint_class_names`).
        preprocess: a :class:`sact.data.Preprocess` (or its dict) for files, PIL images and
            arrays; the checkpoint's wins over it (:func:`sact.tools.ponder.model_preprocess`,
            as for :func:`sact.ponder_map`).
        batch_size: images per forward pass (consecutive images of equal size share one).
        max_pixels: image files above this many pixels are refused before decoding
            (default :data:`sact.data.images.DEFAULT_MAX_PIXELS`).
        progress: a progress bar on stderr (tqdm); None: only on a terminal.

    Returns:
        One :class:`Prediction` per image, in order.

    Raises:
        ValueError: bad ``topk`` / ``batch_size``, a tensor of the wrong shape.
        sact.data.images.UnreadableImage: a file that is missing, not an image or above
            ``max_pixels`` (an :class:`sact.errors.InputError`).
    """
    from tqdm import tqdm

    from ..data.images import DEFAULT_MAX_PIXELS
    from .ponder import evaluating, model_preprocess
    from ..sparse import SparseModel

    for name, value in (("topk", topk), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    base = model.model if isinstance(model, SparseModel) else model  # the wrapped model holds the checkpoint data
    if getattr(base, "features_only", False):
        raise ValueError("predict needs a classification model, got a features_only one")
    pre = model_preprocess(base, preprocess)
    names = list(class_names) if class_names is not None else checkpoint_class_names(base)
    param = next(base.parameters())
    items = _inputs(images)
    prepared = _prepared(items, pre, int(base.in_chans), DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels)
    hide = None if progress is None else not progress  # tqdm: None hides the bar when stderr is not a terminal
    results: list[Prediction] = []
    with evaluating(model), tqdm(total=len(items), desc="predict", unit="image", disable=hide, leave=False) as bar:
        for sources, x in _batches(prepared, batch_size):
            out = model(x.to(device=param.device, dtype=param.dtype))
            probs = out.logits.float().softmax(dim=1).cpu()  # [B, K]
            top_p, top_i = probs.topk(min(topk, probs.shape[1]), dim=1)  # [B, k], sorted
            for b, source in enumerate(sources):
                ranked = tuple((int(i), names[i] if names is not None and i < len(names) else None, float(p))
                               for i, p in zip(top_i[b].tolist(), top_p[b].tolist()))
                results.append(Prediction(image=source, topk=ranked, flops=int(out.flops[b].item()),
                                          ponder_cost=float(out.ponder_cost[b].item()),
                                          input_size=(int(x.shape[-2]), int(x.shape[-1]))))
            bar.update(len(sources))
    return results


def predict_checkpoint(checkpoint: str | Path, images: Sequence[str | Path], *, topk: int = 5, batch_size: int | None = None,
                       max_pixels: int | None = None, device: str = "auto", sparse: bool = False,
                       out: str | Path | None = None, overwrite: bool = False,
                       progress: bool | None = None) -> list[Prediction]:
    """``sact predict``: :func:`predict` with the checkpoint's model on the images of ``images``
    (files, folders, globs: :func:`find_images`), through the sparse engine with ``sparse``;
    with ``out``, the predictions as JSON Lines (one :meth:`Prediction.to_dict` per line),
    refusing an existing file unless ``overwrite`` (checked before any work and again before writing).

    Raises:
        InputError: a non-positive ``topk`` / ``batch_size`` / ``max_pixels``, no image, an
            unreadable checkpoint (:class:`~sact.io.checkpoint.CheckpointError`), ``out`` in the way.
    """
    from ..engine.distributed import resolve_device
    from ..io.checkpoint import CheckpointError
    from ..io.files import atomic_write_bytes, check_output_file, dumps_json
    from ..models.loading import load_checkpoint

    for flag, value in (("--topk", topk), ("--batch-size", batch_size), ("--max-pixels", max_pixels)):
        if value is not None and value < 1:
            raise InputError(f"{flag} must be positive, got {value}")
    if out is not None:
        check_output_file(out, overwrite=overwrite)  # before any work
    files = find_images(images)
    try:
        model = load_checkpoint(checkpoint, map_location=resolve_device(device))
    except CheckpointError as e:
        raise CheckpointError(f"cannot load checkpoint {checkpoint}: {e}") from e
    if sparse:
        from ..sparse import to_sparse

        model = to_sparse(model)
    predictions = predict(model, files, topk=topk, batch_size=batch_size, max_pixels=max_pixels, progress=progress)
    if out is not None:
        check_output_file(out, overwrite=overwrite)  # still free after the work
        atomic_write_bytes(out, "".join(dumps_json(p.to_dict()) + "\n" for p in predictions).encode())
    return predictions


def format_table(predictions: list) -> str:
    """The terminal table: image, class, probability, MFLOPs, ponder cost; further classes on their own lines."""
    rows = [("image", "class", "prob", "MFLOPs", "ponder")]
    for p in predictions:
        for rank, (index, name, prob) in enumerate(p.topk):
            first = rank == 0
            rows.append((str(p.image) if first else "", name if name is not None else str(index), f"{prob:.3f}",
                         f"{p.flops / 1e6:.2f}" if first else "", f"{p.ponder_cost:.3f}" if first else ""))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:>{widths[3]}}  "
                     f"{r[4]:>{widths[4]}}".rstrip() for r in rows)
