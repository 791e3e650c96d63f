"""Saliency from SACT models: model_saliency against a hand-computed upsampled ponder map,
the batched path against the single-image path, the untrained baseline, Cluttered
Fashion-MNIST items and the side-by-side report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sact
from sact.data import cifar_preprocess, cluttered_preprocess
from sact.saliency import center_bias
from sact.saliency.cluttered import cluttered_items, cluttered_methods
from sact.saliency.model import (
    evaluate_methods,
    model_saliency,
    model_saliency_batch,
    untrained_like,
    write_comparison,
)


def _tiny(in_chans=3, seed=0):
    torch.manual_seed(seed)
    model = sact.create_model("resnet20_cifar", mode="sact", in_chans=in_chans, base_channels=4).eval()
    with torch.no_grad():  # stand-in for training: random halting weights give non-constant maps
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def _hand_saliency(model, x, size):
    """Nearest-upsampled stage maps summed at the input size, bilinear to ``size``, min-max."""
    with torch.no_grad():
        out = model(x[None])
    H, W = x.shape[-2:]
    total = np.zeros((H, W))
    for s in out.stages:
        m = s.ponder_map[0].double().numpy()
        rows = np.floor(np.arange(H) * m.shape[0] / H).astype(int)
        cols = np.floor(np.arange(W) * m.shape[1] / W).astype(int)
        total += m[rows][:, cols]
    up = F.interpolate(torch.from_numpy(total)[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    up = up.numpy()
    return (up - up.min()) / (up.max() - up.min())


def test_model_saliency_equals_hand_computed_upsampled_ponder_map():
    model = _tiny()
    image = torch.rand(3, 30, 45)
    sal = model_saliency(model, image, size=(47, 71))
    assert sal.shape == (47, 71) and sal.dtype == np.float64
    assert sal.min() == 0.0 and sal.max() == pytest.approx(1.0)
    # default preprocess keeps [0, 1] values, so the model input is the image itself
    np.testing.assert_allclose(sal, _hand_saliency(model, image, (47, 71)), atol=1e-5)  # the model sums in float32
    assert model_saliency(model, image).shape == (30, 45)  # size defaults to the image's


def test_model_saliency_uses_checkpoint_preprocess_and_options(tmp_path):
    model = _tiny(in_chans=3)
    sact.save_checkpoint(model, tmp_path / "m", meta={"preprocess": cifar_preprocess().to_dict()})
    loaded = sact.load_checkpoint(tmp_path / "m")
    rgb = np.random.default_rng(0).integers(0, 256, (28, 36, 3), dtype=np.uint8)  # numpy [H, W, C]
    sal = model_saliency(loaded, rgb, size=(56, 72))
    x = cifar_preprocess()(rgb)  # per-image standardisation, as the checkpoint says
    np.testing.assert_allclose(sal, _hand_saliency(model, x, (56, 72)), atol=1e-5)
    # centre-bias weight 1 is the pure centre bias; blurring smooths the map
    np.testing.assert_allclose(model_saliency(loaded, rgb, size=(56, 72), center_bias_weight=1.0),
                               center_bias(56, 72), atol=1e-12)
    blurred = model_saliency(loaded, rgb, size=(56, 72), blur_sigma=0.05)
    assert np.abs(np.diff(blurred, axis=1)).mean() < np.abs(np.diff(sal, axis=1)).mean()
    with pytest.raises(ValueError, match="center_bias_weight"):
        model_saliency(loaded, rgb, size=(56, 72), center_bias_weight=1.5)


def test_batch_matches_single_image_path():
    model = _tiny(in_chans=3)
    images = torch.rand(4, 3, 20, 28)
    images[1] *= 0.2  # per-image standardisation must be per image, not per batch
    pre = cifar_preprocess()
    batch = model_saliency_batch(model, images, size=(40, 56), blur_sigma=0.03, preprocess=pre)
    assert batch.shape == (4, 40, 56)
    for i in range(4):
        single = model_saliency(model, images[i], size=(40, 56), blur_sigma=0.03, preprocess=pre)
        np.testing.assert_allclose(batch[i], single, atol=1e-5)
    # a list of tensors and a grey batch for a 3-channel model (channels repeated) work too
    np.testing.assert_allclose(model_saliency_batch(model, list(images), size=(40, 56), blur_sigma=0.03,
                                                    preprocess=pre), batch, atol=1e-12)
    grey = torch.rand(2, 1, 20, 28)
    np.testing.assert_allclose(model_saliency_batch(model, grey)[1], model_saliency(model, grey[1]), atol=1e-5)


def test_batch_rejects_bad_inputs():
    model = _tiny()
    with pytest.raises(ValueError, match="share one size"):
        model_saliency_batch(model, [torch.rand(3, 16, 16), torch.rand(3, 16, 20)])
    with pytest.raises(ValueError, match="total stride"):
        model_saliency_batch(model, torch.rand(2, 3, 3, 8))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        model_saliency_batch(model, torch.rand(3, 16, 16))
    with pytest.raises(ValueError, match="empty"):
        model_saliency_batch(model, [])


def test_untrained_like_is_a_fresh_seeded_copy_of_the_architecture(tmp_path):
    model = _tiny(in_chans=1)
    sact.save_checkpoint(model, tmp_path / "m", meta={"preprocess": cluttered_preprocess().to_dict()})
    trained = sact.load_checkpoint(tmp_path / "m")
    state = torch.random.get_rng_state()
    a, b, c = untrained_like(trained, seed=3), untrained_like(trained, seed=3), untrained_like(trained, seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    assert a.sact_config == trained.sact_config and not a.training
    assert a.checkpoint_meta["preprocess"] == cluttered_preprocess().to_dict()
    sa, sb, sc, st = a.state_dict(), b.state_dict(), c.state_dict(), trained.state_dict()
    assert sa.keys() == st.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["stem.weight"], sc["stem.weight"])  # another seed, other weights
    assert not all(torch.equal(sa[k], st[k]) for k in sa)
    with pytest.raises(ValueError, match="sact_config"):
        untrained_like(torch.nn.Conv2d(1, 1, 1))


def _fake_canvases():
    """Three 16x16 canvases as dicts in the ClutteredFashionMNIST format; the last mask is empty."""
    rng = np.random.default_rng(0)
    out = []
    for k, (r0, c0) in enumerate([(2, 3), (8, 6), (5, 5)]):
        image = torch.from_numpy(rng.uniform(0, 0.3, (1, 16, 16)).astype(np.float32))
        mask = torch.zeros(16, 16, dtype=torch.bool)
        if k < 2:
            mask[r0 : r0 + 5, c0 : c0 + 4] = True
            mask[r0, c0] = False  # not a rectangle: mask and box differ
            image[0][mask] = 0.9
        box = torch.tensor([c0, r0, c0 + 4, r0 + 5], dtype=torch.float32)
        out.append({"image": image, "label": k, "box": box, "mask": mask})
    return out


def test_cluttered_items_mask_box_and_fallback():
    data = _fake_canvases()
    items = cluttered_items(data, classes=["a", "b", "c"])
    assert [it.category for it in items] == ["a", "b", "c"] and items[1].name == "00001"
    np.testing.assert_array_equal(items[0].fixation_locs, data[0]["mask"].numpy())
    assert items[0].fixation_locs.sum() == 19 and items[0].fixation_map.sum() == pytest.approx(1.0)
    assert not items[0].fallback and items[2].fallback  # empty mask -> its box
    assert items[2].fixation_locs.sum() == 20 and items[2].fixation_locs[5:10, 5:9].all()
    boxed = cluttered_items(data, ground_truth="box", indices=[0])
    assert boxed[0].fixation_locs.sum() == 20 and not boxed[0].fallback
    with pytest.raises(ValueError, match="ground_truth"):
        cluttered_items(data, ground_truth="blob")


def test_cluttered_methods_look_up_the_right_maps_and_baselines_rank_sensibly():
    model = _tiny(in_chans=1)
    items = cluttered_items(_fake_canvases())
    methods = cluttered_methods(model, items, batch_size=2, untrained_seed=1, progress=False)
    assert list(methods) == ["sact", "untrained_sact", "center_bias", "uniform", "intensity"]
    for it in items:
        np.testing.assert_allclose(methods["sact"](it), model_saliency(model, it.image), atol=1e-5)
        assert methods["center_bias"](it).shape == (16, 16)
    results = evaluate_methods(items[:2], methods, metrics=["auc_judd", "nss"], shuffled_pool="dataset",
                               progress=False, config={"note": "x"})
    # the object is the bright part of these canvases: intensity finds it, uniform is chance
    assert results["intensity"]["overall"]["auc_judd"] > 0.95
    assert results["uniform"]["overall"]["auc_judd"] == pytest.approx(0.5)
    assert results["sact"]["config"]["note"] == "x"
    assert list(cluttered_methods(model, items, baselines=False, progress=False)) == ["sact"]


def test_write_comparison(tmp_path):
    items = cluttered_items(_fake_canvases()[:2], classes=["a", "b"])
    methods = {"uniform": lambda it: np.ones((16, 16)), "intensity": lambda it: it.image[0].numpy()}
    results = evaluate_methods(items, methods, metrics=["auc_judd", "kl"], out_dir=tmp_path, progress=False)
    json_path, md_path = write_comparison(results, tmp_path, title="T", notes=["cmd"])
    summary = json.loads(json_path.read_text())
    assert set(summary["overall"]) == {"uniform", "intensity"} and set(summary["categories"]["uniform"]) == {"a", "b"}
    md = md_path.read_text()
    assert "| uniform | 2 | 0.500 |" in md and "## AUC-Judd per category" in md and "| **overall** | 2 |" in md
    assert (tmp_path / "intensity" / "saliency.md").is_file()
    with pytest.raises(ValueError, match="different metrics"):
        write_comparison({"a": results["uniform"], "b": {**results["intensity"], "metrics": ["kl"]}}, tmp_path)
