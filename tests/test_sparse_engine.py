"""The sparse engine computes exactly what the dense model computes (outputs and FLOPs)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sact
from sact.sparse import to_sparse
from sact.sparse.halting_kernels import DenseHalting
from sact.sparse.rowset import Geometry
from sact.sparse.unit_kernels import DenseMaskedUnit
from sact.sparse.rows import dilate_rows, neighbour_table

torch.set_num_threads(1)


def small_model(name: str, mode: str, *, dtype=torch.float64, halting_bias: float = 0.0, seed: int = 0):
    """Tiny model with random BN statistics and affine parameters; halting biases set to ``halting_bias``."""
    torch.manual_seed(seed)
    kw = {"base_channels": 4} if name.endswith("_cifar") else {"base_width": 4}
    model = sact.create_model(name, mode=mode, num_classes=5, **kw)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.3)
        for stage in model.stages:
            for branch in stage.halting or []:
                conv = branch.local_conv if hasattr(branch, "local_conv") else branch.global_conv
                conv.bias.fill_(halting_bias)
                if not hasattr(branch, "local_conv"):  # ACT: spread the per-image probabilities
                    branch.global_conv.weight.mul_(8.0)
                if abs(halting_bias) >= 20:  # all-active / all-halted: no data dependence
                    conv.weight.zero_()
                    branch.global_conv.weight.zero_()
    return model.to(dtype).eval()


def assert_same(dense: sact.ModelOutput, sparse: sact.ModelOutput, *, atol=1e-9) -> None:
    torch.testing.assert_close(sparse.logits, dense.logits, atol=atol, rtol=atol)
    torch.testing.assert_close(sparse.ponder_cost, dense.ponder_cost, atol=atol, rtol=atol)
    assert torch.equal(sparse.flops, dense.flops)
    assert len(sparse.stages) == len(dense.stages)
    for s, d in zip(sparse.stages, dense.stages):
        assert torch.equal(s.num_units, d.num_units)
        assert torch.equal(s.flops, d.flops)
        torch.testing.assert_close(s.ponder_map, d.ponder_map, atol=atol, rtol=atol)
        torch.testing.assert_close(s.halting_distribution, d.halting_distribution, atol=atol, rtol=atol)


def run_both(model, x, **kw):
    with torch.no_grad():
        dense = model(x)
    sparse = to_sparse(model, poison=True, **kw)(x)
    return dense, sparse


# Halting biases tried in turn until the masks are non-trivial with these random weights
# (every one tried is also checked for equality).
BIASES = {"sact": (0.0, -1.0, 1.0, -2.0), "act": (-1.0, 0.0, -2.0, 1.0, -3.0, 2.0, -4.0, -6.0)}


@pytest.mark.parametrize("name", sact.list_models())
@pytest.mark.parametrize("mode", ["sact", "act"])
def test_sparse_equals_dense_every_model(name, mode):
    size = 13 if name.endswith("_cifar") else 37  # odd sizes
    varied = 0
    for bias in BIASES[mode]:
        model = small_model(name, mode, halting_bias=bias)
        for batch in (1, 3):
            x = torch.randn(batch, 3, size, size + 2, dtype=torch.float64)
            x = x * torch.tensor([0.2, 1.0, 4.0], dtype=x.dtype)[:batch].view(-1, 1, 1, 1)  # images halt apart
            dense, sparse = run_both(model, x)
            assert_same(dense, sparse)
            assert torch.isfinite(sparse.logits).all()
            # non-trivial: in some stage, some position stops early while another runs on
            varied += sum(int(s.num_units.unique().numel() > 1) for s in dense.stages)
        if varied:
            break
    assert varied > 0, "halting masks were trivial; the test would not exercise the sparse path"


@pytest.mark.parametrize("name", ["resnet20_cifar", "resnet50", "resnet50_v2"])
@pytest.mark.parametrize("mode", ["sact", "act"])
@pytest.mark.parametrize("bias", [-30.0, 30.0])
def test_all_active_and_all_halted(name, mode, bias):
    model = small_model(name, mode, halting_bias=bias)
    x = torch.randn(3, 3, 17, 15, dtype=torch.float64)
    dense, sparse = run_both(model, x)
    assert_same(dense, sparse)
    expected = max(len(s) for s in model.stages) if bias < 0 else 1
    assert max(int(s.num_units.max()) for s in sparse.stages) == expected


@pytest.mark.parametrize("name", ["resnet32_cifar", "resnet34", "resnet101", "resnet101_v2"])
def test_dense_fallback_and_sparse_path_agree(name, monkeypatch):
    from sact.sparse.executors import NativeStageExecutor

    # the row kernels' two paths: CIFAR stages would otherwise run whole in the native call,
    # which has no dense / sparse choice
    monkeypatch.setattr(NativeStageExecutor, "run_whole", lambda self, stage, x: None)
    model = small_model(name, "sact", halting_bias=0.0)
    x = torch.randn(2, 3, 19, 21, dtype=torch.float64)
    with torch.no_grad():
        dense = model(x)
    always_sparse = to_sparse(model, dense_above=1.0, poison=True)(x)
    always_dense = to_sparse(model, dense_above=-1.0, poison=True)(x)
    assert_same(dense, always_sparse)
    assert_same(dense, always_dense)
    assert_same(always_dense, always_sparse)


def test_float32_and_small_chunks():
    model = small_model("resnet50", "sact", dtype=torch.float32, halting_bias=0.0, seed=3)
    x = torch.randn(2, 3, 33, 29)
    dense, sparse = run_both(model, x, chunk_rows=7)
    assert_same(dense, sparse, atol=1e-4)


def test_bfloat16_runs_close_to_dense():
    model = small_model("resnet50", "sact", dtype=torch.bfloat16, halting_bias=-30.0)
    x = torch.randn(2, 3, 33, 33, dtype=torch.bfloat16)
    dense, sparse = run_both(model, x)
    assert sparse.logits.dtype == torch.bfloat16
    assert torch.equal(sparse.flops, dense.flops)
    scale = dense.logits.float().abs().max().item() + 1e-3
    assert (sparse.logits.float() - dense.logits.float()).abs().max().item() <= 0.1 * scale


class ScaledConvUnit(nn.Module):
    """A custom unit following the protocol (not known to the engine): ``x + mask * conv(x)``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.out_channels = channels
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, mask=None):
        r = self.conv(x)
        return x + (r if mask is None else r * mask)

    def flops(self, x, mask=None):
        b, _, h, w = x.shape
        n = torch.full((b,), h * w, device=x.device) if mask is None else (mask != 0).flatten(1).sum(1)
        return 2 * 9 * self.out_channels**2 * n


