"""The conventions of timm and torchvision, the model protocol for your own model, pretrained
weights (file, URL, offline), torch.hub, and the runnable examples of the model docs."""

from __future__ import annotations

import re
import shutil
import tomllib
from pathlib import Path

import pytest
from helpers import linked_root
import torch
from torch import nn

import sact
from sact.checkpoint import CheckpointError
from sact.models import AdaptiveResNet, _REGISTRY

ROOT = Path(__file__).resolve().parents[1]


def tiny(name: str, mode: str = "sact", **kw):
    """A reduced-width model with random BN statistics and halting biases near 0 (masks vary)."""
    width = {"base_channels": 4} if name.endswith("_cifar") else {"base_width": 4}
    model = sact.create_model(name, mode=mode, **width, **kw)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
        for stage in model.stages:
            for branch in stage.halting or []:
                (branch.local_conv if hasattr(branch, "local_conv") else branch.global_conv).bias.fill_(0.0)
    return model


def _perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


# ---- forward_features / forward_head / head FLOPs --------------------------------------


@pytest.mark.parametrize("name,mode", [("resnet18", "sact"), ("resnet20_cifar", "act"), ("resnet50_v2", "sact"),
                                       ("resnet34", "vanilla")])
def test_forward_head_of_forward_features_is_the_forward(name, mode):
    model = tiny(name, mode, num_classes=6).eval()
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        out = model(x)
        feats = model.forward_features(x)
        assert isinstance(feats, sact.FeaturesOutput)
        torch.testing.assert_close(model.forward_head(feats), out.logits, rtol=0, atol=0)
        torch.testing.assert_close(model.forward_head(feats.features[-1]), out.logits, rtol=0, atol=0)
        pooled = model.forward_head(feats, pre_logits=True)
        assert pooled.shape == (2, model.num_features)
        torch.testing.assert_close(model.get_classifier()(pooled), out.logits, rtol=0, atol=0)
    assert model.num_classes == 6 and model.get_classifier().out_features == 6
    assert model.head_flops() == 2 * model.num_features * 6
    assert torch.equal(out.flops, feats.flops + model.head_flops())
    assert out.flops.dtype == torch.int64


def test_fx_tracing_fails_with_a_pointer_to_features_only():
    from torchvision.models.feature_extraction import create_feature_extractor

    for training in (False, True):
        model = tiny("resnet20_cifar").train(training)
        with pytest.raises(TypeError, match="features_only=True"):
            create_feature_extractor(model, return_nodes=["layer1"])
        assert model.training == training and all(m.training == training for m in model.modules())


# ---- reset_classifier ---------------------------------------------------------------------


def test_reset_classifier_sparse_still_equals_dense_and_checkpoints_rebuild(tmp_path):
    torch.manual_seed(1)
    model = tiny("resnet34", "sact", num_classes=3).double().eval()
    sparse = sact.to_sparse(model, poison=True)
    old = model.get_classifier()
    model.reset_classifier(7)
    assert model.get_classifier() is not old and model.get_classifier().weight.dtype == torch.float64
    assert model.num_classes == 7 and model.pretrained_cfg["num_classes"] == 7
    assert model.sact_config["kwargs"]["num_classes"] == 7
    x = torch.randn(2, 3, 37, 41, dtype=torch.float64)
    with torch.no_grad():
        dense = model(x)
    got = sparse(x)  # the wrapper sees the new head: heads are never folded
    assert got.logits.shape == dense.logits.shape == (2, 7)
    torch.testing.assert_close(got.logits, dense.logits, rtol=1e-9, atol=1e-9)
    assert torch.equal(got.flops, dense.flops)
    assert any(int(s.num_units.unique().numel()) > 1 for s in dense.stages)  # the sparse path really ran
    # num_classes=0: no classifier, the logits are the pooled features; the checkpoint rebuilds that
    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), nn.Identity) and model.head_flops() == 0
    with torch.no_grad():
        pooled = model(x).logits
    assert pooled.shape == (2, model.num_features)
    sact.save_checkpoint(model, tmp_path / "headless")
    again = sact.load_checkpoint(tmp_path / "headless").double()  # (checkpoints rebuild in float32)
    assert isinstance(again.get_classifier(), nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, pooled, rtol=0, atol=0)


