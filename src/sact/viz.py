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

__all__ = ["summed_map", "colorize", "overlay", "to_display", "ponder_overlay_grid"]


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
    images: Tensor, stages: Sequence[StageOutput], *, max_images: int = 4, border: int = 2
) -> np.ndarray:
    """Rows of ``[image | ponder map | overlay]`` for TensorBoard and reports.

    Args:
        images: ``[B, C, H, W]`` model inputs.
        stages: the model output's stages for these images.
        max_images: rows drawn.
        border: black pixels between panels.

    Returns:
        ``[rows*H + ..., 3*W + ..., 3]`` uint8 (channels last; TensorBoard: ``dataformats="HWC"``).
    """
    h, w = images.shape[-2:]
    maps = summed_map(stages, (h, w)).detach().cpu().numpy()
    n = min(max_images, images.shape[0])
    vmin, vmax = float(maps[:n].min()), float(maps[:n].max())
    rows = []
    for i in range(n):
        img = (to_display(images[i]) * 255 + 0.5).astype(np.uint8)
        panels = [img, colorize(maps[i], vmin=vmin, vmax=vmax), overlay(images[i], maps[i], vmin=vmin, vmax=vmax)]
        sep = np.zeros((h, border, 3), np.uint8)
        rows.append(np.concatenate([panels[0], sep, panels[1], sep, panels[2]], axis=1))
        rows.append(np.zeros((border, rows[-1].shape[1], 3), np.uint8))
    return np.concatenate(rows[:-1], axis=0)