def test_custom_units_and_halting_fall_back_to_dense_masked():
    model = small_model("resnet20_cifar", "sact", halting_bias=0.0)
    stage = model.layer2
    c = stage.units[0].out_channels
    stage._modules["1"] = ScaledConvUnit(c).double()
    stage.halting[1] = sact.halting.SACTHalting(c, kernel_size=5).double().eval()  # unsupported kernel
    with torch.no_grad():
        stage.halting[1].local_conv.bias.fill_(0.0)
    sparse_model = to_sparse(model, poison=True)
    kernels = sparse_model.executors[1]
    assert isinstance(kernels.unit_kernels[0], DenseMaskedUnit)
    assert isinstance(kernels.halting_kernels[1], DenseHalting)
    x = torch.randn(3, 3, 15, 15, dtype=torch.float64)
    with torch.no_grad():
        dense = model(x)
    assert_same(dense, sparse_model(x))


def test_refresh_picks_up_new_weights_and_weights_are_shared():
    model = small_model("resnet20_cifar", "sact", halting_bias=0.0)
    sparse_model = to_sparse(model)
    x = torch.randn(2, 3, 11, 11, dtype=torch.float64)
    with torch.no_grad():
        for p in model.layer1.units[1].parameters():
            p.mul_(1.5)
        model.layer1.units[1].bn1.running_var.mul_(2.0)
    sparse_model.refresh()
    with torch.no_grad():
        dense = model(x)
    assert_same(dense, sparse_model(x))
    assert sparse_model.model is model
    sparse_model.train()
    assert not sparse_model.training and not model.training


def test_vanilla_model_passes_through():
    model = small_model("resnet50", "vanilla")
    x = torch.randn(1, 3, 35, 35, dtype=torch.float64)
    dense, sparse = run_both(model, x)
    assert_same(dense, sparse)


def test_neighbour_table_matches_unfold():
    b, h, w = 2, 4, 5
    n = b * h * w
    nbr = neighbour_table(b, h, w, "cpu")
    ids = torch.arange(n, dtype=torch.float64).view(b, 1, h, w) + 1  # 0 marks padding
    cols = F.unfold(ids, 3, padding=1).view(b, 9, h * w).permute(0, 2, 1).reshape(n, 9)
    expected = torch.where(cols == 0, torch.full_like(cols, n + 1), cols) - 1
    assert torch.equal(nbr, expected.long())


def test_dilation_matches_flops_convention():
    active = torch.rand(3 * 6 * 7) > 0.8
    expected = sact.flops.dilate_mask(active.view(3, 1, 6, 7).float()).flatten() > 0
    assert torch.equal(dilate_rows(active, 3, 6, 7), expected)


def test_poisoned_scratch_is_nan_except_pad_row():
    geo = Geometry(1, 2, 2, 3, neighbour_table(1, 2, 2, "cpu"), torch.zeros(4, dtype=torch.long), poison=True)
    buf = geo.scratch(5, 3, torch.zeros(1), pad_row=True)
    assert torch.isnan(buf[:4]).all() and torch.equal(buf[4], torch.zeros(3))


def test_invalid_arguments():
    model = small_model("resnet20_cifar", "sact")
    with pytest.raises(ValueError, match="0"):
        to_sparse(model, chunk_rows=0)
    with pytest.raises(ValueError, match="abc"):
        to_sparse(model, dense_above="abc")
    with pytest.raises(ValueError, match="Linear"):
        to_sparse(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"\(3, 8\)"):
        to_sparse(model)(torch.zeros(3, 8))


def test_a_registered_backend_wraps_the_stages_it_supports():
    """A new backend plugs in through the registry: no edit of the loop or of make_executor."""
    from sact.sparse import executors as E

    calls = []

    class Declining(nn.Module, E.Executor):
        def __init__(self, stage, fallback, *, poison=False):
            super().__init__()
            self.fallback = fallback

        def refresh(self):
            self.fallback.refresh()

        def run_whole(self, stage, x):
            calls.append(stage)
            return None  # not for this input: the loop runs with the fallback

        def start(self, stage, x):
            return self.fallback.start(stage, x)

    saved = E.backends()
    E.register_backend(E.StageBackend("test-declining", lambda s: s.mode == "sact", Declining), first=True)
    try:
        assert E.backends()[0].name == "test-declining"
        model = sact.create_model("resnet20_cifar", mode="sact", base_channels=4).eval()
        sparse = sact.to_sparse(model)
        assert all(isinstance(e, Declining) for e in sparse.stage_executors())
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            got, want = sparse(x), model(x)
        assert len(calls) == 3
        torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-5)
        assert torch.equal(got.flops, want.flops)
    finally:
        E._BACKENDS[:] = saved
    assert [b.name for b in E.backends()] == [b.name for b in saved]
