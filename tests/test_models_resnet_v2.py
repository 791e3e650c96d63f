"""The reference ImageNet ResNet-v2 family (resnet50_v2 / 101_v2 / 152_v2) against spec sections 5.2, 6, 13."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sact
from sact.halting import SACTHalting
from sact.models.resnet_v2 import MaxPool2dSame, PreActBottleneck, ResNetV2

torch.set_num_threads(1)


def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)


def set_halting(model, bias: float) -> None:
    for stage in model.stages:
        for h in stage.halting or []:
            for m in h.modules():
                if isinstance(m, nn.Conv2d):
                    m.weight.data.zero_()
            h.local_conv.bias.data.fill_(bias)


def test_registry_defaults():
    for depth, layers in ((50, (3, 4, 6, 3)), (101, (3, 4, 23, 3)), (152, (3, 8, 36, 3))):
        m = sact.create_model(f"resnet{depth}_v2", mode="vanilla", base_width=2)
        assert isinstance(m, ResNetV2)
        assert [len(s) for s in m.stages] == list(layers)
        assert m.logits.out_features == 1001  # background + 1000 classes
        assert m.sact_config["name"] == f"resnet{depth}_v2"
    with pytest.raises(ValueError, match="layers must be 4"):
        ResNetV2(layers=(3, 4, 6))
    with pytest.raises(ValueError, match="got 1001, 0, 64, 64"):
        ResNetV2(in_chans=0)
    with pytest.raises(ValueError, match="stride=0"):
        PreActBottleneck(8, 16, 4, stride=0)


def test_vanilla_flop_goldens():
    """Spec section 6: ResNet-101 15,602,814,976 and ResNet-50 8,178,372,608 at 224 (2 x MACs)."""
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        out = sact.create_model("resnet101_v2", mode="vanilla").eval()(x)
        assert out.flops.item() == 15_602_814_976
        assert [s.flops.item() for s in out.stages] == [1_335_885_824, 2_055_208_960, 10_353_115_136, 1_618_477_056]
        assert [tuple(s.num_units.shape[1:]) for s in out.stages] == [(56, 56), (28, 28), (14, 14), (7, 7)]
        assert sact.create_model("resnet50_v2", mode="vanilla").eval()(x).flops.item() == 8_178_372_608


def test_sact_flop_bounds_and_halting_flops():
    """[derived] goldens of section 6: SACT ResNet-101 at 224 between 2,964,742,144 and 15,736,541,184;
    a halting branch with every position active costs 14,451,200 / 7,226,368 / 3,614,720 / 1,810,432."""
    x = torch.randn(1, 3, 224, 224)
    m = sact.create_model("resnet101_v2", mode="sact").eval()
    with torch.no_grad():
        feats = m.forward_features(x).features
        per_unit = [int(s.halting[0].flops(f, None)[0]) for s, f in zip(m.stages, feats)]
        assert per_unit == [14_451_200, 7_226_368, 3_614_720, 1_810_432]
        set_halting(m, -100.0)  # never halts
        assert m(x).flops.item() == 15_736_541_184
        set_halting(m, 100.0)  # halts after the first unit of every block
        assert m(x).flops.item() == 2_964_742_144


def test_layout_strides_and_biases():
    m = sact.create_model("resnet50_v2", mode="sact", base_width=4)
    assert m.conv1.out_channels == 64 and m.conv1.bias is not None  # stem: 64 ch whatever the width, with bias
    assert m.conv1.stride == (2, 2) and m.conv1.padding == (3, 3)  # conv2d_same 7x7/2: pad 3/3
    for i, stage in enumerate(m.stages):
        for u, unit in enumerate(stage.units):
            # stride in the FIRST unit of blocks 2-4 (not TF-Slim v2's last unit), inside conv2
            assert unit.conv2.stride == ((2, 2) if (i > 0 and u == 0) else (1, 1))
            assert unit.conv1.stride == (1, 1) and unit.conv2.padding == (1, 1)
            assert unit.conv1.bias is None and unit.conv2.bias is None and unit.conv3.bias is not None
            assert (unit.shortcut is not None) == (u == 0)
            if unit.shortcut is not None:
                assert unit.shortcut.bias is not None and unit.shortcut.stride == unit.conv2.stride
    bns = [mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)]
    assert bns and all(b.eps == 1e-5 and b.momentum == 0.003 and b.affine for b in bns)  # decay 0.997
    for stage in m.stages:
        for h in stage.halting:  # ImageNet halting branches: no activation after BN
            assert isinstance(h, SACTHalting)
            assert isinstance(h.local_act, nn.Identity) and isinstance(h.global_act, nn.Identity)
    names = set(m.state_dict())
    for key in ["conv1.bias", "block1.0.preact.running_var", "block1.0.shortcut.weight", "block1.0.conv1_bn.weight",
                "block2.1.conv2_bn.running_mean", "block4.2.conv3.bias", "block3.halting.4.local_conv.bias",
                "block3.halting.4.global_bn.weight", "postnorm.weight", "logits.weight"]:
        assert key in names, key


def test_max_pool_tf_same():
    """TF SAME 3x3/2: on an even size pads 0 before / 1 after (PyTorch padding=1 pads 1/1)."""
    x = torch.randn(2, 3, 8, 7)
    y = MaxPool2dSame(3, 2)(x)
    assert y.shape == (2, 3, 4, 4)
    for h, w in ((8, 7),):
        for i in range(4):
            for j in range(4):
                # window starts: even 8 -> total pad 1 -> 0 before; odd 7 -> total pad 2 -> 1 before
                r0, c0 = 2 * i, 2 * j - 1
                win = x[:, :, r0 : min(r0 + 3, h), max(c0, 0) : min(c0 + 3, w)]
                torch.testing.assert_close(y[:, :, i, j], win.amax(dim=(2, 3)))
    assert not torch.equal(MaxPool2dSame(3, 2)(x[..., :6]), F.max_pool2d(x[..., :6], 3, 2, padding=1))


def _reference_unit(unit: PreActBottleneck, x, mask):
    """The unit written out from spec 5.2 with functional ops (eval-mode BN)."""
    def bn(mod, t):
        return F.batch_norm(t, mod.running_mean, mod.running_var, mod.weight, mod.bias, False, 0.0, 1e-5)

    preact = F.relu(bn(unit.preact, x))
    s = unit.stride
    shortcut = F.conv2d(preact, unit.shortcut.weight, unit.shortcut.bias, stride=s) if unit.shortcut else x[:, :, ::s, ::s]
    r = F.relu(bn(unit.conv1_bn, F.conv2d(preact, unit.conv1.weight)))
    r = F.pad(r, (1, 1, 1, 1)) if s > 1 else r  # conv2d_same: explicit pad then VALID
    r = F.relu(bn(unit.conv2_bn, F.conv2d(r, unit.conv2.weight, stride=s, padding=0 if s > 1 else 1)))
    r = F.conv2d(r, unit.conv3.weight, unit.conv3.bias)
    return shortcut + (r if mask is None else mask * r)


@pytest.mark.parametrize("in_ch,depth,stride", [(8, 16, 2), (16, 16, 1), (8, 16, 1), (16, 16, 2)])
def test_unit_matches_spec(in_ch, depth, stride):
    unit = PreActBottleneck(in_ch, depth, 4, stride=stride).eval()
    randomize_bn(unit)
    x = torch.randn(2, in_ch, 10, 10)
    with torch.no_grad():
        torch.testing.assert_close(unit(x), _reference_unit(unit, x, None))
        if stride == 1 and in_ch == depth:
            mask = (torch.rand(2, 1, 10, 10) > 0.5).float()
            y = unit(x, mask)
            torch.testing.assert_close(y, _reference_unit(unit, x, mask))
            frozen = mask.expand_as(x) == 0
            assert torch.equal(y[frozen], x[frozen])


def test_unit_flops_masked():
    unit = PreActBottleneck(16, 16, 4)
    x = torch.randn(2, 16, 8, 8)
    mask = torch.zeros(2, 1, 8, 8)
    mask[0, 0, 3, 3] = 1  # one interior position -> 9 dilated positions
    mask[1, 0, 0, 0] = 1  # a corner -> 4 dilated positions
    per_pos = {"conv1": 2 * 16 * 4, "conv2": 2 * 9 * 4 * 4, "conv3": 2 * 4 * 16}
    want = [9 * per_pos["conv1"] + per_pos["conv2"] + per_pos["conv3"],
            4 * per_pos["conv1"] + per_pos["conv2"] + per_pos["conv3"]]
    assert unit.flops(x, mask).tolist() == want
    assert unit.flops(x).tolist() == [64 * sum(per_pos.values())] * 2
    strided = PreActBottleneck(8, 16, 4, stride=2)
    x = torch.randn(1, 8, 9, 9)  # conv1 at 9x9, the rest (and the shortcut) at 5x5
    assert strided.flops(x).item() == 81 * 2 * 8 * 4 + 25 * (2 * 9 * 16 + 2 * 4 * 16 + 2 * 8 * 16)
    with pytest.raises(ValueError, match="stride 1"):
        strided.flops(x, torch.ones(1, 1, 9, 9))


def test_stem_and_head():
    m = sact.create_model("resnet50_v2", mode="vanilla", base_width=4, num_classes=5).eval()
    randomize_bn(m)
    x = torch.randn(2, 3, 32, 32)  # stem output 16x16: TF SAME pool pads 0 before, 1 after
    with torch.no_grad():
        y, _ = m.forward_stem(x)
        conv = F.conv2d(x, m.conv1.weight, m.conv1.bias, stride=2, padding=3)  # no BN / ReLU in the stem
        torch.testing.assert_close(y, F.max_pool2d(F.pad(conv, (0, 1, 0, 1), value=float("-inf")), 3, 2))
        feat = torch.randn(2, m.num_features, 3, 3)
        logits = m.forward_head(feat)
        pn = m.postnorm
        want = F.relu(F.batch_norm(feat, pn.running_mean, pn.running_var, pn.weight, pn.bias, False, 0.0, 1e-5))
        torch.testing.assert_close(logits, F.linear(want.mean((2, 3)), m.logits.weight, m.logits.bias))
        torch.testing.assert_close(m.forward_head(feat, pre_logits=True), want.mean((2, 3)))
        assert m.get_classifier() is m.logits and m.head_flops() == 2 * m.num_features * 5
