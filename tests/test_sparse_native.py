"""The native (C++/OpenMP) row kernels compute what the pure-PyTorch kernels compute."""

from __future__ import annotations

import shutil

import pytest
import torch

import sact
from sact.sparse import native, to_sparse
from sact.sparse.halting_kernels import SparseSACTHalting
from sact.sparse.rowset import Geometry, RowSet
from sact.sparse.unit_kernels import RowPreActBottleneck0, SparseBottleneck, SparsePreActBottleneck
from sact.sparse.rows import dilate_rows, image_index, neighbour_table

from test_sparse_engine import assert_same, small_model

pytestmark = pytest.mark.xdist_group("native-build")  # one worker builds, the other reuses the cache


def both_backends(model, x, **kw):
    """(dense, sparse with native kernels, sparse with pure-PyTorch kernels)."""
    with torch.no_grad():
        dense = model(x)
    out = []
    for flag in (True, False):
        prev = native.set_enabled(flag)
        try:
            out.append(to_sparse(model, poison=True, **kw)(x))
        finally:
            native.set_enabled(prev)
    return dense, out[0], out[1]


@pytest.mark.parametrize("name", ["resnet50", "resnet101", "resnet50_v2", "resnet101_v2"])
@pytest.mark.parametrize("threads", [1, 2])
def test_native_engine_equals_dense_and_pure(built, name, threads):
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        varied = 0
        for bias in (0.0, -1.0, 1.0):
            model = small_model(name, "sact", halting_bias=bias)
            for batch, chunk in ((1, 768), (3, 5)):  # chunk 5: many chunks, split across threads
                x = torch.randn(batch, 3, 37, 39, dtype=torch.float64)
                dense, nat, pure = both_backends(model, x, dense_above=1.0, chunk_rows=chunk)
                assert_same(dense, nat)
                assert_same(pure, nat)
                varied += sum(int(s.num_units.unique().numel() > 1) for s in dense.stages)
        assert varied > 0, "masks were trivial: the test exercised nothing sparse"
    finally:
        torch.set_num_threads(prev_threads)


def test_native_float32_matches_dense(built):
    model = small_model("resnet50", "sact", dtype=torch.float32, halting_bias=0.0, seed=3)
    x = torch.randn(2, 3, 45, 41)
    dense, nat, pure = both_backends(model, x, dense_above=1.0, chunk_rows=16)
    assert_same(dense, nat, atol=2e-4)
    assert_same(pure, nat, atol=2e-4)


def _rows(batch=2, h=9, w=11, c=12, fraction=0.4, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = batch * h * w
    X = torch.randn(n + 1, c, generator=g, dtype=torch.float64)
    X[-1] = 0
    geo = Geometry(batch, h, w, c, neighbour_table(batch, h, w, "cpu"), image_index(batch, h, w, "cpu"), chunk=8,
                   poison=True)
    idx = (torch.rand(n, generator=g) < fraction).nonzero().view(-1)
    return X, geo, idx


def test_native_dilation_equals_max_pool():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler")
    X, geo, idx = _rows()
    active = torch.zeros(geo.n, dtype=torch.bool)
    active[idx] = True
    ref = dilate_rows(active, geo.batch, geo.height, geo.width).nonzero().view(-1)
    assert native.available()
    assert torch.equal(native.dilate_rows(idx, geo.nbr), ref)


@pytest.mark.parametrize("act", ["identity", "leaky"])
def test_native_halting_kernel_equals_pure(built, act):
    X, geo, idx = _rows(c=16, seed=1)
    activation = torch.nn.LeakyReLU(0.1) if act == "leaky" else None
    branch = sact.halting.SACTHalting(16, activation=activation)
    with torch.no_grad():
        for p in branch.parameters():
            p.normal_()
        branch.local_bn.running_mean.normal_()
        branch.local_bn.running_var.uniform_(0.5, 2)
    branch = branch.double().eval()
    kernel = SparseSACTHalting(branch)
    S = X[: geo.n].view(geo.batch, -1, 16).sum(1)
    out = {}
    for flag in (True, False):
        geo.native = flag
        out[flag] = kernel.run(X, S, RowSet(idx, geo, False))
    torch.testing.assert_close(out[True], out[False], rtol=1e-12, atol=1e-12)


def test_native_rejects_bad_buffers(built):
    X, geo, idx = _rows(c=8)
    with pytest.raises(RuntimeError, match="contiguous"):
        native.dilate_rows(idx.to(torch.int32), geo.nbr)
    with pytest.raises(RuntimeError, match="one entry per image"):
        native.halting_rows(X, idx, idx, geo.nbr, torch.zeros(8, 9, dtype=X.dtype), torch.zeros(9, dtype=X.dtype),
                            torch.zeros(8), torch.zeros(8), 0.0, True, torch.zeros(5), geo.hw)


def test_v2_stages_use_row_kernels():
    """The reference's pre-activation bottleneck (released ImageNet layout) runs natively, not masked."""
    model = small_model("resnet50_v2", "sact", halting_bias=0.0)
    ex = sact.to_sparse(model).executors
    for e in ex:
        assert isinstance(e.unit0, RowPreActBottleneck0)
        assert all(isinstance(k, SparsePreActBottleneck) for k in e.unit_kernels)


@pytest.mark.parametrize("name,kernel_cls", [("resnet50", SparseBottleneck), ("resnet50_v2", SparsePreActBottleneck)])
def test_native_bottleneck_kernels_equal_pure_and_keep_sums(built, name, kernel_cls):
    unit = small_model(name, "sact", halting_bias=0.0).stages[1].units[1]
    c = unit.in_channels
    X, geo, idx = _rows(c=c, seed=2)
    geo.channels = c
    kernel = kernel_cls(unit, dense_above=1.0)
    results = {}
    for flag in (True, False):
        Xi = X.clone()
        S = Xi[: geo.n].view(geo.batch, -1, c).sum(1)
        geo.native = flag
        kernel.run_sparse(Xi, S, RowSet(idx, geo, False))
        results[flag] = (Xi, S)
    Xn, Sn = results[True]
    Xp, Sp = results[False]
    torch.testing.assert_close(Xn, Xp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(Sn, Xn[: geo.n].view(geo.batch, -1, c).sum(1), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(Sp, Xp[: geo.n].view(geo.batch, -1, c).sum(1), rtol=1e-10, atol=1e-10)
    untouched = torch.ones(geo.n + 1, dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(Xn[untouched], X[untouched])  # only active rows change
    assert not torch.equal(Xn[idx], X[idx])  # and they do change


@pytest.mark.parametrize("name", ["resnet50", "resnet50_v2"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_halting_step_equals_the_generic_loop(built, name, dtype):
    """The row executor's native step (recurrence + accumulation + next index set) is an
    accelerated copy of the stage loop's generic path: same unit counts, maps and outputs."""
    varied = 0
    for bias in (0.0, -1.0, 1.0):
        model = small_model(name, "sact", dtype=dtype, halting_bias=bias)
        x = torch.randn(3, 3, 37, 35, dtype=dtype)
        fused = to_sparse(model, poison=True)
        generic = to_sparse(model, poison=True)
        for e in generic.executors:
            e.fused_step = False
        with torch.no_grad():
            a, b = fused(x), generic(x)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        assert_same(b, a, atol=tol)
        for s, t in zip(a.stages, b.stages):
            assert torch.equal(s.num_units, t.num_units)
            assert torch.equal(s.ponder_map, t.ponder_map)
            assert torch.equal(s.halting_distribution, t.halting_distribution)
        varied += sum(int(s.num_units.unique().numel() > 1) for s in a.stages)
    assert varied > 0
