"""sact.viz: exact percentile ranges, colorize / overlay, the TensorBoard grid, figures."""

from __future__ import annotations

import io

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

import sact
from sact.viz import (
    colorize,
    map_figure_png,
    overlay,
    percentile_range,
    png_bytes,
    overlay_grid,
    ponder_overlay_grid,
    stages_figure_png,
    summed_map,
    value_counts,
)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("q", [(0.1, 99.9), (0.0, 100.0), (25.0, 75.0), (50.0, 50.0)])
def test_percentile_range_equals_numpy_on_concatenated_maps(seed, q):
    rng = np.random.default_rng(seed)
    maps = []
    for _ in range(rng.integers(1, 5)):
        h, w = rng.integers(1, 40, size=2)
        # piecewise-constant maps like the upsampled ones, plus a continuous one
        maps.append(np.round(rng.random((h, w)) * 12, 1) + 2 if rng.random() < 0.5 else rng.random((h, w)) * 30)
    got = percentile_range([value_counts(m) for m in maps], low=q[0], high=q[1])
    np.testing.assert_allclose(got, np.percentile(np.concatenate([m.ravel() for m in maps]), q), rtol=1e-12)


def test_percentile_range_rejects_bad_input():
    with pytest.raises(ValueError, match="no maps"):
        percentile_range([])
    with pytest.raises(ValueError, match="low=90"):
        percentile_range([value_counts(np.ones((2, 2)))], low=90, high=10)


def test_colorize_and_overlay():
    values = np.array([[0.0, 5.0], [10.0, 20.0]])
    rgb = colorize(values, vmin=0, vmax=10)
    cmap = matplotlib.colormaps["viridis"]
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
    np.testing.assert_array_equal(rgb[0, 0], np.round(np.array(cmap(0.0)[:3]) * 255))
    np.testing.assert_array_equal(rgb[1, 1], rgb[1, 0])  # clipped at vmax
    image = np.zeros((2, 2, 3), np.uint8)
    image[0, 0] = 255
    ov = overlay(image, values, vmin=0, vmax=10, alpha=0.5)
    base = np.zeros((2, 2, 3))
    base[0, 0] = 1.0
    np.testing.assert_allclose(ov, (0.5 * base * 255 + 0.5 * rgb + 0.5).astype(np.uint8), atol=1)
    with pytest.raises(ValueError, match="differ in size"):
        overlay(np.zeros((3, 3)), values)


def test_tensorboard_grid_uses_colorize_of_the_summed_map():
    model = sact.create_model("resnet20_cifar", base_channels=4).eval()
    with torch.no_grad():
        for stage in model.stages:
            for branch in stage.halting:
                branch.local_conv.weight.normal_(0, 0.5)
                branch.local_conv.bias.fill_(0.3)  # some positions halt early
        images = torch.rand(3, 3, 16, 20)
        out = model(images)
    grid = ponder_overlay_grid(images, out.stages, max_images=2, border=2)
    assert grid.shape == (2 * 16 + 2, 3 * 20 + 4, 3) and grid.dtype == np.uint8
    maps = summed_map(out.stages, (16, 20)).numpy()
    lo, hi = maps[:2].min(), maps[:2].max()
    np.testing.assert_array_equal(grid[18:34, 22:42], colorize(maps[1], vmin=lo, vmax=hi))
    np.testing.assert_array_equal(grid[:16, 44:64], overlay(images[0], maps[0], vmin=lo, vmax=hi))
    # the reference's second summary: the num_units map, through the same code path
    units = ponder_overlay_grid(images, out.stages, field="num_units", max_images=2, border=2)
    counts = summed_map(out.stages, (16, 20), field="num_units").numpy()
    assert counts.min() < counts.max() and not np.array_equal(counts, maps)
    np.testing.assert_array_equal(units[18:34, 22:42], colorize(counts[1], vmin=counts[:2].min(), vmax=counts[:2].max()))


def test_overlay_grid_rows_of_different_sizes():
    images = [torch.rand(1, 8, 10), torch.rand(1, 6, 6)]
    maps = [torch.arange(80.0).reshape(8, 10), torch.full((6, 6), 100.0)]
    grid = overlay_grid(images, maps, border=1)
    assert grid.shape == (8 + 1 + 6, 3 * 10 + 2, 3)
    np.testing.assert_array_equal(grid[9:15, 7:13], colorize(maps[1].numpy(), vmin=0, vmax=100))  # one range
    assert not grid[9:15, 20:].any()  # the narrower row is padded with black
    with pytest.raises(ValueError, match="one map per image"):
        overlay_grid(images, maps[:1])


def test_figures_are_pngs():
    rng = np.random.default_rng(0)
    for data in (map_figure_png(rng.random((30, 40)), vmin=0, vmax=1, title="t"),
                 stages_figure_png([torch.rand(16, 16), torch.rand(8, 8), torch.rand(4, 4)]),
                 png_bytes(rng.integers(0, 256, (5, 6, 3), dtype=np.uint8))):
        im = Image.open(io.BytesIO(data))
        assert im.format == "PNG" and min(im.size) >= 5
    with pytest.raises(ValueError, match="no stage maps"):
        stages_figure_png([])


def test_overlay_figure_has_the_overlay_colours_and_a_colour_bar():
    from sact import viz

    values = np.full((40, 40), 3.0)
    values[:, 20:] = 5.0
    image = np.zeros((40, 40), np.uint8)
    png = viz.map_figure_png(values, vmin=2.0, vmax=6.0, image=image, alpha=0.6)
    fig = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).reshape(-1, 3)
    colours = {tuple(c) for c in fig}
    for v in (3.0, 5.0):  # black image: the overlay is 60% of the map's colour
        want = viz.overlay(image[:1, :1], np.full((1, 1), v), vmin=2.0, vmax=6.0, alpha=0.6)[0, 0]
        assert tuple(want) in colours
    top = tuple(viz.colorize(np.array([[6.0]]), vmin=2.0, vmax=6.0)[0, 0])
    assert min(np.abs(fig.astype(int) - top).sum(1)) <= 24  # the colour bar reaches (nearly) the full-strength top colour
