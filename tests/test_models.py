"""Every registered model in every mode: shapes, gradients, masking, FLOPs, torchvision parity."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import sact
from sact.flops import count_model_flops
from sact.halting import ACTHalting, SACTHalting

MODES = ("vanilla", "act", "sact")


def small(name: str, mode: str, **kw):
    """Reduced-width versions so that every model runs quickly in tests."""
    width = {"base_channels": 4} if name.endswith("_cifar") else {"base_width": 4}
    return sact.create_model(name, mode=mode, **width, **kw)


def small_input(name: str, batch: int = 2, size: int | None = None):
    size = size or (16 if name.endswith("_cifar") else 64)
    return torch.randn(batch, 3, size, size)


def set_halting_bias(model, local: float, zero_weights: bool = False):
    for stage in model.stages:
        for h in stage.halting or []:
            conv = h.local_conv if isinstance(h, SACTHalting) else h.global_conv
            conv.bias.data.fill_(local)
            if zero_weights:
                for m in h.modules():
                    if isinstance(m, nn.Conv2d):
                        m.weight.data.zero_()


def test_registry():
    names = sact.list_models()
    for n in ["resnet20_cifar", "resnet32_cifar", "resnet56_cifar", "resnet110_cifar", "resnet50", "resnet101", "resnet152"]:
        assert n in names
    with pytest.raises(ValueError, match="unknown model 'resnet7'"):
        sact.create_model("resnet7")
    with pytest.raises(ValueError, match="mode must be one of"):
        sact.create_model("resnet20_cifar", mode="fast")
    with pytest.raises(ValueError, match="does not accept"):
        sact.create_model("resnet20_cifar", widht=3)
    with pytest.raises(ValueError, match="num_classes"):
        sact.create_model("resnet50", num_classes=-1)
    for n in ["resnet18", "resnet34"]:
        assert n in names


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sact.list_models())
def test_forward_backward(name, mode):
    model = small(name, mode, num_classes=7)
    x = small_input(name, batch=3)
    out = model(x)
    b = x.shape[0]
    assert out.logits.shape == (b, 7)
    assert out.ponder_cost.shape == (b,) and out.flops.shape == (b,)
    assert len(out.stages) == len(model.stages)
    for stage, so in zip(model.stages, out.stages):
        _, _, h, w = so.ponder_map.unsqueeze(1).shape
        assert so.num_units.shape == (b, h, w) and so.num_units.dtype == torch.long
        assert so.halting_distribution.shape == (b, len(stage), h, w)
        torch.testing.assert_close(so.halting_distribution.sum(1), torch.ones(b, h, w))
        assert ((so.num_units >= 1) & (so.num_units <= len(stage))).all()
        if mode == "act":  # constant over positions
            assert (so.ponder_map == so.ponder_map[:, :1, :1]).all()
        if mode != "vanilla":
            assert ((so.num_units < so.ponder_map) & (so.ponder_map <= so.num_units + 1)).all()
    loss = nn.functional.cross_entropy(out.logits, torch.arange(b) % 7) + sact.ponder_loss(out, 0.01)
    assert torch.isfinite(loss)
    loss.backward()
    for p in model.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()
    if mode != "vanilla":
        halting_grads = [p.grad for s in model.stages for p in s.halting.parameters() if p.grad is not None]
        assert halting_grads and any(g.abs().sum() > 0 for g in halting_grads), "halting branches get no gradient"


@pytest.mark.parametrize("mode", ["sact"])
@pytest.mark.parametrize("name", ["resnet20_cifar", "resnet50"])
def test_halted_positions_are_frozen(name, mode):
    """SACT: a unit never changes features at positions whose mask is 0; active ones change.
    (ACT runs every unit on every image, as the reference: tests/test_stage.py.)"""
    model = small(name, mode).eval()
    set_halting_bias(model, 0.0)  # halting probability ~0.5: some positions halt early
    seen = {"frozen": 0, "active": 0}

    def hook(module, args, out):
        x, mask = args[0], args[1] if len(args) > 1 else None
        if mask is None:
            return
        m = mask.expand_as(x) == 0
        assert torch.equal(out[m], x[m])
        seen["frozen"] += int(m.sum())
        seen["active"] += int((~m).sum())

    for stage in model.stages:
        for unit in stage.units[1:]:
            unit.register_forward_hook(hook)
    x = small_input(name, batch=3)
    out = model(x)
    assert seen["frozen"] > 0 and seen["active"] > 0
    # weights after halting are zero and each position ran as many units as reported
    for so in out.stages:
        u = torch.arange(so.halting_distribution.shape[1]).view(1, -1, 1, 1)
        assert (so.halting_distribution[u >= so.num_units.unsqueeze(1)] == 0).all()


def test_flop_goldens():
    """Reference section 6 goldens (computed with the same convention)."""
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert sact.create_model("resnet110_cifar", mode="vanilla").eval()(x).flops.item() == 505_775_360
        assert sact.create_model("resnet32_cifar", mode="vanilla").eval()(x).flops.item() == 137_725_184
        m = sact.create_model("resnet32_cifar", mode="sact").eval()
        set_halting_bias(m, -100.0, zero_weights=True)  # never halts
        assert m(x).flops.item() == 139_790_464
        set_halting_bias(m, 100.0, zero_weights=True)  # halts after the first unit of every stage
        assert m(x).flops.item() == 24_995_968
        # torchvision layout with the reference's 1001 classes: same FLOPs as the reference ResNet-101
        x = torch.randn(1, 3, 224, 224)
        m = sact.create_model("resnet101", mode="sact", num_classes=1001).eval()
        set_halting_bias(m, -100.0, zero_weights=True)
        assert m(x).flops.item() == 15_736_541_184
        set_halting_bias(m, 100.0, zero_weights=True)
        assert m(x).flops.item() == 2_964_742_144


@pytest.mark.parametrize("name", sact.list_models())
def test_vanilla_flops_equal_flop_counter(name):
    model = sact.create_model(name, mode="vanilla").eval()
    x = torch.randn(2, 3, 33, 33) if name.endswith("_cifar") else torch.randn(2, 3, 65, 65)
    with torch.no_grad():
        ours = model(x).flops
    assert (ours == ours[0]).all()
    assert int(ours.sum()) == count_model_flops(model, x)


@pytest.mark.parametrize("name", ["resnet20_cifar", "resnet50"])
def test_sact_never_halting_counts_vanilla_plus_halting(name):
    van = small(name, "vanilla").eval()
    sa = small(name, "sact").eval()
    set_halting_bias(sa, -100.0, zero_weights=True)
    x = small_input(name)
    with torch.no_grad():
        f_van, f_sact = van(x).flops, sa(x).flops
    halting = 0
    with torch.no_grad():
        feats = sa.forward_features(x).features
    for stage, f in zip(sa.stages, feats):
        for branch in stage.halting:
            halting += int(branch.flops(f, None)[0])
    assert torch.equal(f_sact - f_van, torch.full_like(f_van, halting))


def test_act_counts_only_running_images():
    m = small("resnet20_cifar", "act").eval()
    x = small_input("resnet20_cifar", batch=4)
    with torch.no_grad():
        out = m(x)
    # FLOPs differ across images exactly when their unit counts differ
    units = torch.stack([s.num_units[:, 0, 0] for s in out.stages], 1)
    for i in range(4):
        for j in range(4):
            if torch.equal(units[i], units[j]):
                assert out.flops[i] == out.flops[j]
    set_halting_bias(m, 100.0, zero_weights=True)
    with torch.no_grad():
        f_min = m(x).flops
    set_halting_bias(m, -100.0, zero_weights=True)
    with torch.no_grad():
        f_max = m(x).flops
    assert (f_min < f_max).all()


@pytest.mark.parametrize("name,tv", [("resnet18", torchvision.models.resnet18), ("resnet34", torchvision.models.resnet34),
                                     ("resnet50", torchvision.models.resnet50), ("resnet101", torchvision.models.resnet101)])
@pytest.mark.parametrize("mode", MODES)
def test_torchvision_weights(name, tv, mode):
    ref = tv(num_classes=10).eval()
    g = torch.Generator().manual_seed(1)
    for m in ref.modules():  # non-trivial BN statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    model = sact.create_model(name, mode=mode, num_classes=10).eval()
    halting_before = {k: v.clone() for k, v in model.state_dict().items() if ".halting." in k}
    sact.load_torchvision_weights(model, ref.state_dict())
    for k, v in model.state_dict().items():
        if ".halting." in k:
            assert torch.equal(v, halting_before[k])  # halting branches stay fresh
        else:
            assert torch.equal(v, ref.state_dict()[k])
    if mode == "vanilla":
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(model(x).logits, ref(x), rtol=1e-4, atol=1e-5)


def test_torchvision_weights_errors_and_options():
    ref = torchvision.models.resnet50(num_classes=10)
    model = sact.create_model("resnet50", mode="sact", num_classes=5)
    with pytest.raises(ValueError, match="wrong shape.*fc.weight"):
        sact.load_torchvision_weights(model, ref.state_dict())
    sact.load_torchvision_weights(model, ref.state_dict(), strict_head=False)  # fine-tune on 5 classes
    sd = ref.state_dict()
    del sd["layer2.0.conv1.weight"]
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing \['layer2.0.conv1.weight'\].*unexpected \['extra.weight'\]"):
        sact.load_torchvision_weights(sact.create_model("resnet50", num_classes=10), sd)
    grey = sact.create_model("resnet50", mode="vanilla", num_classes=10, in_chans=1)
    sact.load_torchvision_weights(grey, ref)
    torch.testing.assert_close(grey.conv1.weight, ref.conv1.weight.sum(1, keepdim=True))


def test_input_errors():
    m = small("resnet20_cifar", "sact")
    with pytest.raises(ValueError, match="expected 3 input channels"):
        m(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        m(torch.randn(3, 16, 16))


def test_halting_branch_init():
    s = SACTHalting(8)
    a = ACTHalting(8)
    assert s.local_conv.bias.item() == -3.0 and s.global_conv.bias is None
    assert a.global_conv.bias.item() == -3.0
    x = torch.randn(2, 8, 5, 6)
    s.eval(), a.eval()
    assert s(x).shape == (2, 5, 6) and a(x).shape == (2,)
    assert ((s(x) > 0) & (s(x) < 1)).all()
    with pytest.raises(ValueError, match="channels must be positive, got 0"):
        SACTHalting(0)


@pytest.mark.parametrize("name, mode", [(n, m) for n in ("resnet20_cifar", "resnet50", "resnet50_v2") for m in ("act", "sact")]
                         + [("resnet34", "sact")])
def test_stage_flops_equal_the_per_step_count(name, mode):
    """The stage counts FLOPs once from the final unit counts (the rates, vectorised); this
    equals summing every unit's and branch's ``flops(x, mask)`` over the loop's masks."""
    model = small(name, mode).eval()
    set_halting_bias(model, 0.0)
    x = small_input(name, batch=3)
    varied = False
    with torch.no_grad():
        x_in, _ = model.forward_stem(x)
        for stage in model.stages:
            y, so = stage(x_in)
            feats = stage.units[0](x_in)
            expected = stage.units[0].flops(x_in, None) + stage.halting[0].flops(feats, None)
            for n in range(1, stage.num_units):
                mask = (so.num_units > n).unsqueeze(1).to(feats.dtype)  # where unit n ran
                expected = expected + stage.units[n].flops(feats, mask)
                if n < stage.num_units - 1:
                    expected = expected + stage.halting[n].flops(feats, mask)
            assert torch.equal(so.flops, expected)
            varied |= bool(so.num_units.unique().numel() > 1)
            x_in = y
    assert varied
