"""sact.ponder_map: summed maps against a hand-computed nearest-upsample sum, preprocessing,
resizing and images smaller than the total stride."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import sact
from sact.data import Preprocess
from sact.tools.ponder import model_preprocess, resize_longer_side, total_stride


def _tiny(mode="sact", in_chans=3, **kw):
    return sact.create_model("resnet20_cifar", mode=mode, base_channels=4, in_chans=in_chans, **kw).eval()


def _hand_summed(stages, size, field="ponder_map"):
    """Nearest resize written out: output pixel i takes source row floor(i * h / H)."""
    H, W = size
    total = np.zeros((H, W))
    for s in stages:
        m = getattr(s, field)[0].float().numpy()
        h, w = m.shape
        rows = np.floor(np.arange(H) * h / H).astype(int)
        cols = np.floor(np.arange(W) * w / W).astype(int)
        total += m[rows][:, cols]
    return total


@pytest.mark.parametrize("mode", ["sact", "act", "vanilla"])
def test_summed_map_equals_hand_computed_nearest_sum(mode):
    model = _tiny(mode)
    with torch.no_grad():  # random halting weights so the maps are not constant
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    image = torch.rand(3, 30, 45)
    pm = sact.ponder_map(model, image)
    with torch.no_grad():
        out = model(image[None])
    assert pm.summed.shape == (30, 45) and pm.input.shape == (3, 30, 45)
    np.testing.assert_allclose(pm.summed.numpy(), _hand_summed(out.stages, (30, 45)), rtol=1e-6)
    np.testing.assert_allclose(pm.num_units.numpy(), _hand_summed(out.stages, (30, 45), "num_units"))
    assert [tuple(s.shape) for s in pm.stages] == [tuple(s.ponder_map.shape[1:]) for s in out.stages]
    assert pm.flops == int(out.flops[0]) and pm.predicted_class == int(out.logits[0].argmax())
    assert pm.ponder_cost == pytest.approx(float(out.ponder_cost[0]), rel=1e-6)
    if mode == "sact":
        assert pm.summed.std() > 0  # a real spatial map
    else:
        for s in pm.stages:
            assert torch.all(s == s.flatten()[0])  # ACT / vanilla: constant per stage


def test_total_stride_is_measured_from_the_model():
    assert total_stride(_tiny()) == 4
    assert total_stride(sact.create_model("resnet50", base_width=8).eval()) == 32


def test_model_mode_and_batch_statistics_untouched():
    model = _tiny().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sact.ponder_map(model, torch.rand(3, 16, 16))
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_checkpoint_preprocess_is_used(tmp_path):
    model = _tiny()
    pre = Preprocess(kind="standardize", in_chans=3)
    sact.save_checkpoint(model, tmp_path / "ck", meta={"preprocess": pre.to_dict()})
    loaded = sact.load_checkpoint(tmp_path / "ck")
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8))
    pm = sact.ponder_map(loaded, image, preprocess=Preprocess(kind="inception", in_chans=3))  # checkpoint wins
    torch.testing.assert_close(pm.input, pre(image))
    torch.testing.assert_close(pm.image, torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255)


def test_explicit_and_default_preprocess():
    model = _tiny()
    grey = torch.randint(0, 256, (12, 20), dtype=torch.uint8)
    pm = sact.ponder_map(model, grey)  # default: [0, 1], 1 -> 3 channels
    torch.testing.assert_close(pm.input, (grey.float() / 255).expand(3, -1, -1))
    pm = sact.ponder_map(model, grey, preprocess=Preprocess(kind="inception", in_chans=3))
    torch.testing.assert_close(pm.input, (grey.float() / 255 * 2 - 1).expand(3, -1, -1))
    with pytest.raises(ValueError, match="1 channels but the model takes 3"):
        model_preprocess(model, Preprocess(kind="unit", in_chans=1))


def test_max_side_keeps_aspect_and_crop_applies_preprocess_geometry():
    model = _tiny()
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    pm = sact.ponder_map(model, image, max_side=30)
    assert pm.summed.shape == (20, 30) and pm.image.min() >= 0 and pm.image.max() <= 1
    pre = Preprocess(kind="unit", in_chans=3, image_size=16, central_crop=0.5)
    assert sact.ponder_map(model, image, preprocess=pre).summed.shape == (40, 60)  # whole image by default
    assert sact.ponder_map(model, image, preprocess=pre, crop=True).summed.shape == (16, 16)
    with pytest.raises(ValueError, match="max_side must be a positive int, got 0"):
        resize_longer_side(torch.rand(3, 4, 4), 0)


def test_image_smaller_than_total_stride_is_upscaled_or_rejected():
    model = _tiny()
    tiny = torch.rand(3, 2, 3)
    with pytest.warns(UserWarning, match="smaller than the total stride 4; upscaled to 4x6"):
        pm = sact.ponder_map(model, tiny)
    assert pm.upscaled and pm.summed.shape == (4, 6)
    with pytest.raises(ValueError, match=r"2x3 pixels is smaller than the network's total stride 4"):
        sact.ponder_map(model, tiny, upscale=False)
    pm = sact.ponder_map(model, torch.rand(3, 4, 9))  # exactly the stride: untouched
    assert not pm.upscaled and pm.summed.shape == (4, 9)


def _trained(tmp_path, in_chans, size):
    """A checkpoint whose meta says it was trained on ``in_chans`` x ``size`` x ``size`` images."""
    sact.save_checkpoint(_tiny(in_chans=in_chans), tmp_path / f"ck{in_chans}", meta={"input_size": [in_chans, size, size]})
    return sact.load_checkpoint(tmp_path / f"ck{in_chans}")


def _messages(model, image, **kw):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sact.ponder_map(model, image, **kw)
    return [str(w.message) for w in caught]


def test_warns_when_the_image_is_unlike_the_training_data(tmp_path):
    rng = np.random.default_rng(0)
    colour = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    grey = colour.convert("L")
    grey_model = _trained(tmp_path, 1, 64)  # as the demo's: greyscale 64 px canvases
    assert any("converted to greyscale" in m for m in _messages(grey_model, colour))
    assert _messages(grey_model, grey) == []
    assert _messages(grey_model, grey.convert("RGB")) == []  # grey content in an RGB file: nothing lost
    big = grey.resize((640, 480))
    (scale,) = _messages(grey_model, big)
    assert "640x480 px" in scale and "64x64 px" in scale and "--max-side 64" in scale
    assert _messages(grey_model, big, max_side=64) == [] and _messages(grey_model, grey.resize((20, 20))) != []
    colour_model = _trained(tmp_path, 3, 32)
    assert any("repeated to 3 channels" in m for m in _messages(colour_model, grey.resize((32, 32))))
    assert _messages(colour_model, torch.rand(32, 32)) != [] and _messages(colour_model, torch.rand(3, 32, 32)) == []
    assert _messages(_tiny(), big) == []  # no checkpoint: nothing to compare with


def test_vanilla_flops_is_the_vanilla_network_at_that_size():
    from sact.tools.ponder import vanilla_flops

    model = _tiny()
    vanilla = sact.create_model("resnet20_cifar", mode="vanilla", base_channels=4).eval()
    for size in ((32, 32), (40, 24)):
        assert vanilla_flops(model, size) == int(vanilla(torch.zeros(1, 3, *size)).flops[0])
    # an SACT model that never halts spends the vanilla FLOPs plus its halting branches
    assert sact.ponder_map(model, torch.rand(3, 32, 32)).flops > vanilla_flops(model, (32, 32))
    assert vanilla_flops(torch.nn.Conv2d(1, 1, 1), (8, 8)) is None
