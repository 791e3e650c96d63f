"""Bilinear resizing of 2-D maps shared by the saliency metrics and baselines."""

from __future__ import annotations

import numpy as np

__all__ = ["resize_bilinear"]


def _axis_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # Half-pixel-centre convention: output pixel i covers the input interval
    # [i * s, (i + 1) * s) with s = n_in / n_out, sampled at its centre.
    x = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    x = np.clip(x, 0.0, n_in - 1)
    i0 = np.floor(x).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = x - i0
    return i0, i1, frac


def resize_bilinear(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resizes a 2-D map with bilinear interpolation.

    Pixel centres are aligned (the convention of PIL, OpenCV and
    ``torch.nn.functional.interpolate(..., align_corners=False)``); samples
    outside the input are clamped to the border. No anti-aliasing is applied
    when shrinking, so large reductions alias; the intended use is upsampling
    a coarse model map to the stimulus size.

    Args:
        array: Map of shape ``[h, w]``.
        size: Target ``(H, W)``.

    Returns:
        ``float64`` array of shape ``[H, W]`` (a copy, also when the size is
        unchanged).

    Raises:
        ValueError: If ``array`` is not 2-D or ``size`` is not two positive
            integers.
    """
    a = np.asarray(array, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"array must be a non-empty 2-D map [H, W], got shape {a.shape}")
    if len(size) != 2 or any(int(s) != s or int(s) < 1 for s in size):
        raise ValueError(f"size must be two positive integers (H, W), got {size!r}")
    out_h, out_w = int(size[0]), int(size[1])
    if a.shape == (out_h, out_w):
        return a.copy()
    r0, r1, fr = _axis_weights(a.shape[0], out_h)
    rows = a[r0] * (1.0 - fr)[:, None] + a[r1] * fr[:, None]  # [H, w]
    c0, c1, fc = _axis_weights(a.shape[1], out_w)
    return rows[:, c0] * (1.0 - fc) + rows[:, c1] * fc
