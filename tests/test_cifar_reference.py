"""The CIFAR models (sact.models.cifar + sact.units.PreActBasicUnit) against every detail of spec section 5.1.

Each check writes the reference computation out with functional ops (from the spec, not
from our modules) and compares on random inputs with random BN statistics.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sact
from sact.halting import ACTHalting, SACTHalting
from sact.units import PreActBasicUnit

torch.set_num_threads(1)


def lrelu(x, slope=0.1):
    return torch.maximum(x, slope * x)


def bn(mod: nn.BatchNorm2d, x):
    return F.batch_norm(x, mod.running_mean, mod.running_var, mod.weight, mod.bias, False, 0.0, 1e-3)


def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.3)


def reference_unit(unit: PreActBasicUnit, x, mask):
    """cifar_model.residual: preact = lrelu(BN(x)); conv1 3x3/s TF-SAME (+BN, lrelu applied twice);
    conv2 3x3 with bias; option-A shortcut (avg-pool k=s VALID, zero channel pad both sides)."""
    preact = lrelu(bn(unit.bn1, x))
    shortcut = preact if unit.activate_before_residual else x
    s = unit.stride
    # TF SAME, stride 2 on an even size: 0 before, 1 after; stride 1: 1/1
    padded = F.pad(preact, (0, 1, 0, 1)) if s == 2 else F.pad(preact, (1, 1, 1, 1))
    c = lrelu(lrelu(bn(unit.bn2, F.conv2d(padded, unit.conv1.weight, stride=s))))
    c = F.conv2d(c, unit.conv2.weight, unit.conv2.bias, padding=1)
    if unit.in_channels != unit.out_channels:
        shortcut = F.avg_pool2d(shortcut, s, s)
        p = (unit.out_channels - unit.in_channels) // 2
        shortcut = F.pad(shortcut, (0, 0, 0, 0, p, p))
    return shortcut + (c if mask is None else mask * c)


def test_layout():
    m = sact.create_model("resnet32_cifar", mode="sact")
    assert [len(s) for s in m.stages] == [5, 5, 5]  # --model 5 -> ResNet-32
    assert m.stem.kernel_size == (3, 3) and m.stem.stride == (1, 1) and m.stem.bias is not None
    assert m.stem.out_channels == 16
    for i, stage in enumerate(m.stages):
        for u, unit in enumerate(stage.units):
            assert isinstance(unit, PreActBasicUnit)
            assert unit.out_channels == 16 * 2**i
            assert unit.stride == (2 if (i > 0 and u == 0) else 1)
            assert unit.activate_before_residual == (i == 0 and u == 0)
            assert unit.conv1.bias is None and unit.conv2.bias is not None  # conv1 has BN, conv2 bias + no BN
            assert unit.act1.negative_slope == 0.1 and unit.act2.negative_slope == pytest.approx(0.01)
        for h in stage.halting:  # CIFAR halting BNs are followed by leaky ReLU 0.1
            assert isinstance(h, SACTHalting)
            assert h.local_act.negative_slope == 0.1 and h.global_act.negative_slope == 0.1
    assert isinstance(sact.create_model("resnet32_cifar", mode="act").layer1.halting[0], ACTHalting)
    bns = [mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)]
    assert all(b.eps == 1e-3 and b.momentum == 0.1 and b.affine for b in bns)  # decay 0.9, scale + center
    assert m.head_act.negative_slope == 0.1 and m.fc.out_features == 10


@pytest.mark.parametrize("in_ch,out_ch,stride,abr", [(4, 4, 1, True), (4, 4, 1, False), (4, 8, 2, False), (8, 16, 2, True)])
def test_unit_matches_reference(in_ch, out_ch, stride, abr):
    unit = PreActBasicUnit(in_ch, out_ch, stride=stride, activate_before_residual=abr,
                           norm_layer=lambda c: nn.BatchNorm2d(c, eps=1e-3)).eval()
    randomize_bn(unit)
    x = torch.randn(2, in_ch, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(unit(x), reference_unit(unit, x, None))
        if stride == 1:
            mask = (torch.rand(2, 1, 16, 16) > 0.4).float()
            torch.testing.assert_close(unit(x, mask), reference_unit(unit, x, mask))


def test_strided_padding_is_tf_same_not_pytorch():
    """The asymmetric padding matters: PyTorch padding=1 gives different outputs."""
    unit = PreActBasicUnit(4, 8, stride=2).eval()
    x = torch.randn(1, 4, 32, 32)
    with torch.no_grad():
        c = unit.conv1(x)
        torch.testing.assert_close(c, F.conv2d(F.pad(x, (0, 1, 0, 1)), unit.conv1.weight, stride=2))
        assert not torch.allclose(c, F.conv2d(x, unit.conv1.weight, stride=2, padding=1))


def test_stem_and_head_pool_before_bn():
    m = sact.create_model("resnet20_cifar", mode="vanilla", base_channels=4).eval()
    randomize_bn(m)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        y, _ = m.forward_stem(x)
        torch.testing.assert_close(y, F.conv2d(x, m.stem.weight, m.stem.bias, padding=1))  # no BN / activation
        feat = torch.randn(2, m.num_features, 4, 4)
        logits = m.forward_head(feat)
        pre = lrelu(bn(m.head_bn, feat.mean((2, 3), keepdim=True))).flatten(1)
        torch.testing.assert_close(logits, F.linear(pre, m.fc.weight, m.fc.bias))
        torch.testing.assert_close(m.forward_head(feat, pre_logits=True), pre)
        # BN + lrelu before pooling (the torchvision order) would differ
        other = F.linear(lrelu(bn(m.head_bn, feat)).mean((2, 3)), m.fc.weight, m.fc.bias)
        assert not torch.allclose(logits, other)


def test_whole_model_matches_reference_sact():
    """Stage by stage with the reference recurrence written out (spec 2.3) and CIFAR halting branches."""
    m = sact.create_model("resnet20_cifar", mode="sact", base_channels=4).eval()
    randomize_bn(m)
    for stage in m.stages:
        for h in stage.halting:
            h.local_conv.bias.data.fill_(0.5)  # halting after 2-3 units, varying over positions
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = m(x)
        net = F.conv2d(x, m.stem.weight, m.stem.bias, padding=1)
        varied = False
        for stage, so in zip(m.stages, out.stages):
            units = stage.units
            st = reference_unit(units[0], net, None)
            cs = torch.zeros(st.shape[0], *st.shape[2:])
            fin, rem, pc, acc = cs.bool(), torch.ones_like(cs), torch.ones_like(cs), 0
            for u, unit in enumerate(units):
                mask = None if u == 0 else (~fin).float()[:, None]
                if u:
                    st = reference_unit(unit, st, mask)
                if u < len(units) - 1:
                    hb = stage.halting[u]
                    local = F.conv2d(lrelu(bn(hb.local_bn, st)), hb.local_conv.weight, hb.local_conv.bias, padding=1)
                    glob = F.conv2d(lrelu(bn(hb.global_bn, st.mean((2, 3), keepdim=True))), hb.global_conv.weight)
                    h = torch.sigmoid(local + glob)[:, 0]
                else:
                    h = torch.ones_like(cs)
                cs = cs + h
                cur = cs >= 0.99
                h = torch.where(cur, 0.0, h)
                just = cur & ~fin
                d = torch.where(just, rem, h)
                pc = pc + torch.where(cur, torch.where(just, rem, 0.0), 1.0)
                acc = acc + d[:, None] * st
                rem, fin = rem - h, cur
            torch.testing.assert_close(so.ponder_map, pc)
            varied |= bool((pc != pc.flatten()[0]).any())
            net = acc
        want = F.linear(lrelu(bn(m.head_bn, net.mean((2, 3), keepdim=True))).flatten(1), m.fc.weight, m.fc.bias)
        torch.testing.assert_close(out.logits, want)
        assert varied


def test_halting_flops_per_unit():
    """[derived] section 6: SACT halting branch at full activity 294,944 / 147,520 / 73,856 (ResNet-32, 32x32)."""
    m = sact.create_model("resnet32_cifar", mode="sact").eval()
    with torch.no_grad():
        feats = m.forward_features(torch.randn(1, 3, 32, 32)).features
    assert [int(s.halting[0].flops(f, None)[0]) for s, f in zip(m.stages, feats)] == [294_944, 147_520, 73_856]


def test_init_is_tf_variance_scaling():
    """variance_scaling_initializer(): truncated normal (2 std), std sqrt(1.3 * 2 / fan_in); zero biases."""
    m = sact.create_model("resnet110_cifar", mode="vanilla")
    w = torch.cat([u.conv1.weight.flatten() / (1.3 * 2 / u.conv1.weight[0].numel()) ** 0.5
                   for s in m.stages for u in s.units])
    assert w.abs().max() <= 2.0 + 1e-6
    assert 0.85 < w.std().item() < 0.9  # a normal truncated at 2 std has std 0.880
    assert all(u.conv2.bias.abs().max() == 0 for s in m.stages for u in s.units) and m.stem.bias.abs().max() == 0
