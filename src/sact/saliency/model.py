"""Saliency maps from an SACT model: its summed ponder-cost map, post-processed.

The paper scores the ponder-cost maps of an SACT network, never trained on
saliency, as saliency maps (Figurnov et al., CVPR 2017, Sec. 5). A map here is

1. the summed ponder map of :func:`sact.ponder_map` (every stage's map
   nearest-upsampled to the model input resolution and summed, as the
   reference ``sact_map``), then
2. :func:`sact.saliency.baselines.postprocess`: bilinear upsampling to the
   stimulus size, optional Gaussian blur (``blur_sigma``, a fraction of the
   width), min-max normalisation to ``[0, 1]``, optional convex combination
   with a Gaussian centre bias (``center_bias_weight``).

:func:`model_saliency` handles one image of any size (the reference keeps the
whole image, no crop); :func:`model_saliency_batch` runs one forward pass for
a batch of equally sized images and gives the same maps.
:func:`untrained_like` builds the "untrained SACT" baseline: the same
architecture with a fresh, seeded initialisation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sact.saliency.baselines import DEFAULT_SIGMA_FRAC, postprocess

__all__ = ["evaluate_methods", "model_saliency", "model_saliency_batch", "untrained_like", "write_comparison"]


def _image_size(image) -> tuple[int, int]:
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.height, image.width
    shape = tuple(image.shape)
    if isinstance(image, np.ndarray):
        # numpy is [H, W] or [H, W, C] (see sact.data.to_float_image)
        if len(shape) in (2, 3):
            return int(shape[0]), int(shape[1])
    elif len(shape) in (2, 3):  # tensors are [H, W] or [C, H, W]
        return int(shape[-2]), int(shape[-1])
    raise ValueError(f"image must be [H, W] or [C, H, W] (numpy: [H, W, C]), got shape {shape}")


def model_saliency(
    model: nn.Module,
    image,
    *,
    size: tuple[int, int] | None = None,
    blur_sigma: float | None = None,
    center_bias_weight: float = 0.0,
    center_bias_sigma_frac: float = DEFAULT_SIGMA_FRAC,
    preprocess=None,
    max_side: int | None = None,
) -> np.ndarray:
    """Saliency map of one image: its summed ponder map, post-processed.

    Args:
        model: A model from :func:`sact.create_model` / :func:`sact.load_checkpoint`
            (SACT for spatial maps; ACT and vanilla maps are constant per stage).
        image: PIL image, tensor ``[H, W]`` / ``[C, H, W]`` or numpy ``[H, W]`` /
            ``[H, W, C]`` (uint8 or floats in ``[0, 1]``), as for :func:`sact.ponder_map`.
        size: Output ``(H, W)``, normally the stimulus size; ``None`` keeps the
            size of ``image`` (before ``max_side``).
        blur_sigma: Gaussian blur standard deviation as a fraction of the output
            width (e.g. ``0.02``), or ``None`` for no blur.
        center_bias_weight: Weight ``w`` in ``[0, 1]`` of the centre bias in
            ``(1 - w) * map + w * centre_bias``.
        center_bias_sigma_frac: Width of that centre bias (fraction of each side).
        preprocess: A :class:`sact.data.Preprocess` (or its dict), used only when
            the model carries no checkpoint preprocess (see :func:`sact.ponder_map`).
        max_side: Run the model on the image resized (bicubic, aspect kept) so
            that its longer side is ``max_side`` (faster on large stimuli; the
            map is still returned at ``size``).

    Returns:
        ``float64`` map ``[H, W]`` with values in ``[0, 1]`` (all zeros for a
        constant ponder map without centre bias).

    Raises:
        ValueError: A bad image, ``size``, ``blur_sigma``, ``center_bias_weight``
            or ``max_side`` (the messages name the value).
    """
    from sact.tools.ponder import ponder_map

    if size is None:
        size = _image_size(image)
    pm = ponder_map(model, image, preprocess=preprocess, max_side=max_side)
    return postprocess(
        pm.summed.double().numpy(),
        size=size,
        blur_sigma=blur_sigma,
        center_bias_weight=center_bias_weight,
        center_bias_sigma_frac=center_bias_sigma_frac,
    )


def model_saliency_batch(
    model: nn.Module,
    images: Tensor | Sequence[Tensor],
    *,
    size: tuple[int, int] | None = None,
    blur_sigma: float | None = None,
    center_bias_weight: float = 0.0,
    center_bias_sigma_frac: float = DEFAULT_SIGMA_FRAC,
    preprocess=None,
) -> np.ndarray:
    """Saliency maps of equally sized images with one forward pass.

    Gives the same maps as :func:`model_saliency` on each image (up to float
    rounding of batched convolutions); the model runs in eval mode without
    gradients, on the device of its parameters.

    Args:
        model: As for :func:`model_saliency`.
        images: Float ``[B, C, H, W]`` in ``[0, 1]`` or uint8, or a sequence of
            ``[C, H, W]`` tensors of one size; channels are converted to
            ``model.in_chans`` like :func:`sact.data.to_float_image`.
        size: Output ``(H', W')``; ``None`` keeps ``(H, W)``.
        blur_sigma: As for :func:`model_saliency`.
        center_bias_weight: As for :func:`model_saliency`.
        center_bias_sigma_frac: As for :func:`model_saliency`.
        preprocess: As for :func:`model_saliency`.

    Returns:
        ``float64`` maps ``[B, H', W']`` in ``[0, 1]``.

    Raises:
        ValueError: An empty batch, images of different sizes, a non-4-D
            tensor, images smaller than the network's total stride (use
            :func:`model_saliency`, which upscales them), or bad
            post-processing options.
    """
    from sact.data import to_float_image
    from sact.tools.ponder import evaluating, model_preprocess, total_stride
    from sact.viz import summed_map

    if isinstance(images, Tensor):
        if images.ndim != 4:
            raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
        images = list(images)
    images = list(images)
    if not images:
        raise ValueError("images is empty")
    shapes = {tuple(im.shape[-2:]) for im in images}
    if len(shapes) != 1:
        raise ValueError(f"images must share one size, got sizes {sorted(shapes)}")
    (h, w) = shapes.pop()
    stride = total_stride(model)
    if min(h, w) < stride:
        raise ValueError(
            f"images of {h}x{w} pixels are smaller than the network's total stride {stride}; "
            "use model_saliency, which upscales them"
        )
    pre = model_preprocess(model, preprocess)
    # Value mapping only (as sact.ponder_map): the whole image is kept, no crop/resize.
    values = dataclasses.replace(pre, image_size=None, central_crop=None)
    x = torch.stack([values(to_float_image(im, pre.in_chans).float()) for im in images])
    param = next(model.parameters())
    with evaluating(model):
        out = model(x.to(device=param.device, dtype=param.dtype))
    summed = summed_map(out.stages, (h, w)).double().cpu().numpy()  # [B, H, W]
    size = (h, w) if size is None else size
    return np.stack([
        postprocess(m, size=size, blur_sigma=blur_sigma, center_bias_weight=center_bias_weight,
                    center_bias_sigma_frac=center_bias_sigma_frac)
        for m in summed
    ])


def untrained_like(model: nn.Module, *, seed: int = 0) -> nn.Module:
    """The same architecture with a fresh initialisation: the "untrained SACT" baseline.

    Separates what training taught the halting branches from what the
    architecture alone does (a randomly initialised network already reacts to
    edges and contrast). The global torch random state is left untouched.

    Args:
        model: A model built by :func:`sact.create_model` (carrying ``sact_config``).
        seed: Seed of the initialisation.

    Returns:
        A new model in eval mode on the device of ``model``'s parameters, with
        ``checkpoint_meta`` copied from ``model`` (so it gets the same preprocessing).

    Raises:
        ValueError: If ``model`` has no ``sact_config``.
    """
    from sact.models import create_model

    model = getattr(model, "module", model)
    config = getattr(model, "sact_config", None)
    if not isinstance(config, dict) or "name" not in config:
        raise ValueError(f"model has no sact_config (build it with sact.create_model), got {config!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = create_model(config["name"], **dict(config.get("kwargs", {})))
    meta = getattr(model, "checkpoint_meta", None)
    if meta is not None:
        fresh.checkpoint_meta = dict(meta)
    param = next(model.parameters())
    return fresh.to(device=param.device, dtype=param.dtype).eval()


def evaluate_methods(
    items: Sequence[Any],
    methods: Mapping[str, Callable[[Any], np.ndarray]],
    *,
    out_dir: str | Path | None = None,
    title: str = "Saliency",
    config: Mapping[str, Any] | None = None,
    progress: bool = True,
    **evaluate_kwargs: Any,
) -> dict[str, dict[str, Any]]:
    """Runs :func:`sact.saliency.evaluate_dataset` for each method.

    With ``out_dir``, each method's report (``<out_dir>/<method>/saliency.json``
    and ``saliency.md``) is written as soon as it is done, so finished methods
    survive a crash of a later one.

    Args:
        items: The items (every method sees the same ones, in the same order).
        methods: ``{name: saliency_fn}``; names become folder names.
        out_dir: Folder for the per-method reports, or ``None``.
        title: Heading prefix of the per-method reports.
        config: Extra entries merged into each result's ``"config"``.
        progress: Show progress bars.
        **evaluate_kwargs: Passed to :func:`evaluate_dataset` (``metrics``,
            ``shuffled_pool``, ``n_other``, ``seed``).

    Returns:
        ``{method: results of evaluate_dataset}``.

    Raises:
        ValueError: On no methods, or any error of :func:`evaluate_dataset`.
    """
    from tqdm.auto import tqdm

    from sact.saliency.evaluate import evaluate_dataset, write_report

    if not methods:
        raise ValueError("methods is empty")
    if not isinstance(items, Sequence):
        items = list(items)
    results = {}
    for name, fn in methods.items():
        if progress:
            tqdm.write(f"evaluating {name}")
        res = evaluate_dataset(items, fn, progress=progress, **evaluate_kwargs)
        res["config"].update(dict(config or {}))
        results[name] = res
        if out_dir is not None:
            write_report(res, Path(out_dir) / name, title=f"{title}: {name}")
    return results


def _fmt(x: Any) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.3f}"


def write_comparison(
    results: Mapping[str, Mapping[str, Any]],
    out_dir: str | Path,
    *,
    title: str = "Saliency evaluation",
    notes: Sequence[str] = (),
) -> tuple[Path, Path]:
    """Writes ``summary.json`` and ``summary.md`` comparing methods side by side.

    The markdown has an overall table (a row per method, a column per metric)
    and, per metric, a table with a row per category and a column per method.
    Files are written atomically.

    Args:
        results: ``{method: results of evaluate_dataset}`` (e.g. from
            :func:`evaluate_methods`); all on the same metrics.
        out_dir: Output folder (created if missing).
        title: Markdown heading.
        notes: Lines printed under the heading (e.g. the command that ran).

    Returns:
        ``(json_path, markdown_path)``.

    Raises:
        ValueError: On empty ``results`` or methods scored on different metrics.
    """
    from sact.io.files import atomic_write_bytes, dumps_json
    from sact.saliency.metrics import METRIC_LABELS

    if not results:
        raise ValueError("results is empty")
    metric_sets = {name: list(r["metrics"]) for name, r in results.items()}
    names = next(iter(metric_sets.values()))
    if any(m != names for m in metric_sets.values()):
        raise ValueError(f"methods were scored on different metrics: {metric_sets}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "metrics": names,
        "overall": {method: dict(r["overall"]) for method, r in results.items()},
        "categories": {method: dict(r["categories"]) for method, r in results.items()},
        "config": {method: dict(r.get("config", {})) for method, r in results.items()},
    }
    json_path, md_path = out / "summary.json", out / "summary.md"
    atomic_write_bytes(json_path, (dumps_json(summary, indent=2) + "\n").encode())

    labels = [METRIC_LABELS.get(m, m) for m in names]
    methods = list(results)
    lines = [f"# {title}", "", *notes, *([""] if notes else [])]
    lines += ["Higher is better except KL (lower is better). Means over images.", "", "## Overall", ""]
    lines += ["| method | n | " + " | ".join(labels) + " |", "|---|---:|" + "---:|" * len(names)]
    for method in methods:
        row = results[method]["overall"]
        lines.append(f"| {method} | {row.get('n', '')} | " + " | ".join(_fmt(row.get(m)) for m in names) + " |")
    categories = list(dict.fromkeys(c for r in results.values() for c in r["categories"]))
    for m, label in zip(names, labels):
        lines += ["", f"## {label} per category", ""]
        lines += ["| category | n | " + " | ".join(methods) + " |", "|---|---:|" + "---:|" * len(methods)]
        for cat in categories + ["**overall**"]:
            rows = [results[k]["overall"] if cat == "**overall**" else results[k]["categories"].get(cat, {})
                    for k in methods]
            n = next((r.get("n") for r in rows if r.get("n") is not None), "")
            lines.append(f"| {cat} | {n} | " + " | ".join(_fmt(r.get(m)) for r in rows) + " |")
    atomic_write_bytes(md_path, ("\n".join(lines) + "\n").encode())
    return json_path, md_path
