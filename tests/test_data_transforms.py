"""Preprocess: conversions of every input kind, the four kinds, serialisation."""

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from sact.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocess,
    cifar_preprocess,
    cluttered_preprocess,
    imagenet_preprocess,
    to_float_image,
    torchvision_preprocess,
)

RGB = (10, 200, 30)
RGB_L = round((10 * 299 + 200 * 587 + 30 * 114) / 1000) / 255  # PIL's "L" of RGB


def palette_image():
    image = Image.new("P", (5, 4), 0)
    image.putpalette([*RGB, 255, 255, 255] + [0] * 762)
    return image


# mode -> (image, expected RGB value, expected grey value); all images are uniform.
CASES = {
    "1": (Image.new("1", (5, 4), 1), (1.0, 1.0, 1.0), 1.0),
    "L": (Image.new("L", (5, 4), 128), (128 / 255,) * 3, 128 / 255),
    "LA": (Image.new("LA", (5, 4), (100, 0)), (100 / 255,) * 3, 100 / 255),
    "P": (palette_image(), tuple(v / 255 for v in RGB), RGB_L),
    "RGB": (Image.new("RGB", (5, 4), RGB), tuple(v / 255 for v in RGB), RGB_L),
    "RGBA": (Image.new("RGBA", (5, 4), (*RGB, 0)), tuple(v / 255 for v in RGB), RGB_L),  # alpha dropped
    "CMYK": (Image.new("CMYK", (5, 4), (255, 0, 0, 0)), (0.0, 1.0, 1.0), None),  # cyan
    "I;16": (Image.new("I;16", (5, 4), 32768), (32768 / 65535,) * 3, 32768 / 65535),
    "I": (Image.new("I", (5, 4), 65535), (1.0,) * 3, 1.0),
    "F": (Image.new("F", (5, 4), 0.25), (0.25,) * 3, 0.25),
}


@pytest.mark.parametrize("mode", list(CASES))
def test_every_pil_mode(mode):
    image, rgb, grey = CASES[mode]
    assert image.mode == mode
    x3 = to_float_image(image, 3)
    assert x3.shape == (3, 4, 5) and x3.dtype == torch.float32
    torch.testing.assert_close(x3, torch.tensor(rgb).view(3, 1, 1).expand(3, 4, 5), atol=1e-6, rtol=0)
    x1 = to_float_image(image, 1)
    assert x1.shape == (1, 4, 5)
    if grey is None:  # CMYK: greyscale of the RGB conversion
        grey = round(255 * 587 / 1000 + 255 * 114 / 1000) / 255
    torch.testing.assert_close(x1, torch.full((1, 4, 5), grey), atol=1.5 / 255, rtol=0)


def test_array_inputs():
    u8 = torch.tensor(RGB, dtype=torch.uint8).view(3, 1, 1).expand(3, 2, 3)
    expected = u8.float() / 255
    torch.testing.assert_close(to_float_image(u8, 3), expected)
    torch.testing.assert_close(to_float_image(u8.permute(1, 2, 0).numpy(), 3), expected)  # numpy HWC
    rgba = torch.cat([u8, torch.zeros(1, 2, 3, dtype=torch.uint8)])
    torch.testing.assert_close(to_float_image(rgba, 3), expected)
    grey = to_float_image(expected, 1)
    torch.testing.assert_close(grey, torch.full((1, 2, 3), (10 * 0.299 + 200 * 0.587 + 30 * 0.114) / 255))
    torch.testing.assert_close(to_float_image(np.full((2, 3), 65535, np.uint16), 3), torch.ones(3, 2, 3))
    torch.testing.assert_close(to_float_image(torch.full((2, 3), 0.5), 3), torch.full((3, 2, 3), 0.5))
    for bad in (torch.zeros(2, 3, 4, 4), torch.zeros(5, 4, 4), np.zeros((4, 4), np.int64)):
        with pytest.raises(ValueError):
            to_float_image(bad, 3)
    with pytest.raises(ValueError, match="2"):
        to_float_image(u8, 2)


def test_kinds():
    torch.manual_seed(0)
    x = torch.rand(3, 20, 30)
    torch.testing.assert_close(Preprocess(kind="unit")(x), x)
    torch.testing.assert_close(Preprocess(kind="inception")(x), x * 2 - 1)
    out = Preprocess(kind="normalize", mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0))(x)
    torch.testing.assert_close(out[1], (x[1] - 0.2) / 0.25)
    s = cifar_preprocess()(x)
    assert abs(s.mean().item()) < 1e-5 and abs(s.std(correction=0).item() - 1) < 1e-4
    flat = cifar_preprocess()(torch.full((3, 4, 4), 1 / 255))  # TF clamps std at 1/sqrt(n) of [0,255] values
    assert torch.equal(flat, torch.zeros(3, 4, 4))
    grey = cluttered_preprocess()(Image.new("RGB", (64, 48), RGB))
    assert grey.shape == (1, 48, 64) and abs(grey.mean().item() - RGB_L) < 1e-6


def test_sizes():
    x = torch.rand(3, 100, 64)
    assert Preprocess(kind="unit", central_crop=0.875)(x).shape == (3, 88, 56)
    torch.testing.assert_close(Preprocess(kind="unit", central_crop=0.875)(x), x[:, 6:94, 4:60])
    out = imagenet_preprocess(32)(x)
    assert out.shape == (3, 32, 32) and out.min() >= -1 and out.max() <= 1
    assert cluttered_preprocess(16)(x).shape == (1, 16, 16)


def test_torchvision_preprocess_matches_torchvision():
    torch.manual_seed(0)
    x = torch.rand(3, 300, 400)
    reference = T.Compose([T.Resize(256, antialias=True), T.CenterCrop(224), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    for image in (x, x.transpose(1, 2)):
        ours = torchvision_preprocess()(image)
        assert ours.shape == (3, 224, 224)
        torch.testing.assert_close(ours, reference(image), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "pre", [cluttered_preprocess(), cifar_preprocess(), imagenet_preprocess(299), torchvision_preprocess(160)]
)
def test_serialisation_round_trip(pre):
    d = pre.to_dict()
    assert Preprocess.from_dict(json.loads(json.dumps(d))) == pre
    assert pickle.loads(pickle.dumps(pre)) == pre
    assert hash(Preprocess.from_dict(d)) == hash(pre)
    image = Image.new("RGB", (50, 40), RGB)
    torch.testing.assert_close(Preprocess.from_dict(d)(image), pre(image))


def test_validation():
    for kwargs, bad in [
        ({"kind": "zscore"}, "zscore"),
        ({"kind": "unit", "in_chans": 2}, "2"),
        ({"kind": "unit", "image_size": 0}, "0"),
        ({"kind": "unit", "central_crop": 1.2}, "1.2"),
        ({"kind": "unit", "resize": "longer"}, "longer"),
        ({"kind": "unit", "mean": (0.5, 0.5, 0.5)}, "mean"),
        ({"kind": "normalize", "mean": (0.5,), "std": (0.5,)}, "mean"),
        ({"kind": "normalize", "mean": (0.5,) * 3, "std": (0.5, 0.0, 0.5)}, "std"),
    ]:
        with pytest.raises(ValueError, match=bad):
            Preprocess(**kwargs)
    with pytest.raises(ValueError, match="colour"):
        Preprocess.from_dict({"kind": "unit", "colour": 1})
    assert Preprocess(kind="normalize", mean=[0.5] * 3, std=[1, 1, 1]).mean == (0.5, 0.5, 0.5)
