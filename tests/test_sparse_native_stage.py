"""The native whole-stage CIFAR executor computes what the stage loop and the pure engine compute."""

from __future__ import annotations


import pytest
import torch
from torch import nn

import sact
from sact.sparse import native, to_sparse
from sact.sparse.native_stage import NativeBasicStage

from test_sparse_engine import BIASES, assert_same, small_model

pytestmark = pytest.mark.xdist_group("native-build")  # one worker builds, the other reuses the cache

CIFAR = [n for n in sact.list_models() if n.endswith("_cifar")]


@pytest.fixture
def threads():
    """Restores the thread count a test changes."""
    prev = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(prev)


def native_stages(model) -> list[NativeBasicStage]:
    stages = [NativeBasicStage(s) for s in model.stages]
    for s in stages:
        s.poison = True  # every call starts from NaN scratch: nothing uninitialised may be read
    return stages


@torch.no_grad()
def native_forward(model, stages, x) -> sact.ModelOutput:
    """Stem + native stages + head (the forward of the sparse model with these stages)."""
    x, flops = model.forward_stem(x)
    outs = []
    for s in stages:
        x, o = s(x)
        outs.append(o)
        flops = flops + o.flops
    logits = model.forward_head(x)
    if isinstance(logits, tuple):  # (logits, FLOPs); newer models: logits, FLOPs from head_flops()
        logits, head_flops = logits
    else:
        head_flops = model.head_flops()
    return sact.ModelOutput(logits=logits, ponder_cost=sum(o.ponder_cost for o in outs), flops=flops + head_flops,
                            stages=outs)


@torch.no_grad()
def pure_engine(model, x) -> sact.ModelOutput:
    prev = native.set_enabled(False)
    try:
        return to_sparse(model, poison=True)(x)
    finally:
        native.set_enabled(prev)


def varied(out: sact.ModelOutput) -> int:
    """Stages where some position (SACT) or image (ACT) stops before another."""
    return sum(int(s.num_units.unique().numel() > 1) for s in out.stages)


@pytest.mark.parametrize("name", CIFAR)
@pytest.mark.parametrize("mode", ["sact", "act"])
def test_native_equals_loop_and_pure_engine(built, threads, name, mode):
    seen = 0
    for bias in BIASES[mode]:
        model = small_model(name, mode, halting_bias=bias)
        stages = native_stages(model)
        pure = None
        for batch in (1, 3):
            x = torch.randn(batch, 3, 13, 15, dtype=torch.float64)  # odd sizes
            x = x * torch.tensor([0.2, 1.0, 4.0], dtype=x.dtype)[:batch].view(-1, 1, 1, 1)  # images halt apart
            threads(1)
            with torch.no_grad():
                dense = model(x)
            pure = pure_engine(model, x)
            for n in (1, 2):  # batch 1 with 2 threads: rows split across threads
                threads(n)
                got = native_forward(model, stages, x)
                assert_same(dense, got)
                assert_same(pure, got)
            seen += varied(dense)
        if seen:
            break
    assert seen, "halting was trivial: the test would not exercise the sparse paths"


@pytest.mark.parametrize("mode", ["sact", "act"])
@pytest.mark.parametrize("bias", [-30.0, 30.0])
def test_nothing_halts_and_everything_halts(built, threads, mode, bias):
    model = small_model("resnet32_cifar", mode, halting_bias=bias)
    x = torch.randn(3, 3, 17, 15, dtype=torch.float64)
    with torch.no_grad():
        dense = model(x)
    threads(2)
    got = native_forward(model, native_stages(model), x)
    assert_same(dense, got)
    expected = max(len(s) for s in model.stages) if bias < 0 else 1
    assert max(int(s.num_units.max()) for s in got.stages) == expected


