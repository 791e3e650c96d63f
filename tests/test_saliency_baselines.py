"""Centre-bias / uniform baselines and post-processing of coarse model maps."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sact.saliency.baselines import center_bias, postprocess, uniform


def test_center_bias_values():
    cb = center_bias(5, 9, sigma_frac=0.25)
    assert cb.shape == (5, 9)
    assert cb[2, 4] == 1.0 and cb.max() == 1.0
    # symmetric about the centre
    np.testing.assert_allclose(cb, cb[::-1, ::-1])
    # at (2, 0): dx = -4 px, sigma_x = .25 * 9 = 2.25 -> exp(-0.5 (4/2.25)^2)
    assert cb[2, 0] == pytest.approx(math.exp(-0.5 * (4 / 2.25) ** 2))
    # at (0, 4): dy = -2 px, sigma_y = .25 * 5 = 1.25
    assert cb[0, 4] == pytest.approx(math.exp(-0.5 * (2 / 1.25) ** 2))
    # wider sigma -> flatter
    assert center_bias(5, 9, sigma_frac=1.0)[2, 0] > cb[2, 0]
    with pytest.raises(ValueError, match="sigma_frac must be a positive number"):
        center_bias(5, 9, sigma_frac=0)
    with pytest.raises(ValueError, match="height must be a positive integer"):
        center_bias(0, 9)


def test_uniform():
    u = uniform(3, 4)
    assert u.shape == (3, 4) and np.all(u == 1.0)
    with pytest.raises(ValueError, match="width must be a positive integer"):
        uniform(3, 2.5)


def test_postprocess_upsample_normalise():
    m = np.array([[1.0, 3.0], [1.0, 1.0]])
    out = postprocess(m, size=(4, 4))
    # bilinear (half-pixel): rows/cols sample at [0, .25, .75, 1]; value
    # (upsampled - 1) / 2 -> top-right 1, row 0 = [0, .25, .75, 1]
    np.testing.assert_allclose(out[0], [0, 0.25, 0.75, 1.0])
    np.testing.assert_allclose(out[:, 3], [1.0, 0.75, 0.25, 0.0])
    assert out.min() == 0.0 and out.max() == 1.0
    # constant map -> zeros
    assert np.all(postprocess(np.full((2, 2), 5.0), size=(3, 3)) == 0)


def test_postprocess_blur_and_center_bias():
    m = np.zeros((8, 8))
    m[2, 5] = 1.0
    # scale 5: the upsampled peak is the single pixel (2.5*5-.5, 5.5*5-.5) = (12, 27)
    sharp = postprocess(m, size=(40, 40))
    blurred = postprocess(m, size=(40, 40), blur_sigma=0.05)  # 2 px
    assert blurred.shape == (40, 40)
    assert blurred.max() == 1.0 and blurred.min() == 0.0
    # blurring spreads mass: more pixels above 10 %
    assert (blurred > 0.1).sum() > (sharp > 0.1).sum()
    # peak stays in place
    assert np.unravel_index(sharp.argmax(), sharp.shape) == (12, 27)
    assert np.unravel_index(blurred.argmax(), blurred.shape) == (12, 27)
    cb = center_bias(40, 40, sigma_frac=0.2)
    np.testing.assert_allclose(
        postprocess(m, size=(40, 40), center_bias_weight=1.0, center_bias_sigma_frac=0.2), cb
    )
    mix = postprocess(m, size=(40, 40), center_bias_weight=0.3, center_bias_sigma_frac=0.2)
    np.testing.assert_allclose(mix, 0.7 * sharp + 0.3 * cb)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"size": (0, 4)}, "height must be a positive integer"),
        ({"size": 5}, "size must be"),
        ({"size": (4, 4), "blur_sigma": 0.0}, "blur_sigma must be a positive"),
        ({"size": (4, 4), "center_bias_weight": 1.5}, r"center_bias_weight must be in \[0, 1\]"),
    ],
)
def test_postprocess_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        postprocess(np.ones((2, 2)), **kwargs)
    with pytest.raises(ValueError, match="saliency_map must be a non-empty 2-D map"):
        postprocess(np.ones(3), size=(4, 4))
