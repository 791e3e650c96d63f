"""Baseline saliency maps and post-processing of model maps.

* :func:`center_bias`: a Gaussian centred on the image, the classic baseline
  that already beats many models on free-viewing data.
* :func:`uniform`: a constant map, the "chance" baseline (AUC 0.5, NSS 0,
  CC 0 with the conventions of :mod:`sact.saliency.metrics`).
* :func:`postprocess`: turns a coarse model map (e.g. an SACT ponder-cost map
  of a few cells per side) into a stimulus-sized saliency map.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from sact.saliency._resize import resize_bilinear

__all__ = ["DEFAULT_SIGMA_FRAC", "center_bias", "postprocess", "uniform"]

#: Default Gaussian width of :func:`center_bias`, as a fraction of each side.
DEFAULT_SIGMA_FRAC = 0.25


def _check_size(height: int, width: int) -> tuple[int, int]:
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return int(height), int(width)


def center_bias(height: int, width: int, *, sigma_frac: float = DEFAULT_SIGMA_FRAC) -> np.ndarray:
    """Gaussian centre-bias map.

    ``exp(-((y - cy)^2 / (2 sy^2) + (x - cx)^2 / (2 sx^2)))`` with the centre
    ``(cy, cx) = ((H - 1) / 2, (W - 1) / 2)`` in pixel coordinates and
    ``sy = sigma_frac * H``, ``sx = sigma_frac * W``: the Gaussian is stretched
    with the image's aspect ratio (as Judd et al.'s centre prior), so the same
    ``sigma_frac`` fits landscape and portrait images.

    Args:
        height: Map height ``H`` in pixels.
        width: Map width ``W`` in pixels.
        sigma_frac: Standard deviation as a fraction of each side, ``> 0``.

    Returns:
        ``float64`` map ``[H, W]`` with values in ``(0, 1]``, ``1`` at the
        centre pixel(s) (up to rounding for even sizes).

    Raises:
        ValueError: If ``height``/``width`` are not positive integers or
            ``sigma_frac`` is not a positive finite number.
    """
    h, w = _check_size(height, width)
    if not (isinstance(sigma_frac, (int, float, np.floating)) and np.isfinite(sigma_frac)
            and sigma_frac > 0):
        raise ValueError(f"sigma_frac must be a positive number, got {sigma_frac!r}")
    y = (np.arange(h) - (h - 1) / 2.0) / (sigma_frac * h)
    x = (np.arange(w) - (w - 1) / 2.0) / (sigma_frac * w)
    return np.exp(-0.5 * y[:, None] ** 2) * np.exp(-0.5 * x[None, :] ** 2)


def uniform(height: int, width: int) -> np.ndarray:
    """Constant ("chance") saliency map.

    Args:
        height: Map height ``H`` in pixels.
        width: Map width ``W`` in pixels.

    Returns:
        ``float64`` map ``[H, W]`` of ones.

    Raises:
        ValueError: If ``height``/``width`` are not positive integers.
    """
    h, w = _check_size(height, width)
    return np.ones((h, w), dtype=np.float64)


def postprocess(
    saliency_map: np.ndarray,
    *,
    size: tuple[int, int],
    blur_sigma: float | None = None,
    center_bias_weight: float = 0.0,
    center_bias_sigma_frac: float = DEFAULT_SIGMA_FRAC,
) -> np.ndarray:
    """Upsamples, blurs, normalises and centre-biases a model map.

    Steps, in order:

    1. **Upsample** ``saliency_map`` to ``size`` with bilinear interpolation
       (pixel centres aligned; see :func:`~sact.saliency.metrics.resize_bilinear`).
    2. **Blur** (if ``blur_sigma`` is given) with a Gaussian of standard
       deviation ``blur_sigma * W`` pixels -- ``blur_sigma`` is a *fraction of
       the output width*, so one value fits every resolution (e.g. ``0.02`` is
       38.4 px on a 1920-px-wide CAT2000 stimulus). Borders are extended with
       the nearest value (``scipy.ndimage.gaussian_filter(mode="nearest")``).
    3. **Normalise** to ``[0, 1]`` by min-max scaling (a constant map becomes
       all zeros), so that the centre-bias weight means the same for every
       map. The metrics are invariant to this except KL and SIM, which depend
       on the map's offset; min-max scaling is also what SIM applies itself.
    4. **Centre bias** (if ``center_bias_weight > 0``): the convex combination
       ``(1 - w) * map + w * center_bias(H, W, sigma_frac=center_bias_sigma_frac)``.

    Args:
        saliency_map: Model map ``[h, w]`` (e.g. a ponder-cost map).
        size: Output ``(H, W)``, normally the stimulus size.
        blur_sigma: Gaussian blur standard deviation as a fraction of ``W``
            (``> 0``), or ``None`` for no blur.
        center_bias_weight: ``w`` in ``[0, 1]``; ``0`` keeps the model map,
            ``1`` returns the pure centre bias.
        center_bias_sigma_frac: ``sigma_frac`` of the centre bias.

    Returns:
        ``float64`` map ``[H, W]`` with values in ``[0, 1]``.

    Raises:
        ValueError: On a non-2-D or non-finite ``saliency_map``, a bad
            ``size``, ``blur_sigma <= 0``, or ``center_bias_weight`` outside
            ``[0, 1]``.
    """
    a = np.asarray(saliency_map, dtype=np.float64)
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"saliency_map must be a non-empty 2-D map [h, w], got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError("saliency_map contains NaN or inf values")
    try:
        out_h, out_w = size
    except (TypeError, ValueError):
        raise ValueError(f"size must be (H, W), got {size!r}") from None
    out_h, out_w = _check_size(out_h, out_w)
    if blur_sigma is not None and not (
        isinstance(blur_sigma, (int, float, np.floating)) and np.isfinite(blur_sigma) and blur_sigma > 0
    ):
        raise ValueError(f"blur_sigma must be a positive fraction of the width or None, got {blur_sigma!r}")
    if not (isinstance(center_bias_weight, (int, float, np.floating)) and 0.0 <= center_bias_weight <= 1.0):
        raise ValueError(f"center_bias_weight must be in [0, 1], got {center_bias_weight!r}")

    m = resize_bilinear(a, (out_h, out_w))
    if blur_sigma is not None:
        m = gaussian_filter(m, sigma=float(blur_sigma) * out_w, mode="nearest")
    lo, hi = m.min(), m.max()
    m = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
    if center_bias_weight > 0:
        cb = center_bias(out_h, out_w, sigma_frac=center_bias_sigma_frac)
        m = (1.0 - center_bias_weight) * m + center_bias_weight * cb
    return m