@pytest.mark.parametrize(
    ("name", "kw", "size"),
    [
        ("resnet32_cifar", {"base_channels": 16}, 32),  # the reference's widths (16-lane vectors)
        ("resnet20_cifar", {"base_channels": 8, "in_chans": 1}, 33),  # the demo's layout
    ],
)
def test_float32_close_to_the_loop(built, threads, name, kw, size):
    torch.manual_seed(0)
    model = sact.create_model(name, mode="sact", num_classes=10, **kw).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
        for stage in model.stages:
            for branch in stage.halting:
                branch.local_conv.bias.fill_(-1.0)
    x = torch.randn(3, model.in_chans, size, size)
    with torch.no_grad():
        dense = model(x)
    threads(2)
    got = native_forward(model, native_stages(model), x)
    assert varied(dense) > 0
    for s, d in zip(got.stages, dense.stages):
        assert torch.equal(s.num_units, d.num_units)
        assert torch.equal(s.flops, d.flops)
        torch.testing.assert_close(s.halting_distribution, d.halting_distribution, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.logits, dense.logits, atol=1e-4, rtol=1e-4)


def test_scratch_is_reused_and_refresh_picks_up_new_weights(built, threads):
    model = small_model("resnet20_cifar", "sact", halting_bias=0.0)
    stage = model.layer2
    nat = NativeBasicStage(stage)
    threads(1)
    x = torch.randn(2, stage.units[0].in_channels, 15, 13, dtype=torch.float64)
    first = nat(x)
    ptrs = {k: v.data_ptr() for k, v in nat._scratch.items()}
    again = nat(x.contiguous(memory_format=torch.channels_last))  # same shape, another memory format
    assert {k: v.data_ptr() for k, v in nat._scratch.items()} == ptrs and len(ptrs) == 1
    torch.testing.assert_close(again[0], first[0], atol=1e-12, rtol=0)
    nat(x[:1, :, :9])
    assert len(nat._scratch) == 2  # a new shape gets its own buffers
    with torch.no_grad():
        for p in stage.units[1].parameters():
            p.mul_(1.5)
        stage.units[1].bn1.running_var.mul_(2.0)
        stage.halting[0].local_bn.running_mean.add_(0.5)
    nat.refresh()
    with torch.no_grad():
        ref_x, ref = stage(x)
    got_x, got = nat(x)
    torch.testing.assert_close(got_x, ref_x, atol=1e-9, rtol=1e-9)
    assert torch.equal(got.num_units, ref.num_units) and torch.equal(got.flops, ref.flops)


def test_profile_counts_the_phases(built, threads):
    model = small_model("resnet20_cifar", "sact", halting_bias=0.0)
    nat = NativeBasicStage(model.layer1)
    nat.profile = nat.new_profile()
    threads(1)
    nat(torch.randn(3, 4, 11, 11, dtype=torch.float64))
    assert nat.profile[-1, 0].item() == 3  # images
    assert (nat.profile[:-1, 2] > 0).all() and (nat.profile[:-1, 3] > 0).all()  # conv1, conv2 of every unit


def test_supports_only_the_cifar_stages():
    for mode in ("sact", "act"):
        model = small_model("resnet20_cifar", mode)
        assert all(NativeBasicStage.supports(s) for s in model.stages)
    assert not any(NativeBasicStage.supports(s) for s in small_model("resnet20_cifar", "vanilla").stages)
    assert not any(NativeBasicStage.supports(s) for s in small_model("resnet50", "sact").stages)
    model = small_model("resnet20_cifar", "sact")
    model.layer2.halting[1] = sact.halting.SACTHalting(model.layer2[0].out_channels, kernel_size=5).double()
    assert not NativeBasicStage.supports(model.layer2) and NativeBasicStage.supports(model.layer3)
    model.layer3.units[0].bn1 = nn.BatchNorm2d(model.layer3[0].in_channels, track_running_stats=False).double()
    assert not NativeBasicStage.supports(model.layer3)
    with pytest.raises(ValueError, match="does not support"):
        NativeBasicStage(model.layer2)
