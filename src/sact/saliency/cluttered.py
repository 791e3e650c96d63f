"""Saliency evaluation on Cluttered Fashion-MNIST, with object masks as ground truth.

CAT2000's human fixations are not available everywhere; Cluttered
Fashion-MNIST is (it is generated from Fashion-MNIST). Each canvas holds one
object among dimmed clutter patches, and we know where the object is. The
question "does the network spend its computation on the object?" becomes a
saliency evaluation with the MIT metrics:

* **fixations** (``fixation_locs``): the pixels of the object's silhouette
  (``item["mask"]``, pixels where the pasted item exceeds the dataset's
  ``mask_threshold``) -- the natural "where is the object". With
  ``ground_truth="box"``, the pixels inside its tight box instead (also
  background between the object's parts). A blank item with an empty mask
  falls back to its box, and such items are counted.
* **fixation density** (``fixation_map``): the same pixels as a uniform
  distribution (the mask divided by its pixel count), for CC, KL and SIM.
* **category**: the object's Fashion-MNIST class, so the report has one row
  per class and an overall row.

Shuffled AUC draws its negatives from other canvases of the whole set
(``shuffled_pool="dataset"``): object positions do not depend on the class.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from sact.saliency.baselines import center_bias, uniform
from sact.saliency.model import evaluate_methods, model_saliency_batch, untrained_like

__all__ = [
    "GROUND_TRUTHS",
    "ClutteredSaliencyItem",
    "cluttered_items",
    "cluttered_methods",
    "evaluate_cluttered",
]

#: Accepted ``ground_truth`` values.
GROUND_TRUTHS = ("mask", "box")


@dataclass(frozen=True, eq=False)
class ClutteredSaliencyItem:
    """One canvas as a saliency item (see :func:`sact.saliency.evaluate_dataset`).

    Attributes:
        category: The object's class name (e.g. ``"Sneaker"``).
        name: ``"<index>"`` zero-padded to 5 digits.
        index: Index in the dataset.
        label: Class index.
        image: Float ``[1, S, S]`` in ``[0, 1]``.
        fixation_locs: Bool ``[S, S]``: the object pixels (mask or box).
        fixation_map: Float64 ``[S, S]``: ``fixation_locs`` divided by its count.
        fallback: True when the mask was empty and the box was used.
    """

    category: str
    name: str
    index: int
    label: int
    image: Tensor
    fixation_locs: np.ndarray
    fixation_map: np.ndarray
    fallback: bool = False


def _box_pixels(box: Tensor | np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    # Pixel-edge coordinates: pixel (r, c) is inside when x0 <= c < x1 and y0 <= r < y1
    # (see ClutteredFashionMNIST); rounding outwards keeps fractional boxes covered.
    x0, y0, x1, y1 = (float(v) for v in box)
    h, w = shape
    r0, r1 = max(0, int(np.floor(y0))), min(h, int(np.ceil(y1)))
    c0, c1 = max(0, int(np.floor(x0))), min(w, int(np.ceil(x1)))
    out = np.zeros(shape, dtype=bool)
    out[r0:r1, c0:c1] = True
    return out


def cluttered_items(
    dataset: Sequence[Mapping[str, Any]],
    *,
    ground_truth: str = "mask",
    indices: Sequence[int] | None = None,
    classes: Sequence[str] | None = None,
) -> list[ClutteredSaliencyItem]:
    """Turns Cluttered Fashion-MNIST samples into saliency items.

    Args:
        dataset: A :class:`sact.data.ClutteredFashionMNIST` (or any sequence of
            dicts with ``image`` ``[1, S, S]``, ``label``, ``box`` ``[4]``,
            ``mask`` bool ``[S, S]``).
        ground_truth: ``"mask"`` (object silhouette) or ``"box"`` (its tight box).
        indices: Which samples (default: all).
        classes: Class names (default: ``dataset.classes``, else the label as text).

    Returns:
        The items, in the order of ``indices``.

    Raises:
        ValueError: On an unknown ``ground_truth``, an empty selection, or a
            sample whose object covers no pixel or every pixel.
    """
    if ground_truth not in GROUND_TRUTHS:
        raise ValueError(f"ground_truth must be one of {GROUND_TRUTHS}, got {ground_truth!r}")
    indices = range(len(dataset)) if indices is None else indices
    classes = classes if classes is not None else getattr(dataset, "classes", None)
    items = []
    for i in indices:
        s = dataset[i]
        mask = np.asarray(s["mask"], dtype=bool)
        fallback = False
        if ground_truth == "box" or not mask.any():
            fallback = ground_truth == "mask"
            mask = _box_pixels(s["box"], mask.shape)
        n = int(mask.sum())
        if n == 0 or n == mask.size:
            raise ValueError(f"sample {i}: the object covers {n} of {mask.size} pixels; cannot score it")
        label = int(s["label"])
        category = str(classes[label]) if classes is not None and 0 <= label < len(classes) else str(label)
        items.append(ClutteredSaliencyItem(
            category=category,
            name=f"{int(i):05d}",
            index=int(i),
            label=label,
            image=torch.as_tensor(s["image"]).float(),
            fixation_locs=mask,
            fixation_map=mask / float(n),
            fallback=fallback,
        ))
    if not items:
        raise ValueError("no samples selected")
    return items


def _batched_maps(
    model: nn.Module,
    items: Sequence[ClutteredSaliencyItem],
    *,
    batch_size: int,
    desc: str,
    progress: bool,
    **options: Any,
) -> dict[int, np.ndarray]:
    maps: dict[int, np.ndarray] = {}
    starts = range(0, len(items), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress):
        chunk = items[start : start + batch_size]
        out = model_saliency_batch(model, torch.stack([it.image for it in chunk]), **options)
        maps.update({it.index: m for it, m in zip(chunk, out)})
    return maps


def cluttered_methods(
    model: nn.Module,
    items: Sequence[ClutteredSaliencyItem],
    *,
    baselines: bool = True,
    untrained_seed: int = 0,
    blur_sigma: float | None = None,
    center_bias_weight: float = 0.0,
    batch_size: int = 100,
    progress: bool = True,
) -> dict[str, Callable[[ClutteredSaliencyItem], np.ndarray]]:
    """The saliency functions compared on Cluttered Fashion-MNIST.

    The model maps are computed here, in batches; the returned functions look
    them up. Methods, in order:

    * ``"sact"``: ``model``'s ponder map (post-processed with ``blur_sigma``
      and ``center_bias_weight``).
    * with ``baselines``: ``"untrained_sact"`` (same architecture, fresh
      initialisation with ``untrained_seed``, same post-processing),
      ``"center_bias"`` (Gaussian, ``sigma`` a quarter of each side),
      ``"uniform"`` (chance) and ``"intensity"`` (the canvas itself: objects
      are brighter than the dimmed clutter, so this is the trivial
      "look at bright pixels" detector a ponder map has to be compared with).

    Args:
        model: The trained model (1 input channel).
        items: From :func:`cluttered_items`.
        baselines: Add the baselines.
        untrained_seed: Seed of the untrained model.
        blur_sigma: Blur of the model maps (fraction of the width) or ``None``.
        center_bias_weight: Centre-bias weight of the model maps.
        batch_size: Images per forward pass, ``>= 1``.
        progress: Show progress bars.

    Returns:
        ``{method: saliency_fn}``.

    Raises:
        ValueError: On ``batch_size < 1`` or bad post-processing options.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    items = list(items)
    options = {"blur_sigma": blur_sigma, "center_bias_weight": center_bias_weight}
    models = {"sact": model}
    if baselines:
        models["untrained_sact"] = untrained_like(model, seed=untrained_seed)
    methods: dict[str, Callable[[ClutteredSaliencyItem], np.ndarray]] = {}
    for name, m in models.items():
        maps = _batched_maps(m, items, batch_size=batch_size, desc=f"{name} maps", progress=progress, **options)
        methods[name] = lambda item, maps=maps: maps[item.index]
    if baselines:
        methods["center_bias"] = lambda item: center_bias(*item.fixation_locs.shape)
        methods["uniform"] = lambda item: uniform(*item.fixation_locs.shape)
        methods["intensity"] = lambda item: item.image.double().mean(0).numpy()
    return methods


