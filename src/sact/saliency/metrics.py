"""Fixation-prediction metrics with the MIT saliency benchmark's definitions.

Each function follows the MATLAB reference code of the MIT saliency benchmark
(``cvzoya/saliency``, ``code_forMetrics``; Bylinskii et al., "What do
different evaluation metrics tell us about saliency models?", TPAMI 2018):

================ ======================= ====================
name             function                MATLAB file
================ ======================= ====================
``auc_judd``     :func:`auc_judd`        ``AUC_Judd.m``
``auc_borji``    :func:`auc_borji`       ``AUC_Borji.m``
``auc_shuffled`` :func:`auc_shuffled`    ``AUC_shuffled.m``
``nss``          :func:`nss`             ``NSS.m``
``cc``           :func:`cc`              ``CC.m``
``kl``           :func:`kl_divergence`   ``KLdiv.m``
``sim``          :func:`similarity`      ``similarity.m``
================ ======================= ====================

Inputs:

* ``saliency``: the model's float map ``[h, w]`` (any finite values; the KL
  divergence additionally needs it to be non-negative).
* ``fixations``: binary fixation-location map ``[H, W]``; every non-zero pixel
  is a fixated pixel (each counted once, as in the MATLAB code).
* ``fixation_map``: continuous fixation density map ``[H, W]`` (the blurred
  fixations; any non-negative scale).

**Size handling.** When ``saliency`` has a different size than the fixation
map it is compared with, it is resized to ``[H, W]`` with bilinear
interpolation (pixel centres aligned, see :func:`resize_bilinear`), as the MIT
code does with ``imresize``. (MATLAB's ``imresize`` defaults to bicubic; for the
smooth maps this is used on the difference is negligible, and bilinear keeps
values inside the input's range.) The fixation inputs are never resized.

**Degenerate maps (deviation from the MATLAB code).** A constant saliency map
ranks no pixel above another; the MATLAB code returns NaN for it (division by
``max - min`` or by a zero standard deviation). Here it gets the chance score
of the MIT benchmark's "chance" baseline instead: AUC (all three) ``0.5``,
NSS ``0.0``, CC ``0.0``; KL and SIM treat it as the uniform distribution.
Likewise CC is ``0.0`` when ``fixation_map`` is constant. Inputs that make a
metric meaningless -- no fixated pixel, every pixel fixated, an all-zero
fixation density, NaN/inf values -- raise :class:`ValueError`.

**EMD** is not provided: the MIT benchmark's EMD needs an optimal-transport
solver (FastEMD), and no maintained one (``pyemd``, POT's ``ot``) is a
dependency of this project; a dense LP on the benchmark's 1/32-scale grid
(~2,000 bins, ~4 M transport variables) is too slow to ship as a fallback.

**Randomness.** :func:`auc_judd` (jitter), :func:`auc_borji` and
:func:`auc_shuffled` draw random numbers; pass ``rng`` (an int seed or a
:class:`numpy.random.Generator`) for reproducible scores. ``rng=None`` draws a
fresh unseeded generator.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from sact.saliency._resize import resize_bilinear

__all__ = [
    "MATLAB_EPS",
    "METRICS",
    "METRIC_INPUTS",
    "METRIC_LABELS",
    "auc_borji",
    "auc_judd",
    "auc_shuffled",
    "cc",
    "check_metric_names",
    "evaluate_all",
    "kl_divergence",
    "nss",
    "resize_bilinear",
    "similarity",
]

#: MATLAB's ``eps`` (2^-52 rounded as in the MIT code), the regulariser of KLdiv.
MATLAB_EPS = 2.2204e-16

RngLike = int | np.random.Generator | None


# --------------------------------------------------------------------------- #
# input handling
# --------------------------------------------------------------------------- #
def _as_map(x: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype == bool:
        a = a.astype(np.float64)
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"{name} must be a non-empty 2-D map [H, W], got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.number):
        raise ValueError(f"{name} must be numeric, got dtype {a.dtype}")
    a = a.astype(np.float64, copy=False)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or inf values")
    return a


def _as_fixations(x: np.ndarray, name: str = "fixations") -> np.ndarray:
    f = _as_map(x, name) != 0
    n = int(f.sum())
    if n == 0:
        raise ValueError(f"{name} has no fixated (non-zero) pixel")
    if n == f.size:
        raise ValueError(f"{name} marks every pixel as fixated; there are no non-fixated pixels")
    return f


def _as_density(x: np.ndarray, name: str = "fixation_map") -> np.ndarray:
    a = _as_map(x, name)
    if a.min() < 0:
        raise ValueError(f"{name} must be non-negative, got minimum {a.min()}")
    if not np.any(a):
        raise ValueError(f"{name} is all zero")
    return a


def _saliency_for(saliency: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    s = _as_map(saliency, "saliency")
    if s.shape != shape:
        s = resize_bilinear(s, shape)
    return s


def _rng(rng: RngLike) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or isinstance(rng, (int, np.integer)):
        return np.random.default_rng(rng)
    raise ValueError(f"rng must be an int seed, a numpy Generator or None, got {rng!r}")


def _is_constant(a: np.ndarray) -> bool:
    return bool(a.max() == a.min())


def _minmax(a: np.ndarray) -> np.ndarray:
    lo, hi = a.min(), a.max()
    return (a - lo) / (hi - lo)


def _check_splits(n_splits: int, step: float) -> None:
    if isinstance(n_splits, bool) or not isinstance(n_splits, (int, np.integer)) or n_splits < 1:
        raise ValueError(f"n_splits must be a positive integer, got {n_splits!r}")
    if not (isinstance(step, (int, float, np.floating)) and 0 < step <= 1):
        raise ValueError(f"step must be in (0, 1], got {step!r}")


# --------------------------------------------------------------------------- #
# location-based metrics
# --------------------------------------------------------------------------- #
def auc_judd(
    saliency: np.ndarray,
    fixations: np.ndarray,
    *,
    jitter: bool = True,
    rng: RngLike = None,
) -> float:
    """AUC-Judd: ROC area with the fixated pixels as positives (``AUC_Judd.m``).

    The saliency map is min-max normalised; every saliency value at a fixated
    pixel is a threshold. At the ``i``-th highest such threshold ``t_i`` the
    true-positive rate is ``i / N_fix`` and the false-positive rate is
    ``(#{pixels >= t_i} - i) / (N_pixels - N_fix)``; the curve is closed with
    ``(0, 0)`` and ``(1, 1)`` and integrated with the trapezoidal rule.

    Args:
        saliency: Model map ``[h, w]``; resized bilinearly to ``[H, W]`` if
            its size differs.
        fixations: Binary fixation map ``[H, W]`` (non-zero = fixated).
        jitter: Add uniform noise of amplitude ``1e-7 * (max - min)`` to the
            saliency map to break ties (MATLAB adds ``rand / 1e7``, i.e. the
            same for maps in ``[0, 1]``; scaling by the range makes it
            independent of the map's units).
        rng: Seed or generator for the jitter.

    Returns:
        The AUC in ``[0, 1]``; ``0.5`` for a constant saliency map.

    Raises:
        ValueError: On non-2-D or non-finite inputs, no fixated pixel, or all
            pixels fixated.
    """
    f = _as_fixations(fixations)
    s = _saliency_for(saliency, f.shape)
    if _is_constant(s):
        return 0.5
    if jitter:
        s = s + _rng(rng).random(s.shape) * (1e-7 * (s.max() - s.min()))
    s = _minmax(s).ravel()
    fix = f.ravel()
    n_pix = s.size
    s_th = np.sort(s[fix])[::-1]  # thresholds, descending
    n_fix = s_th.size
    s_sorted = np.sort(s)
    above = n_pix - np.searchsorted(s_sorted, s_th, side="left")  # #{S >= t}
    i = np.arange(1, n_fix + 1)
    tp = np.concatenate([[0.0], i / n_fix, [1.0]])
    fp = np.concatenate([[0.0], (above - i) / (n_pix - n_fix), [1.0]])
    return float(np.trapezoid(tp, fp))


def _threshold_auc(s_th: np.ndarray, negatives: np.ndarray, step: float) -> np.ndarray:
    """AUC_Borji-style AUC per column of ``negatives`` ``[n_neg, n_splits]``."""
    pos = np.sort(s_th)
    n_pos = pos.size
    n_neg = negatives.shape[0]
    neg_sorted = np.sort(negatives, axis=0)
    aucs = np.empty(negatives.shape[1])
    for k in range(negatives.shape[1]):
        top = max(float(pos[-1]), float(neg_sorted[-1, k]))
        # MATLAB ``fliplr(0:step:top)`` (the tolerance mimics the colon
        # operator's rounding so that 0:0.1:1 ends at 1).
        n_th = int(np.floor(top / step + 1e-10)) + 1
        th = (np.arange(n_th) * step)[::-1]
        tp = (n_pos - np.searchsorted(pos, th, side="left")) / n_pos
        fp = (n_neg - np.searchsorted(neg_sorted[:, k], th, side="left")) / n_neg
        tp = np.concatenate([[0.0], tp, [1.0]])
        fp = np.concatenate([[0.0], fp, [1.0]])
        aucs[k] = np.trapezoid(tp, fp)
    return aucs


def auc_borji(
    saliency: np.ndarray,
    fixations: np.ndarray,
    *,
    n_splits: int = 100,
    step: float = 0.1,
    rng: RngLike = None,
) -> float:
    """AUC-Borji: ROC area against uniformly sampled negatives (``AUC_Borji.m``).

    The saliency map is min-max normalised. For each of ``n_splits`` splits,
    ``N_fix`` pixels are drawn uniformly with replacement as negatives; the ROC
    uses the thresholds ``0:step:max`` (max over positives and that split's
    negatives), the true/false-positive rates are the fractions of
    positives/negatives ``>= threshold``, and the trapezoidal areas are
    averaged over splits.

    Args:
        saliency: Model map ``[h, w]``; resized bilinearly to ``[H, W]`` if
            its size differs.
        fixations: Binary fixation map ``[H, W]`` (non-zero = fixated).
        n_splits: Number of random negative sets (MIT default 100).
        step: Threshold step on the normalised map, in ``(0, 1]`` (MIT
            default 0.1).
        rng: Seed or generator for the negative samples.

    Returns:
        The mean AUC over splits; ``0.5`` for a constant saliency map.

    Raises:
        ValueError: On bad maps (see :func:`auc_judd`), ``n_splits < 1`` or
            ``step`` outside ``(0, 1]``.
    """
    _check_splits(n_splits, step)
    f = _as_fixations(fixations)
    s = _saliency_for(saliency, f.shape)
    if _is_constant(s):
        return 0.5
    s = _minmax(s).ravel()
    s_th = s[f.ravel()]
    idx = _rng(rng).integers(0, s.size, size=(s_th.size, int(n_splits)))
    return float(_threshold_auc(s_th, s[idx], step).mean())


def auc_shuffled(
    saliency: np.ndarray,
    fixations: np.ndarray,
    other_fixations: np.ndarray,
    *,
    n_splits: int = 100,
    step: float = 0.1,
    rng: RngLike = None,
) -> float:
    """Shuffled AUC: negatives are other images' fixations (``AUC_shuffled.m``).

    As :func:`auc_borji`, except that each split's negatives are
    ``min(N_fix, N_other)`` pixels drawn without replacement from the fixated
    pixels of ``other_fixations`` (in the MIT benchmark: the union of the
    fixations of other images), which discounts the centre bias.

    Args:
        saliency: Model map ``[h, w]``; resized bilinearly to ``[H, W]`` if
            its size differs.
        fixations: Binary fixation map ``[H, W]`` of this image.
        other_fixations: Binary map ``[H, W]`` of other images' fixations
            (same size as ``fixations``; rescale the coordinates of other-size
            images before, as :func:`sact.saliency.evaluate.evaluate_dataset`
            does).
        n_splits: Number of random negative sets (MIT default 100).
        step: Threshold step in ``(0, 1]`` (MIT default 0.1).
        rng: Seed or generator for the negative samples.

    Returns:
        The mean AUC over splits; ``0.5`` for a constant saliency map.

    Raises:
        ValueError: On bad maps, ``other_fixations`` of another shape or with
            no fixated pixel, ``n_splits < 1`` or ``step`` outside ``(0, 1]``.
    """
    _check_splits(n_splits, step)
    f = _as_fixations(fixations)
    o = _as_map(other_fixations, "other_fixations") != 0
    if o.shape != f.shape:
        raise ValueError(
            f"other_fixations shape {o.shape} differs from fixations shape {f.shape}"
        )
    ind = np.flatnonzero(o)
    if ind.size == 0:
        raise ValueError("other_fixations has no fixated (non-zero) pixel")
    s = _saliency_for(saliency, f.shape)
    if _is_constant(s):
        return 0.5
    s = _minmax(s).ravel()
    s_th = s[f.ravel()]
    n_oth = min(s_th.size, ind.size)
    gen = _rng(rng)
    picks = np.stack(
        [ind[gen.permutation(ind.size)[:n_oth]] for _ in range(int(n_splits))], axis=1
    )
    return float(_threshold_auc(s_th, s[picks], step).mean())


def nss(saliency: np.ndarray, fixations: np.ndarray) -> float:
    """Normalized Scanpath Saliency (``NSS.m``).

    The saliency map is standardised, ``(S - mean(S)) / std(S)`` with the
    sample standard deviation (``ddof=1``, MATLAB's ``std``), and averaged over
    the fixated pixels.

    Args:
        saliency: Model map ``[h, w]``; resized bilinearly to ``[H, W]`` if
            its size differs.
        fixations: Binary fixation map ``[H, W]`` (non-zero = fixated).

    Returns:
        The NSS; ``0.0`` for a constant saliency map.

    Raises:
        ValueError: On non-2-D or non-finite inputs, no fixated pixel, or all
            pixels fixated.
    """
    f = _as_fixations(fixations)
    s = _saliency_for(saliency, f.shape)
    if _is_constant(s):
        return 0.0
    z = (s - s.mean()) / s.std(ddof=1)
    return float(z[f].mean())


# --------------------------------------------------------------------------- #
# distribution-based metrics
# --------------------------------------------------------------------------- #
def cc(saliency: np.ndarray, fixation_map: np.ndarray) -> float:
    """Pearson's linear correlation coefficient (``CC.m``).

    Args:
        saliency: Model map ``[h, w]``; resized bilinearly to ``[H, W]`` if
            its size differs.
        fixation_map: Continuous fixation density map ``[H, W]``.

    Returns:
        The correlation in ``[-1, 1]``; ``0.0`` if either map is constant.

    Raises:
        ValueError: On non-2-D or non-finite inputs.
    """
    g = _as_map(fixation_map, "fixation_map")
    s = _saliency_for(saliency, g.shape)
    if _is_constant(s) or _is_constant(g):
        return 0.0
    a = (s - s.mean()) / s.std()
    b = (g - g.mean()) / g.std()
    return float(np.clip(np.mean(a * b), -1.0, 1.0))


def kl_divergence(saliency: np.ndarray, fixation_map: np.ndarray) -> float:
    """KL divergence of the fixation density from the saliency map (``KLdiv.m``).

    Both maps are divided by their sums (if non-zero) to become distributions
    ``P`` (saliency) and ``Q`` (fixations); the score is
    ``sum(Q * log(eps + Q / (P + eps)))`` with MATLAB's ``eps = 2.2204e-16``.
    Lower is better; ``0`` for ``P == Q``.

    Args:
        saliency: Non-negative model map ``[h, w]``; resized bilinearly to
            ``[H, W]`` if its size differs. An all-zero map stays all zero
            (as in MATLAB), which gives a very large divergence.
        fixation_map: Non-negative fixation density map ``[H, W]``, not all
            zero.

    Returns:
        The divergence in nats.

    Raises:
        ValueError: On non-2-D or non-finite inputs, negative values in either
            map, or an all-zero ``fixation_map``.
    """
    q = _as_density(fixation_map)
    p = _saliency_for(saliency, q.shape)
    if p.min() < 0:
        raise ValueError(f"saliency must be non-negative for KL, got minimum {p.min()}")
    if np.any(p):
        p = p / p.sum()
    q = q / q.sum()
    return float(np.sum(q * np.log(MATLAB_EPS + q / (p + MATLAB_EPS))))


def _sim_distribution(a: np.ndarray) -> np.ndarray:
    if not np.any(a):
        return a  # a zero map stays a zero map (MATLAB)
    if _is_constant(a):
        return np.full(a.shape, 1.0 / a.size)  # MATLAB: NaN (0/0)
    a = _minmax(a)
    return a / a.sum()


def similarity(saliency: np.ndarray, fixation_map: np.ndarray) -> float:
    """Similarity / histogram intersection, SIM (``similarity.m``).

    Each map is min-max normalised to ``[0, 1]`` and then divided by its sum;
    the score is ``sum(min(P, Q))``, in ``[0, 1]`` (1 for identical
    distributions). Note the min-max step: the smallest value of each map gets
    zero mass, so adding a constant to a map changes its SIM.

    Args:
        saliency: Model map ``[h, w]``; resized bilinearly to ``[H, W]`` if
            its size differs. An all-zero map scores 0; any other constant map
            is treated as uniform.
        fixation_map: Non-negative fixation density map ``[H, W]``, not all
            zero.

    Returns:
        The SIM score.

    Raises:
        ValueError: On non-2-D or non-finite inputs, a negative or all-zero
            ``fixation_map``.
    """
    q = _as_density(fixation_map)
    p = _saliency_for(saliency, q.shape)
    return float(np.minimum(_sim_distribution(p), _sim_distribution(q)).sum())


# --------------------------------------------------------------------------- #
# registry
# --------------------------------------------------------------------------- #
#: Metric name -> function. Call signatures differ; see :data:`METRIC_INPUTS`.
METRICS: dict[str, Callable[..., float]] = {
    "auc_judd": auc_judd,
    "auc_borji": auc_borji,
    "auc_shuffled": auc_shuffled,
    "nss": nss,
    "cc": cc,
    "kl": kl_divergence,
    "sim": similarity,
}

#: Metric name -> the positional inputs after ``saliency``.
METRIC_INPUTS: dict[str, tuple[str, ...]] = {
    "auc_judd": ("fixations",),
    "auc_borji": ("fixations",),
    "auc_shuffled": ("fixations", "other_fixations"),
    "nss": ("fixations",),
    "cc": ("fixation_map",),
    "kl": ("fixation_map",),
    "sim": ("fixation_map",),
}

#: Metric name -> column label used in reports (MIT benchmark spelling).
METRIC_LABELS: dict[str, str] = {
    "auc_judd": "AUC-Judd",
    "auc_borji": "AUC-Borji",
    "auc_shuffled": "sAUC",
    "nss": "NSS",
    "cc": "CC",
    "kl": "KL",
    "sim": "SIM",
}

_RANDOM = ("auc_judd", "auc_borji", "auc_shuffled")


def check_metric_names(metrics: Sequence[str] | None) -> list[str]:
    """Validates metric names.

    Args:
        metrics: Names from :data:`METRICS`, or ``None`` for all of them.

    Returns:
        The names as a list, in the given order (registry order for ``None``).

    Raises:
        ValueError: If a name is unknown, repeated, or the list is empty.
    """
    if metrics is None:
        return list(METRICS)
    if isinstance(metrics, str):
        metrics = [metrics]
    names = list(metrics)
    if not names:
        raise ValueError("metrics must name at least one metric")
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; available: {list(METRICS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"metrics has repeated names: {names}")
    return names


def evaluate_all(
    saliency: np.ndarray,
    fixations: np.ndarray,
    fixation_map: np.ndarray,
    *,
    other_fixations: np.ndarray | None = None,
    metrics: Sequence[str] | None = None,
    rng: RngLike = None,
) -> dict[str, float]:
    """Computes several metrics for one image.

    Args:
        saliency: Model map ``[h, w]``; resized once to ``[H, W]``.
        fixations: Binary fixation map ``[H, W]``.
        fixation_map: Fixation density map ``[H, W]``.
        other_fixations: Binary map ``[H, W]`` of other images' fixations;
            needed for ``auc_shuffled``.
        metrics: Names from :data:`METRICS`; ``None`` means all of them, minus
            ``auc_shuffled`` when ``other_fixations`` is ``None``.
        rng: Seed or generator; one number is drawn from it to seed an
            independent stream per random AUC, so each score is the same
            whichever other metrics are requested, in any order.

    Returns:
        ``{name: score}`` in the order of ``metrics``.

    Raises:
        ValueError: On unknown metric names, ``fixations`` and
            ``fixation_map`` of different shapes, ``auc_shuffled`` requested
            without ``other_fixations``, or any error of the metrics.
    """
    names = check_metric_names(metrics)
    if metrics is None and other_fixations is None:
        names.remove("auc_shuffled")
    if "auc_shuffled" in names and other_fixations is None:
        raise ValueError("metric 'auc_shuffled' needs other_fixations")
    f = _as_map(fixations, "fixations")
    g = _as_map(fixation_map, "fixation_map")
    if f.shape != g.shape:
        raise ValueError(f"fixations shape {f.shape} differs from fixation_map shape {g.shape}")
    s = _saliency_for(saliency, f.shape)
    inputs: Mapping[str, np.ndarray | None] = {
        "fixations": f,
        "fixation_map": g,
        "other_fixations": other_fixations,
    }
    # One independent stream per random metric (keyed by its registry
    # position), so a score does not depend on which metrics run or in what order.
    base = int(_rng(rng).integers(0, 2**63))
    out: dict[str, float] = {}
    for name in names:
        args = [inputs[k] for k in METRIC_INPUTS[name]]
        kwargs = {}
        if name in _RANDOM:
            kwargs["rng"] = np.random.default_rng([base, list(METRICS).index(name)])
        out[name] = float(METRICS[name](s, *args, **kwargs))
    return out
