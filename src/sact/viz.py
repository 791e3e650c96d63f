"""Ponder-cost maps: summing stage maps and rendering them (one rendering code path).

Reference ``summary_utils.sact_map`` / ``sact_image_heatmap`` / ``draw_ponder_maps.py``
(spec section 8): each stage's ``[B, h, w]`` map is nearest-neighbour resized to the
input resolution and the stages are **summed**; maps are drawn with **viridis**.
Every picture of a ponder map in this package (CLI, demo report, TensorBoard) goes
through :func:`colorize` and :func:`overlay`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .stage import StageOutput

__all__ = [
    "summed_map",
    "colorize",
    "overlay",
    "to_display",
    "ponder_overlay_grid",
    "overlay_grid",
    "value_counts",
    "percentile_range",
    "png_bytes",
    "map_figure_png",
    "stages_figure_png",
]


def summed_map(stages: Sequence[StageOutput], size: tuple[int, int], *, field: str = "ponder_map") -> Tensor:
    """Sum of the stages' maps, each nearest-resized to ``size``.

    Args:
        stages: the model output's ``stages``.
        size: ``(H, W)`` of the input image.
        field: ``"ponder_map"`` or ``"num_units"``.

    Returns:
        ``[B, H, W]`` float map (for ponder cost: at least 2 per stage).
    """
    total = None
    for s in stages:
        m = getattr(s, field).float().unsqueeze(1)  # [B, 1, h, w]
        m = F.interpolate(m, size=size, mode="nearest")[:, 0]
        total = m if total is None else total + m
    if total is None:
        raise ValueError("no stages to sum")
    return total


def colorize(values: np.ndarray, *, vmin: float | None = None, vmax: float | None = None, cmap: str = "viridis") -> np.ndarray:
    """Map a ``[H, W]`` array to ``[H, W, 3]`` uint8 colours (default range: min..max)."""
    import matplotlib

    values = np.asarray(values, dtype=np.float64)
    lo = float(values.min()) if vmin is None else float(vmin)
    hi = float(values.max()) if vmax is None else float(vmax)
    scaled = np.zeros_like(values) if hi <= lo else np.clip((values - lo) / (hi - lo), 0.0, 1.0)
    rgba = matplotlib.colormaps[cmap](scaled)
    return (rgba[..., :3] * 255.0 + 0.5).astype(np.uint8)


def to_display(image: np.ndarray | Tensor) -> np.ndarray:
    """Any image (``[C, H, W]`` tensor or ``[H, W]`` / ``[H, W, C]`` array, any range) ->
    ``[H, W, 3]`` float in [0, 1], min-max normalised per image (reference heat map)."""
    if isinstance(image, Tensor):
        image = image.detach().float().cpu().numpy()
        if image.ndim == 3:
            image = np.moveaxis(image, 0, -1)
    image = np.asarray(image, dtype=np.float64)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    lo, hi = image.min(), image.max()
    return (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)


def overlay(
    image: np.ndarray | Tensor,
    values: np.ndarray,
    *,
    vmin: float | None = None,
    vmax: float | None = None,
    alpha: float = 0.6,
    cmap: str = "viridis",
) -> np.ndarray:
    """Blend the colourised map over the image: ``[H, W, 3]`` uint8."""
    base = to_display(image)
    heat = colorize(values, vmin=vmin, vmax=vmax, cmap=cmap).astype(np.float64) / 255.0
    if base.shape[:2] != heat.shape[:2]:
        raise ValueError(f"image {base.shape[:2]} and map {heat.shape[:2]} differ in size")
    return ((1.0 - alpha) * base * 255.0 + alpha * heat * 255.0 + 0.5).clip(0, 255).astype(np.uint8)


def ponder_overlay_grid(
    images: Tensor, stages: Sequence[StageOutput], *, field: str = "ponder_map", max_images: int = 4, border: int = 2
) -> np.ndarray:
    """Rows of ``[image | summed map | overlay]`` for TensorBoard and reports.

    Args:
        images: ``[B, C, H, W]`` model inputs.
        stages: the model output's stages for these images.
        field: ``"ponder_map"`` or ``"num_units"`` (the reference's two summaries).
        max_images: rows drawn.
        border: black pixels between panels.

    Returns:
        ``[rows*H + ..., 3*W + ..., 3]`` uint8 (channels last; TensorBoard: ``dataformats="HWC"``).
    """
    n = min(max_images, images.shape[0])
    maps = summed_map(stages, tuple(images.shape[-2:]), field=field)[:n]
    return overlay_grid(list(images[:n]), list(maps), border=border)


def overlay_grid(images: Sequence[Tensor], maps: Sequence[Tensor], *, border: int = 2) -> np.ndarray:
    """Rows of ``[image | map | overlay]``, one colour range over all maps.

    Args:
        images: per row a ``[C, H, W]`` image (rows may differ in size).
        maps: per row the ``[H, W]`` map drawn over it.
        border: black pixels between panels and rows.

    Returns:
        ``[H_total, W_max, 3]`` uint8 (narrower rows padded with black on the right).
    """
    if not images or len(images) != len(maps):
        raise ValueError(f"need one map per image, got {len(images)} images and {len(maps)} maps")
    arrays = [m.detach().float().cpu().numpy() for m in maps]
    vmin, vmax = min(float(a.min()) for a in arrays), max(float(a.max()) for a in arrays)
    rows = []
    for image, values in zip(images, arrays):
        h = values.shape[0]
        img = (to_display(image) * 255 + 0.5).astype(np.uint8)
        panels = [img, colorize(values, vmin=vmin, vmax=vmax), overlay(image, values, vmin=vmin, vmax=vmax)]
        sep = np.zeros((h, border, 3), np.uint8)
        rows.append(np.concatenate([panels[0], sep, panels[1], sep, panels[2]], axis=1))
    width = max(r.shape[1] for r in rows)
    out = []
    for r in rows:
        out.append(np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))))
        out.append(np.zeros((border, width, 3), np.uint8))
    return np.concatenate(out[:-1], axis=0)


# ---------------------------------------------------------------------------
# Colour ranges and files (``sact ponder-map``); the pictures still go through colorize.


def value_counts(values: np.ndarray | Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values of a map and how often each occurs (sorted ascending).

    A summed map is piecewise constant (nearest upsampling), so this is a lossless and
    much smaller summary from which :func:`percentile_range` gets exact percentiles.
    """
    if isinstance(values, Tensor):
        values = values.detach().cpu().numpy()
    return np.unique(np.asarray(values, dtype=np.float64).ravel(), return_counts=True)


def percentile_range(
    summaries: Sequence[tuple[np.ndarray, np.ndarray]], *, low: float = 0.1, high: float = 99.9
) -> tuple[float, float]:
    """The ``low``-th and ``high``-th percentiles over all maps together.

    Equals ``np.percentile(np.concatenate([m.ravel() for m in maps]), [low, high])``
    (linear interpolation) without holding every map in memory (reference
    ``draw_ponder_maps.py``: 0.1..99.9 over all maps, shared colour range).

    Args:
        summaries: :func:`value_counts` of each map.
        low: lower percentile in [0, 100].
        high: upper percentile in [low, 100].

    Raises:
        ValueError: no values, or bad percentiles.
    """
    if not 0.0 <= low <= high <= 100.0:
        raise ValueError(f"need 0 <= low <= high <= 100, got low={low}, high={high}")
    if not summaries:
        raise ValueError("no maps to take percentiles of")
    vals, counts = value_counts(np.concatenate([v for v, _ in summaries]))  # merge duplicates
    counts = np.zeros(len(vals), np.int64)
    for v, c in summaries:
        np.add.at(counts, np.searchsorted(vals, v), c)
    cum = np.cumsum(counts)
    n = int(cum[-1])
    if n == 0:
        raise ValueError("no values in the maps")

    def at(q: float) -> float:  # numpy's default "linear" method on the expanded array
        pos = q / 100.0 * (n - 1)
        lo = int(np.floor(pos))
        hi = min(lo + 1, n - 1)
        a, b = vals[np.searchsorted(cum, lo, side="right")], vals[np.searchsorted(cum, hi, side="right")]
        return float(a + (pos - lo) * (b - a))

    return at(low), at(high)


def png_bytes(image: np.ndarray) -> bytes:
    """``[H, W]`` or ``[H, W, 3]`` uint8 -> PNG file contents."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
    return buf.getvalue()


def _figure_png(fig) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def map_figure_png(
    values: np.ndarray, *, vmin: float, vmax: float, title: str | None = None, label: str = "ponder cost",
    cmap: str = "viridis", image: np.ndarray | Tensor | None = None, alpha: float = 0.6,
) -> bytes:
    """A map drawn with :func:`colorize` (or, given ``image``, blended over it with
    :func:`overlay`) next to a colour bar over ``[vmin, vmax]`` (PNG bytes).

    Args:
        values: ``[H, W]`` map.
        vmin, vmax: colour range (values outside are clipped to the ends).
        title: optional title above the map.
        label: colour bar label.
        image: draw the overlay of the map on this image (same ``H, W``).
        alpha: the map's weight in the overlay.
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    values = np.asarray(values)
    h, w = values.shape
    # Why: show small maps (CIFAR, 32-64 px) enlarged and photos near native size.
    scale = min(max(320 / max(h, w), 1.0), 800 / max(h, w)) if max(h, w) < 320 else min(1.0, 800 / max(h, w))
    fig = Figure(figsize=(w * scale / 100 + 1.4, h * scale / 100 + (0.5 if title else 0.2)), dpi=100,
                 layout="constrained")
    ax = fig.add_subplot()
    picture = colorize(values, vmin=vmin, vmax=vmax, cmap=cmap) if image is None else \
        overlay(image, values, vmin=vmin, vmax=vmax, alpha=alpha, cmap=cmap)
    ax.imshow(picture, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    bar = fig.colorbar(ScalarMappable(norm=Normalize(vmin=vmin, vmax=vmax), cmap=cmap), ax=ax, shrink=0.9)
    bar.set_label(label)
    return _figure_png(fig)


def stages_figure_png(
    stage_maps: Sequence[np.ndarray | Tensor], *, vmin: float | None = None, vmax: float | None = None,
    cmap: str = "viridis",
) -> bytes:
    """Each stage's ``[h_s, w_s]`` map side by side at its own resolution, one shared
    colour range (default: min..max over the stages) and one colour bar (PNG bytes)."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    maps = [m.detach().cpu().numpy() if isinstance(m, Tensor) else np.asarray(m) for m in stage_maps]
    if not maps:
        raise ValueError("no stage maps to draw")
    lo = min(float(m.min()) for m in maps) if vmin is None else vmin
    hi = max(float(m.max()) for m in maps) if vmax is None else vmax
    h0, w0 = maps[0].shape
    panel = 2.6
    fig = Figure(figsize=(panel * len(maps) + 1.2, panel * h0 / w0 + 0.6), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(maps), squeeze=False)[0]
    for i, (ax, m) in enumerate(zip(axes, maps)):
        ax.imshow(colorize(m, vmin=lo, vmax=hi, cmap=cmap), interpolation="nearest")
        ax.set_title(f"stage {i + 1} ({m.shape[0]}x{m.shape[1]})", fontsize=9)
        ax.set_axis_off()
    bar = fig.colorbar(ScalarMappable(norm=Normalize(vmin=lo, vmax=hi), cmap=cmap), ax=list(axes), shrink=0.9)
    bar.set_label("ponder cost")
    return _figure_png(fig)