def evaluate_cluttered(
    model: nn.Module,
    *,
    num_images: int = 500,
    seed: int = 0,
    data_dir: str | Path | None = None,
    ground_truth: str = "mask",
    baselines: bool = True,
    untrained_seed: int = 0,
    blur_sigma: float | None = None,
    center_bias_weight: float = 0.0,
    batch_size: int = 100,
    metrics: Sequence[str] | None = None,
    n_other: int | None = 10,
    metric_seed: int = 0,
    out_dir: str | Path | None = None,
    config: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Scores ponder maps as object detectors on Cluttered Fashion-MNIST test canvases.

    Args:
        model: Trained model taking 1-channel 64x64 canvases.
        num_images: Test canvases ``0 .. num_images - 1`` of
            ``ClutteredFashionMNIST(split="test", seed=seed)``.
        seed: Dataset seed.
        data_dir: Fashion-MNIST folder (see :func:`sact.data.find_fashion_mnist`).
        ground_truth: ``"mask"`` or ``"box"`` (see the module docstring).
        baselines: Also score the baselines of :func:`cluttered_methods`.
        untrained_seed: Seed of the untrained SACT baseline.
        blur_sigma: Blur of the model maps (fraction of the width) or ``None``.
        center_bias_weight: Centre-bias weight of the model maps.
        batch_size: Images per forward pass.
        metrics: Metric names (default: all).
        n_other: Other canvases per shuffled-AUC negative set.
        metric_seed: Seed of the random metrics.
        out_dir: Where to write per-method reports (``<out_dir>/<method>/saliency.{json,md}``),
            or ``None``.
        config: Extra entries recorded in each result's ``"config"``.
        progress: Show progress bars.

    Returns:
        ``{method: results of evaluate_dataset}``; each result's ``config``
        also records the dataset (``dataset``) and how many masks fell back to
        the box (``mask_fallbacks``).
    """
    from sact.data import ClutteredFashionMNIST

    dataset = ClutteredFashionMNIST(split="test", num_samples=num_images, seed=seed, data_dir=data_dir)
    items = cluttered_items(dataset, ground_truth=ground_truth)
    methods = cluttered_methods(model, items, baselines=baselines, untrained_seed=untrained_seed,
                                blur_sigma=blur_sigma, center_bias_weight=center_bias_weight,
                                batch_size=batch_size, progress=progress)
    info = {
        "dataset": {"name": "ClutteredFashionMNIST", "split": "test", "num_images": num_images, "seed": seed,
                    "ground_truth": ground_truth},
        "mask_fallbacks": sum(it.fallback for it in items),
        "blur_sigma": blur_sigma,
        "center_bias_weight": center_bias_weight,
        "untrained_seed": untrained_seed if baselines else None,
        **dict(config or {}),
    }
    return evaluate_methods(items, methods, out_dir=out_dir, title="Cluttered Fashion-MNIST saliency",
                            config=info, progress=progress, metrics=metrics, shuffled_pool="dataset",
                            n_other=n_other, seed=metric_seed)
