"""MIT-benchmark fixation metrics on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sact.saliency.metrics import (
    MATLAB_EPS,
    METRIC_INPUTS,
    METRICS,
    auc_borji,
    auc_judd,
    auc_shuffled,
    cc,
    evaluate_all,
    kl_divergence,
    nss,
    resize_bilinear,
    similarity,
)


def _blob(h: int = 20, w: int = 30, cy: float = 6.0, cx: float = 20.0, s: float = 3.0) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * s * s))


def _matlab_auc_judd(s: np.ndarray, f: np.ndarray) -> float:
    """Line-by-line transcription of AUC_Judd.m (without jitter)."""
    s = (s - s.min()) / (s.max() - s.min())
    S, F = s.ravel(), f.ravel()
    sth = S[F > 0]
    n_fix, n_pix = len(sth), len(S)
    allthreshes = sorted(sth, reverse=True)
    tp = [0.0] * (n_fix + 2)
    fp = [0.0] * (n_fix + 2)
    tp[-1] = fp[-1] = 1.0
    for i in range(1, n_fix + 1):
        thresh = allthreshes[i - 1]
        aboveth = int(np.sum(S >= thresh))
        tp[i] = i / n_fix
        fp[i] = (aboveth - i) / (n_pix - n_fix)
    return sum((fp[k + 1] - fp[k]) * (tp[k + 1] + tp[k]) / 2 for k in range(n_fix + 1))


# --------------------------------------------------------------------------- #
# AUC-Judd
# --------------------------------------------------------------------------- #
def test_auc_judd_hand_computed():
    # S = [0, .25, .5, .75, 1], fixations at .25 and 1 (N=2, 3 negatives).
    # t=1.00: 1 pixel >= t -> tp=1/2, fp=(1-1)/3=0
    # t=0.25: 4 pixels >= t -> tp=1,   fp=(4-2)/3=2/3
    # curve (0,0) (0,.5) (2/3,1) (1,1): area 0 + 2/3*(.5+1)/2 + 1/3*1 = 5/6
    # (the exact Mann-Whitney AUC would be 4/6: MIT's trapezoid over-counts).
    s = np.array([[0.0, 0.25, 0.5, 0.75, 1.0]])
    f = np.array([[0, 1, 0, 0, 1]])
    assert auc_judd(s, f, jitter=False) == pytest.approx(5 / 6)
    # Jitter (1e-7 of the range) cannot reorder values 0.25 apart.
    assert auc_judd(s, f, jitter=True, rng=0) == pytest.approx(5 / 6, abs=1e-6)


def test_auc_judd_perfect_single_fixation_and_inverted():
    s = np.array([[0.1, 0.9, 0.2], [0.3, 0.4, 0.5]])
    f = np.zeros((2, 3), bool)
    f[0, 1] = True  # the highest value
    assert auc_judd(s, f, jitter=False) == 1.0
    assert auc_judd(s, f, rng=1) == pytest.approx(1.0)
    # Perfect map = the fixation map itself.
    g = _blob()
    fix = g > 0.8
    assert auc_judd(g, fix, rng=0) == pytest.approx(1.0, abs=1e-6)
    # Inverted: MIT's curve jumps to fp=1 at the top threshold, giving 1/(2N).
    inv = 1.0 - g
    n = int(fix.sum())
    assert auc_judd(inv, fix, jitter=False) == pytest.approx(1 / (2 * n), abs=1e-2)
    assert auc_judd(inv, fix, rng=0) < 0.1


def test_auc_judd_constant_and_transcription():
    f = np.zeros((4, 5))
    f[1, 2] = f[3, 0] = 1
    assert auc_judd(np.full((4, 5), 3.0), f, jitter=False) == 0.5
    assert auc_judd(np.full((4, 5), 3.0), f, jitter=True, rng=0) == 0.5
    rng = np.random.default_rng(3)
    # Quantised values: ties between fixated and non-fixated pixels.
    s = np.round(rng.random((12, 15)) * 6)
    fx = rng.random((12, 15)) < 0.15
    assert auc_judd(s, fx, jitter=False) == pytest.approx(_matlab_auc_judd(s, fx), abs=1e-12)
    s2 = rng.random((12, 15))
    assert auc_judd(s2, fx, jitter=False) == pytest.approx(_matlab_auc_judd(s2, fx), abs=1e-12)


def test_auc_judd_resizes_saliency():
    # [[0, 1], [0, 0]] upsampled to 4x4: rows and columns interpolate at
    # [0, .25, .75, 1], so (0, 3) is the unique maximum 1.0.
    f = np.zeros((4, 4))
    f[0, 3] = 1
    assert auc_judd(np.array([[0.0, 1.0], [0.0, 0.0]]), f, jitter=False) == 1.0
    # 1x2 [0, 1] -> 2x4: the last column ties (1, 1). One of them fixated:
    # t=1: 2 pixels >= t -> (fp, tp) = (1/7, 1); area = 1/7 * 1/2 + 6/7 = 13/14.
    f = np.zeros((2, 4))
    f[0, 3] = 1
    assert auc_judd(np.array([[0.0, 1.0]]), f, jitter=False) == pytest.approx(13 / 14)


# --------------------------------------------------------------------------- #
# AUC-Borji / shuffled AUC
# --------------------------------------------------------------------------- #
def test_auc_borji_binary_map():
    # S = F (binary, 100 of 400 pixels). Every threshold in (0, 1] has tp = 1
    # and fp = q (fraction of the sampled negatives that hit a fixated pixel);
    # t = 0 gives (1, 1). Area = q/2 + (1 - q) = 1 - q/2 with E[q] = 1/4.
    rng = np.random.default_rng(0)
    f = np.zeros((20, 20))
    f.ravel()[rng.choice(400, 100, replace=False)] = 1
    score = auc_borji(f, f, rng=0)
    assert score == pytest.approx(1 - 0.25 / 2, abs=0.01)
    assert auc_borji(f, f, rng=5) == auc_borji(f, f, rng=np.random.default_rng(5))


def test_auc_borji_perfect_constant_inverted():
    g = _blob()
    fix = g > 0.8
    assert auc_borji(g, fix, rng=0) > 0.97
    assert auc_borji(1 - g, fix, rng=0) < 0.1
    assert auc_borji(np.ones((5, 5)), np.eye(5), rng=0) == 0.5


def test_auc_shuffled_hand_computed():
    # All other fixations are used (as many as fixations), so no randomness.
    # S = [0, .15, .35, .55, .85, 1]; positives .55, 1; negatives .15, .85.
    # thresholds 1.0..0.0: (tp, fp) = (.5,0) at 1, .9; (.5,.5) at .8-.6;
    # (1,.5) at .5-.2; (1,1) at .1, 0. Area = .5*.5 + .5*1 = 0.75
    # (= Mann-Whitney 3/4 since no threshold falls between tied classes).
    s = np.array([[0.0, 0.15, 0.35, 0.55, 0.85, 1.0]])
    f = np.array([[0, 0, 0, 1, 0, 1]])
    o = np.array([[0, 1, 0, 0, 1, 0]])
    assert auc_shuffled(s, f, o, rng=0) == pytest.approx(0.75)
    assert auc_shuffled(s, f, o, n_splits=1, rng=1) == pytest.approx(0.75)
    # Perfect: all positives above all negatives.
    assert auc_shuffled(s, np.array([[0, 0, 0, 0, 1, 1]]), np.array([[1, 1, 0, 0, 0, 0]])) == 1.0
    # Constant map.
    assert auc_shuffled(np.zeros((1, 6)), f, o) == 0.5


def test_auc_shuffled_discounts_center_bias():
    # Fixations and "other" fixations both at the centre: a centre-bias map
    # scores well on AUC-Borji but at chance on shuffled AUC.
    h, w = 40, 40
    y, x = np.mgrid[0:h, 0:w]
    cb = np.exp(-((y - 19.5) ** 2 + (x - 19.5) ** 2) / (2 * 6.0**2))
    rng = np.random.default_rng(1)
    f = (rng.random((h, w)) < 0.5 * cb).astype(float)
    o = (rng.random((h, w)) < 0.5 * cb).astype(float)
    assert auc_borji(cb, f, rng=0) > 0.8
    assert auc_shuffled(cb, f, o, rng=0) == pytest.approx(0.5, abs=0.08)


# --------------------------------------------------------------------------- #
# NSS
# --------------------------------------------------------------------------- #
def test_nss_hand_computed():
    # S = [[1,2],[3,4]]: mean 2.5, sample std sqrt(5/3) (ddof=1 like MATLAB).
    s = np.array([[1.0, 2.0], [3.0, 4.0]])
    f = np.array([[0, 0], [0, 1]])
    assert nss(s, f) == pytest.approx(1.5 / math.sqrt(5 / 3))  # 1.161895
    # Fixations at 1 and 4: (-1.5 + 1.5) / 2 / std = 0.
    assert nss(s, np.array([[1, 0], [0, 1]])) == pytest.approx(0.0)
    assert nss(s, np.array([[1, 0], [0, 0]])) == pytest.approx(-1.5 / math.sqrt(5 / 3))
    # Constant map: 0 (MATLAB: NaN).
    assert nss(np.full((2, 2), 7.0), f) == 0.0
    # Invariant to affine rescaling with positive scale.
    assert nss(3 * s + 10, f) == pytest.approx(nss(s, f))


def test_nss_perfect_and_inverted():
    g = _blob()
    fix = g > 0.8
    assert nss(g, fix) > 3
    assert nss(1 - g, fix) == pytest.approx(-nss(g, fix))


# --------------------------------------------------------------------------- #
# CC, KL, SIM
# --------------------------------------------------------------------------- #
def test_cc_hand_computed():
    # a - mean = [-1, 0, 1], b - mean = [-1, 1, 0]: cov 1, var 2 each -> 0.5
    assert cc(np.array([[1.0, 2.0, 3.0]]), np.array([[1.0, 3.0, 2.0]])) == pytest.approx(0.5)
    g = _blob()
    assert cc(g, g) == pytest.approx(1.0)
    assert cc(1 - g, g) == pytest.approx(-1.0)
    assert cc(5 * g + 3, g) == pytest.approx(1.0)
    assert cc(np.ones_like(g), g) == 0.0
    assert cc(g, np.ones_like(g)) == 0.0


def test_kl_hand_computed():
    q = np.array([[1.0, 1.0, 0.0, 0.0]])  # -> [.5, .5, 0, 0]
    # uniform P = .25: 2 * .5 * log(.5 / .25) = log 2
    assert kl_divergence(np.ones((1, 4)), q) == pytest.approx(math.log(2), rel=1e-9)
    # P = [1, 3, 0, 0] / 4: .5 log(.5/.25) + .5 log(.5/.75) = .5 log(4/3)
    assert kl_divergence(np.array([[1.0, 3.0, 0.0, 0.0]]), q) == pytest.approx(0.5 * math.log(4 / 3), rel=1e-9)
    # P = 0 where Q = .5: that term is .5 * log(eps + .5 / eps).
    p = np.array([[0.0, 1.0, 1.0, 0.0]])  # -> [0, .5, .5, 0]
    expected = 0.5 * math.log(MATLAB_EPS + 0.5 / MATLAB_EPS) + 0.5 * math.log(MATLAB_EPS + 1.0)
    assert kl_divergence(p, q) == pytest.approx(expected, rel=1e-9)
    g = _blob()
    assert abs(kl_divergence(g, g)) < 1e-9
    assert kl_divergence(7 * g, g) == pytest.approx(kl_divergence(g, g), abs=1e-9)
    assert kl_divergence(1 - g, g) > 1.0
    with pytest.raises(ValueError, match="saliency must be non-negative"):
        kl_divergence(g - 0.5, g)
    with pytest.raises(ValueError, match="fixation_map is all zero"):
        kl_divergence(g, np.zeros_like(g))


def test_sim_hand_computed():
    # [0,1,1,2] -> minmax [0,.5,.5,1] -> /2 [0,.25,.25,.5]
    # [1,0,0,1] -> [.5,0,0,.5]; min -> [0,0,0,.5] -> 0.5
    a = np.array([[0.0, 1.0, 1.0, 2.0]])
    b = np.array([[1.0, 0.0, 0.0, 1.0]])
    assert similarity(a, b) == pytest.approx(0.5)
    # constant saliency -> uniform .25: min with [.5,0,0,.5] -> 0.5
    assert similarity(np.full((1, 4), 3.0), b) == pytest.approx(0.5)
    assert similarity(np.zeros((1, 4)), b) == 0.0
    assert similarity(np.array([[0.0, 1.0, 1.0, 0.0]]), b) == 0.0
    g = _blob()
    assert similarity(g, g) == pytest.approx(1.0)
    # min-max: adding a constant does not change SIM
    assert similarity(g + 4, g) == pytest.approx(1.0)


# --------------------------------------------------------------------------- #
# resizing, registry, validation
# --------------------------------------------------------------------------- #
def test_resize_bilinear_half_pixel():
    out = resize_bilinear(np.array([[0.0, 1.0]]), (2, 4))
    np.testing.assert_allclose(out, [[0, 0.25, 0.75, 1], [0, 0.25, 0.75, 1]])
    a = np.arange(12.0).reshape(3, 4)
    np.testing.assert_array_equal(resize_bilinear(a, (3, 4)), a)
    # downsampling by 2: samples at input coordinate 0.5, 2.5 (pixel centres)
    np.testing.assert_allclose(resize_bilinear(np.arange(4.0)[None], (1, 2)), [[0.5, 2.5]])
    # nss on a resized map == nss on the explicitly resized map
    f = np.zeros((6, 8))
    f[1, 2] = f[4, 7] = 1
    small = np.random.default_rng(0).random((3, 4))
    assert nss(small, f) == pytest.approx(nss(resize_bilinear(small, (6, 8)), f))
    assert cc(small, _blob(6, 8, 2, 3, 1)) == pytest.approx(cc(resize_bilinear(small, (6, 8)), _blob(6, 8, 2, 3, 1)))


def test_evaluate_all_matches_individual_metrics():
    rng = np.random.default_rng(7)
    s = rng.random((16, 20))
    g = _blob(16, 20, 5, 12, 3)
    f = g > 0.5
    o = rng.random((16, 20)) < 0.1
    res = evaluate_all(s, f, g, rng=0)
    assert list(res) == [m for m in METRICS if m != "auc_shuffled"]
    assert res["nss"] == pytest.approx(nss(s, f))
    assert res["cc"] == pytest.approx(cc(s, g))
    assert res["kl"] == pytest.approx(kl_divergence(s, g))
    assert res["sim"] == pytest.approx(similarity(s, g))
    assert res["auc_judd"] == pytest.approx(auc_judd(s, f, rng=0), abs=1e-6)
    full = evaluate_all(s, f, g, other_fixations=o, rng=0)
    assert set(full) == set(METRICS) == set(METRIC_INPUTS)
    assert 0 <= full["auc_shuffled"] <= 1
    only = evaluate_all(s, f, g, metrics=["cc", "nss"])
    assert list(only) == ["cc", "nss"]
    with pytest.raises(ValueError, match="needs other_fixations"):
        evaluate_all(s, f, g, metrics=["auc_shuffled"])
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate_all(s, f, g, metrics=["emd"])
    with pytest.raises(ValueError, match="differs from fixation_map shape"):
        evaluate_all(s, f, g[:-1])


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: nss(np.zeros((2, 2, 3)), np.eye(2)), "saliency must be a non-empty 2-D map"),
        (lambda: nss(np.array([[np.nan, 1.0]]), np.array([[1, 0]])), "saliency contains NaN"),
        (lambda: nss(np.ones((2, 2)), np.zeros((2, 2))), "fixations has no fixated"),
        (lambda: auc_judd(np.eye(2), np.ones((2, 2))), "every pixel"),
        (lambda: auc_borji(np.eye(2), np.eye(2), n_splits=0), "n_splits must be a positive integer"),
        (lambda: auc_borji(np.eye(2), np.eye(2), step=0), r"step must be in \(0, 1\]"),
        (lambda: auc_shuffled(np.eye(2), np.eye(2), np.ones((3, 3))), "other_fixations shape"),
        (lambda: auc_shuffled(np.eye(2), np.eye(2), np.zeros((2, 2))), "other_fixations has no fixated"),
        (lambda: auc_judd(np.eye(2), np.eye(2), rng="x"), "rng must be"),
        (lambda: similarity(np.eye(2), -np.eye(2)), "fixation_map must be non-negative"),
    ],
)
def test_validation_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