# ---- feature_info and features_only ---------------------------------------------------------


@pytest.mark.parametrize("name", sact.list_models())
def test_feature_info_equals_the_real_shapes_without_a_forward(name):
    model = tiny(name, "sact", in_chans=1).eval()
    calls = []
    hooks = [m.register_forward_pre_hook(lambda *a: calls.append(1)) for m in model.modules()]
    info = model.feature_info
    assert not calls and not model.training  # read from the modules; mode untouched
    for h in hooks:
        h.remove()
    assert info.module_name() == list(model.stage_names)
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 1, 64, 64)).features
    assert info.channels() == [f.shape[1] for f in feats]
    assert info.reduction() == [64 // f.shape[-1] for f in feats] == [64 // f.shape[-2] for f in feats]
    assert sact.tools.ponder.total_stride(model) == info.reduction(-1)


def test_features_only_returns_the_listed_maps_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = tiny("resnet34", "sact").eval()
    fo = sact.create_model("resnet34", mode="sact", base_width=4, features_only=True, out_indices=(0, -2)).eval()
    fo.load_state_dict(model.state_dict())
    assert fo.out_indices == (0, 2) and fo.feature_info.module_name() == ["layer1", "layer3"]
    ran = []
    fo.layer4.register_forward_pre_hook(lambda *a: ran.append(1))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = fo(x)
        ref = model.forward_features(x).features
    assert not ran  # stages after the last index do not run
    assert isinstance(maps, list) and len(maps) == 2
    for m, r, d in zip(maps, (ref[0], ref[2]), fo.feature_info):
        torch.testing.assert_close(m, r, rtol=0, atol=0)
        assert m.shape[1] == d["num_chs"] and 64 // m.shape[-1] == d["reduction"]
    with torch.no_grad():
        sparse_maps = sact.to_sparse(fo)(x)
    for a, b in zip(sparse_maps, maps):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # a checkpoint holds the whole network; pretrained= makes the backbone again
    sact.save_checkpoint(fo, tmp_path / "fo")
    assert not sact.load_checkpoint(tmp_path / "fo").features_only
    again = sact.create_model("resnet34", base_width=4, features_only=True, out_indices=(0, 2), pretrained=tmp_path / "fo")
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x)[1], maps[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="needs a classification model"):
        sact.ponder_map(fo, torch.rand(3, 64, 64))
    with pytest.raises(ValueError, match="out_indices must be"):
        sact.create_model("resnet18", features_only=True, out_indices=(2, 1))
    with pytest.raises(ValueError, match="needs features_only=True"):
        sact.create_model("resnet18", out_indices=(1,))


# ---- pretrained_cfg -----------------------------------------------------------------------


def test_pretrained_cfg_per_family_and_from_a_checkpoint(tmp_path):
    from sact.data import IMAGENET_MEAN, IMAGENET_STD, Preprocess, cluttered_preprocess

    r = sact.create_model("resnet18", num_classes=10)
    cfg = r.pretrained_cfg
    assert cfg == r.default_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["mean"] == IMAGENET_MEAN and cfg["std"] == IMAGENET_STD
    assert (cfg["crop_pct"], cfg["interpolation"], cfg["num_classes"]) == (0.875, "bilinear", 10)
    assert (cfg["classifier"], cfg["first_conv"], cfg["architecture"]) == ("fc", "conv1", "resnet18")
    assert isinstance(r.get_submodule(cfg["first_conv"]), nn.Conv2d)
    assert Preprocess.from_dict(cfg["preprocess"]).kind == "normalize"
    odd = sact.create_model("resnet20_cifar", in_chans=2, base_channels=4).pretrained_cfg  # no default preprocessing
    assert odd["input_size"][0] == 2 and odd["mean"] is None and odd["std"] is None
    v2 = sact.create_model("resnet50_v2", base_width=4).pretrained_cfg
    assert v2["classifier"] == "logits" and v2["mean"] == v2["std"] == (0.5, 0.5, 0.5) and v2["num_classes"] == 1001
    c = sact.create_model("resnet20_cifar", in_chans=1, base_channels=4)
    assert c.pretrained_cfg["input_size"] == (1, 32, 32) and c.pretrained_cfg["mean"] is None
    assert c.pretrained_cfg["first_conv"] == "stem"
    # a checkpoint's preprocessing wins: the demo's greyscale 64 px canvases in [0, 1]
    sact.save_checkpoint(c, tmp_path / "c", meta={"preprocess": cluttered_preprocess(64).to_dict()})
    loaded = sact.load_checkpoint(tmp_path / "c").pretrained_cfg
    assert loaded["input_size"] == (1, 64, 64) and loaded["mean"] == (0.0,) and loaded["std"] == (1.0,)
    assert loaded["crop_pct"] == 1.0


