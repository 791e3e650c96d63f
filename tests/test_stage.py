"""The adaptive stage with a custom unit (the unit protocol) and edge cases."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sact import AdaptiveStage, adaptive_computation_time
from sact.flops import conv_flops, mask_positions
from sact.units import ResidualUnit


class TinyUnit(nn.Module):
    """A custom unit following the documented protocol (docs/custom_units.md)."""

    def __init__(self, channels: int):
        super().__init__()
        self.out_channels = channels
        self.conv = nn.Conv2d(channels, channels, 1)

    def forward(self, x, mask=None):
        r = torch.tanh(self.conv(x))
        return x + (r if mask is None else mask * r)

    def flops(self, x, mask=None):
        b, _, h, w = x.shape
        return conv_flops(self.conv, mask_positions(mask, b, h, w, device=x.device))


@pytest.mark.parametrize("mode", ["vanilla", "act", "sact"])
def test_custom_unit_stage(mode):
    torch.manual_seed(0)
    units = [TinyUnit(6) for _ in range(4)]
    assert all(isinstance(u, ResidualUnit) for u in units)
    stage = AdaptiveStage(units, mode=mode).eval()
    if mode != "vanilla":
        for h in stage.halting:
            (h.local_conv if mode == "sact" else h.global_conv).bias.data.fill_(-0.5)
    x = torch.randn(2, 6, 5, 7)
    y, out = stage(x)
    assert y.shape == x.shape
    if mode == "vanilla":
        ref = x
        for u in units:
            ref = u(ref)
        torch.testing.assert_close(y, ref)
        assert (out.num_units == 4).all()
        return
    # Recompute with a literal transcription of the reference pseudo-code (spec 2.3).
    xi = units[0](x)
    cs = torch.zeros(2, 5, 7) if mode == "sact" else torch.zeros(2)
    fin = torch.zeros_like(cs, dtype=torch.bool)
    rem, pc, nu, acc = torch.ones_like(cs), torch.ones_like(cs), torch.zeros_like(cs), 0
    spread = (lambda t: t.unsqueeze(1)) if mode == "sact" else (lambda t: t.view(2, 1, 1, 1))
    for u in range(4):
        if u > 0:
            xi = units[u](xi, spread((~fin).float()).expand(2, 1, 5, 7))
        h = stage.halting[u](xi) if u < 3 else torch.ones_like(cs)
        cs = cs + h
        cur = cs >= 0.99
        h = torch.where(cur, torch.zeros_like(h), h)
        just = cur & ~fin
        d = torch.where(just, rem, h)
        pc = pc + torch.where(cur, torch.where(just, rem, torch.zeros_like(h)), torch.ones_like(h))
        nu = nu + (~fin).float()
        acc = acc + spread(d) * xi
        rem, fin = rem - h, cur
    if mode == "act":
        pc, nu = pc.view(2, 1, 1).expand(2, 5, 7), nu.view(2, 1, 1).expand(2, 5, 7)
    torch.testing.assert_close(out.ponder_map, pc)
    assert torch.equal(out.num_units.float(), nu)
    torch.testing.assert_close(y, acc)
    if mode == "sact":
        assert len(set(out.num_units.flatten().tolist())) > 1, "halting should be non-trivial"
    assert out.flops.shape == (2,)


def test_sact_matches_unmasked_run_when_halting_is_late():
    """With units whose states do not depend on neighbours (1x1), masking only freezes
    halted positions, so the output equals the p-weighted sum of unmasked states."""
    torch.manual_seed(1)
    units = [TinyUnit(3) for _ in range(3)]
    stage = AdaptiveStage(units, mode="sact").eval()
    x = torch.randn(1, 3, 4, 4)
    y, out = stage(x)
    states, xi = [], x
    for u in units:
        xi = u(xi)
        states.append(xi)
    d = out.halting_distribution
    torch.testing.assert_close(y, sum(d[:, n : n + 1] * states[n] for n in range(3)))


def test_single_unit_stage():
    stage = AdaptiveStage([TinyUnit(2)], mode="sact")
    y, out = stage(torch.randn(2, 2, 3, 3))
    assert (out.ponder_map == 2).all() and (out.num_units == 1).all()
    assert stage.halting is not None and len(stage.halting) == 0


def test_stage_errors():
    with pytest.raises(ValueError, match="at least one unit"):
        AdaptiveStage([], mode="sact")
    with pytest.raises(ValueError, match="mode must be one of"):
        AdaptiveStage([TinyUnit(2)], mode="dense")
    with pytest.raises(TypeError, match="lacks 'flops'"):
        AdaptiveStage([nn.Conv2d(2, 2, 1)], mode="sact")
    with pytest.raises(ValueError, match="eps"):
        AdaptiveStage([TinyUnit(2)], eps=1.5)


def test_parameter_names_follow_torchvision():
    stage = AdaptiveStage([TinyUnit(2), TinyUnit(2)], mode="sact")
    names = [n for n, _ in stage.named_parameters()]
    assert "0.conv.weight" in names and "1.conv.weight" in names
    assert any(n.startswith("halting.0.local_conv") for n in names)


def test_act_training_runs_every_unit_on_every_image():
    """Reference 'act' (``adaptive_computation_time_wrapper``): all units run on all images,
    halting only weights the outputs, so BatchNorm batch statistics are those of the plain chain."""
    from sact.units import PreActBasicUnit

    torch.manual_seed(0)
    units = [PreActBasicUnit(4, 4) for _ in range(3)]
    stage = AdaptiveStage(units, mode="act").train()
    stage.halting[0].global_conv.bias.data.fill_(10.0)  # every image halts after unit 0
    plain = [PreActBasicUnit(4, 4) for _ in range(3)]
    for p, u in zip(plain, units):
        p.load_state_dict(u.state_dict())
    x = torch.randn(5, 4, 6, 6)
    y, out = stage(x)
    assert (out.num_units == 1).all()
    ref = x
    for p in plain:
        ref = p(ref)
    for p, u in zip(plain, units):  # later units saw the evolving (not frozen) features
        torch.testing.assert_close(u.bn1.running_mean, p.bn1.running_mean)
        torch.testing.assert_close(u.bn2.running_var, p.bn2.running_var)


class ZeroResidualUnit(nn.Module):
    """Keeps its input exactly (a bf16 conv whose output is 0): features stay float32 under autocast."""

    def __init__(self, channels: int):
        super().__init__()
        self.out_channels = channels
        self.conv = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x, mask=None):
        r = self.conv(x)
        return x + (r if mask is None else mask * r)

    def flops(self, x, mask=None):
        b, _, h, w = x.shape
        return conv_flops(self.conv, mask_positions(mask, b, h, w, device=x.device))


@pytest.mark.parametrize("mode", ["act", "sact"])
def test_halting_stays_float32_under_bf16_autocast(mode):
    """Near the threshold, bf16 rounding of the halting probabilities or of the cumulative
    sum would move ``>= 0.99``: under CPU bf16 autocast the halting units and ponder maps
    must equal the float32 run exactly."""
    torch.manual_seed(0)
    stage = AdaptiveStage([ZeroResidualUnit(8) for _ in range(4)], mode=mode).eval()
    with torch.no_grad():
        for branch in stage.halting:
            conv = branch.local_conv if mode == "sact" else branch.global_conv
            conv.weight.mul_(0.02)
            conv.bias.fill_(-0.0203)  # sigmoid ~ 0.495: two units sum to ~0.99, the threshold
    x = torch.randn(16, 8, 6, 6)
    with torch.no_grad():
        y32, ref = stage(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ybf, got = stage(x)
    cum = torch.stack([b(x) for b in stage.halting[:2]]).sum(0)
    assert ((cum - 0.99).abs() < 2e-3).any(), "inputs are not near the threshold"
    assert (ref.num_units == 2).any() and (ref.num_units == 3).any()
    assert got.ponder_map.dtype == torch.float32
    assert torch.equal(got.num_units, ref.num_units)
    assert torch.equal(got.ponder_map, ref.ponder_map)
    torch.testing.assert_close(got.halting_distribution.float(), ref.halting_distribution, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["resnet20_cifar", "resnet50"])
def test_flops_from_num_units_equals_the_per_unit_masks(name):
    """One dilation of the unit counts gives every unit's dilated set (a max commutes with a threshold)."""
    import sact
    from sact.flops import dilate_mask

    torch.manual_seed(0)
    kw = {"base_channels": 4} if name.endswith("_cifar") else {"base_width": 4}
    stage = sact.create_model(name, mode="sact", num_classes=3, **kw).stages[1]
    u = stage.num_units
    x = torch.zeros(3, stage.units[0].conv1.in_channels, 12, 10)
    h, w = 6, 5  # the stage's map after its stride-2 unit 0
    for num_units in (torch.randint(1, u + 1, (3, h, w)), torch.ones(3, h, w, dtype=torch.long),
                      torch.full((3, h, w), u, dtype=torch.long)):
        masks = num_units.unsqueeze(0) > torch.arange(u).view(-1, 1, 1, 1)  # [U, B, H, W]
        active = masks.view(u, 3, -1).sum(2)
        dilated = dilate_mask(masks.view(u * 3, 1, h, w).float()).view(u, 3, -1).sum(2).long()
        expect = stage.flops_from_counts(x, active, dilated, h * w)
        assert torch.equal(stage.flops_from_num_units(x, num_units, h * w), expect)