# ---- pretrained= --------------------------------------------------------------------------


def _state_equal(a: nn.Module, b: nn.Module, skip=lambda k: False) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa if not skip(k))


def test_pretrained_from_a_local_file_equals_the_saved_model(tmp_path):
    torch.manual_seed(0)
    saved = _perturb(tiny("resnet20_cifar", "sact", num_classes=5)).eval()
    sact.save_checkpoint(saved, tmp_path / "ck", meta={"tau": 0.05})
    model = sact.create_model("resnet20_cifar", mode="sact", base_channels=4, num_classes=5, pretrained=tmp_path / "ck")
    assert model.training  # create_model's convention, pretrained or not
    assert _state_equal(model, saved) and model.checkpoint_meta == {"tau": 0.05}
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x).logits, saved(x).logits, rtol=0, atol=0)
    assert model.pretrained_cfg["file"] == str(tmp_path / "ck")
    # another mode and class count: halting branches and the classifier stay fresh, the rest loads
    torch.manual_seed(5)
    fresh = sact.create_model("resnet20_cifar", mode="act", base_channels=4, num_classes=3)
    torch.manual_seed(5)
    ft = sact.create_model("resnet20_cifar", mode="act", base_channels=4, num_classes=3, pretrained=tmp_path / "ck")
    new = lambda k: ".halting." in k or k.startswith("fc.")  # noqa: E731
    assert _state_equal(ft, saved, skip=new)
    assert _state_equal(ft, fresh, skip=lambda k: not new(k))
    assert not _state_equal(ft, fresh)
    with pytest.raises(CheckpointError, match="holds a resnet20_cifar, not a resnet32_cifar"):
        sact.create_model("resnet32_cifar", base_channels=4, pretrained=tmp_path / "ck")
    with pytest.raises(CheckpointError, match="does not fit"):
        sact.create_model("resnet20_cifar", base_channels=8, num_classes=5, pretrained=tmp_path / "ck")
    with pytest.raises(CheckpointError, match="not found"):
        sact.create_model("resnet20_cifar", pretrained=tmp_path / "missing")
    with pytest.raises(CheckpointError, match="hosts no default weights"):
        sact.create_model("resnet18", pretrained=True)


def test_pretrained_url_offline_fails_with_one_clear_message_and_uses_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    url = "http://192.0.2.1/sact/resnet20_cifar-sact.safetensors"  # TEST-NET address; sockets are blocked
    with pytest.raises(CheckpointError) as e:
        sact.create_model("resnet20_cifar", base_channels=4, pretrained=url)
    msg = str(e.value)
    assert msg.startswith(f"cannot download pretrained weights from {url} (")
    assert "check the network" in msg and "pretrained='path/to/resnet20_cifar-sact.safetensors'" in msg
    assert "\n" not in msg and e.value.__cause__ is None and e.value.__suppress_context__
    assert not cache.exists() or not any(cache.iterdir())  # no partial file left behind
    with pytest.raises(CheckpointError, match="must name an sact checkpoint's .safetensors file"):
        sact.create_model("resnet20_cifar", pretrained="https://example.org/model.pth")
    # a file already in torch.hub's cache is used without the network
    saved = _perturb(tiny("resnet20_cifar", "sact")).eval()
    weights = sact.save_checkpoint(saved, tmp_path / "ck")
    cache.mkdir(parents=True, exist_ok=True)
    shutil.copy(weights, cache / "resnet20_cifar-sact.safetensors")
    model = sact.create_model("resnet20_cifar", base_channels=4, pretrained=url)
    assert _state_equal(model, saved)
    assert model.pretrained_cfg["url"] == url and model.pretrained_cfg["file"].startswith(str(cache))


# ---- registry ----------------------------------------------------------------------------


def test_list_models_wildcards():
    assert sact.list_models("resnet*_cifar") == ["resnet110_cifar", "resnet20_cifar", "resnet32_cifar", "resnet56_cifar"]
    assert sact.list_models("resnet?4") == ["resnet34"]
    assert sact.list_models(["resnet18", "*_v2"]) == ["resnet101_v2", "resnet152_v2", "resnet18", "resnet50_v2"]
    assert sact.list_models("nothing*") == []
    assert sact.list_models() == sorted(_REGISTRY)


@pytest.fixture
def registry_snapshot():
    saved = dict(_REGISTRY)
    yield
    _REGISTRY.clear()
    _REGISTRY.update(saved)


def test_register_model_rules(registry_snapshot):
    def build(*, mode="sact", num_classes=10):
        return sact.create_model("resnet20_cifar", mode=mode, num_classes=num_classes, base_channels=4)

    sact.register_model("api_test_net", build)
    sact.register_model("api_test_net", build)  # the same function again (a re-run cell): replaces
    assert sact.create_model("api_test_net", mode="act").sact_config == {"name": "api_test_net",
                                                                          "kwargs": {"mode": "act"}}

    def other(*, mode="sact"):
        return build(mode=mode)

    with pytest.raises(ValueError, match="'api_test_net' is already registered"):
        sact.register_model("api_test_net", other)
    with pytest.raises(ValueError, match="must take a 'mode' keyword"):
        sact.register_model("api_no_mode", lambda: None)

    @sact.register_model
    def api_not_a_model(*, mode="sact"):
        return nn.Linear(2, 2)

    with pytest.raises(TypeError, match="must return a subclass of sact.models.AdaptiveResNet"):
        sact.create_model("api_not_a_model")
    with pytest.raises(ValueError, match="register_model first"):
        sact.create_model("api_unknown_net")


# ---- torch.hub and packaging ---------------------------------------------------------------


def test_torch_hub_load_from_the_repository():
    import importlib.util

    model = torch.hub.load(str(ROOT), "resnet18", source="local", mode="vanilla", num_classes=3)
    assert isinstance(model, AdaptiveResNet) and model.sact_config == {"name": "resnet18",
                                                                       "kwargs": {"mode": "vanilla", "num_classes": 3}}
    spec = importlib.util.spec_from_file_location("sact_hubconf", ROOT / "hubconf.py")
    hub = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hub)
    entries = sorted(n for n in dir(hub) if callable(getattr(hub, n)) and not n.startswith("_"))
    assert entries == sact.list_models()  # what torch.hub.list shows for a GitHub checkout
    assert all(isinstance(d, str) for d in hub.dependencies)


def test_py_typed_ships_as_package_data():
    assert (ROOT / "src" / "sact" / "py.typed").is_file()
    with open(ROOT / "pyproject.toml", "rb") as f:
        assert "py.typed" in tomllib.load(f)["tool"]["setuptools"]["package-data"]["sact"]


# ---- the docs run as written ---------------------------------------------------------------


def _python_blocks(text: str) -> list[str]:
    return [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if not b.startswith("# needs network")]


#: the model documentation: the file and the part of it (up to a heading) that documents models
MODEL_DOCS = {"docs/custom_units.md": None, "docs/api.md": "### Checkpoints", "README.md": "## What we measured"}


@pytest.mark.parametrize("doc", sorted(MODEL_DOCS))
def test_model_docs_run(doc, monkeypatch, registry_snapshot, tmp_path):
    """Every Python block of the model docs runs on its own from (a linked stand-in for) the repository root."""
    monkeypatch.chdir(linked_root(tmp_path))
    text = (ROOT / doc).read_text()
    if MODEL_DOCS[doc]:
        text = text[: text.index(MODEL_DOCS[doc])]
    blocks = _python_blocks(text)
    assert blocks
    for block in blocks:
        exec(compile(block, doc, "exec"), {"__name__": "__doc_example__"})  # noqa: S102
