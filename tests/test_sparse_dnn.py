"""The packed oneDNN paths (sact.sparse.dnn) compute what the plain torch ops and the dense model compute."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sact
from sact.sparse import dnn, native, to_sparse
from sact.sparse.unit_kernels import RowBottleneck0, RowPreActBottleneck0, _BottleneckRows

from test_sparse_engine import assert_same, small_model

torch.set_num_threads(1)
needs_dnn = pytest.mark.skipif(not dnn.available(), reason="torch without oneDNN's fused convolution ops")


def assert_same_as_dense_and_plain_ops(sparse, x, dense, fast) -> None:
    """``fast`` (the engine's output with the packed paths) equals the dense model's and the plain ops' output."""
    old = dnn.set_enabled(False)
    try:
        plain = sparse(x)
    finally:
        dnn.set_enabled(old)
    scale = float(dense.logits.abs().max())
    assert_same(dense, fast, atol=1e-5 * scale)
    assert_same(plain, fast, atol=1e-5 * scale)


@needs_dnn
@pytest.mark.parametrize("stride,padding,k", [(1, 0, 1), (2, 0, 1), (1, 1, 3), (2, 1, 3)])
def test_packed_conv_equals_conv2d(stride, padding, k):
    torch.manual_seed(0)
    w, b = torch.randn(12, 8, k, k), torch.randn(12)
    conv = dnn.PackedConv(w, b, stride=stride, padding=padding)
    for shape in [(1, 8, 9, 7), (3, 8, 6, 11), (2, 8, 5, 5), (1, 8, 4, 4), (2, 8, 7, 3), (1, 8, 9, 7)]:
        x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
        ref = F.conv2d(x, w, b, stride=stride, padding=padding)
        torch.testing.assert_close(conv(x), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(conv(x, relu=True), ref.relu(), rtol=1e-5, atol=1e-5)
        for relu in (False, True):
            # in place into a row buffer's view, as the units' last convolution does
            rows = torch.randn(ref.shape[0] * ref.shape[2] * ref.shape[3] + 1, 12)
            before = rows.clone()
            out = rows[:-1].view(ref.shape[0], ref.shape[2], ref.shape[3], 12).permute(0, 3, 1, 2)
            expect = out + ref
            res = conv.add_(out, x, relu=relu)
            assert res.data_ptr() == rows.data_ptr()
            torch.testing.assert_close(out, expect.relu() if relu else expect, rtol=1e-5, atol=1e-5)
            assert torch.equal(rows[-1], before[-1])  # the pad row is untouched
    assert len(conv._packs) == dnn.PackedConv.MAX_SHAPES  # five shapes seen, the last four kept


def test_packed_conv_falls_back_to_conv2d_where_it_does_not_apply():
    torch.manual_seed(1)
    w, b = torch.randn(6, 4, 3, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    conv = dnn.PackedConv(w, b, padding=1)
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    assert not dnn.usable(x)
    assert torch.equal(conv(x, relu=True), F.conv2d(x, w, b, padding=1).relu())
    out = torch.randn(2, 6, 5, 6, dtype=torch.float64)
    expect = out + F.conv2d(x, w, b, padding=1)
    assert torch.equal(conv.add_(out, x), expect)
    assert not conv._packs
    assert dnn.packed_linear_weight(w.flatten(1)) is not None and not dnn.packed_linear_weight(w.flatten(1)).is_mkldnn


@needs_dnn
def test_packed_linear_weight_gives_the_same_products():
    torch.manual_seed(2)
    wt, b = torch.randn(24, 40), torch.randn(24)
    packed = dnn.packed_linear_weight(wt)
    assert packed.is_mkldnn
    for m in (1, 7, 32, 100):
        x = torch.randn(m, 40)
        y = torch.ops.mkldnn._linear_pointwise(x, packed, b, "relu", [], "")
        torch.testing.assert_close(y, torch.addmm(b, x, wt.t()).relu(), rtol=1e-5, atol=1e-5)


@needs_dnn
@pytest.mark.parametrize("name", ["resnet50", "resnet50_v2"])
@pytest.mark.parametrize("bias", [-30.0, 0.0, 1.0])
def test_engine_with_packed_weights_equals_dense_and_plain_ops(name, bias, monkeypatch):
    """float32 (where the packed paths run): logits to 1e-5 of the largest, FLOPs and halting maps equal,
    with and without the packed paths; unit 0, the all-active dense path and the native sparse kernel's
    packed products all ran."""
    model = small_model(name, "sact", dtype=torch.float32, halting_bias=bias, seed=4)
    x = torch.randn(2, 3, 35, 31)
    seen = {"packed": 0}
    real = native.bottleneck_rows

    def spy(*args, wt=None, **kw):
        seen["packed"] += int(wt is not None and wt[0].is_mkldnn)
        return real(*args, wt=wt, **kw)

    monkeypatch.setattr(native, "bottleneck_rows", spy)
    with torch.no_grad():
        dense = model(x)
    sparse = to_sparse(model, poison=True)
    fast = sparse(x)
    assert_same_as_dense_and_plain_ops(sparse, x, dense, fast)
    kernels = [k for e in sparse.stage_executors() for k in [e.unit0, *e.unit_kernels]]
    assert any(isinstance(k, (RowBottleneck0, RowPreActBottleneck0)) and k.dn1._packs for k in kernels)
    if bias == -30.0:  # nothing halts: every later unit runs the dense path
        assert all(k.dn3._packs for k in kernels if isinstance(k, _BottleneckRows))
    elif native.use_for(x):
        assert seen["packed"] > 0


@needs_dnn
@pytest.mark.parametrize("name", ["resnet50", "resnet50_v2"])
def test_dense_path_with_halted_rows_on_packed_weights(name, monkeypatch):
    """dense_above=-1: every unit takes the dense path, also with halted rows (conv3's result added at the
    active rows only): equal to the dense model and to the plain ops."""
    model = small_model(name, "sact", dtype=torch.float32, halting_bias=0.0, seed=7)
    x = torch.randn(2, 3, 33, 37)
    with torch.no_grad():
        dense = model(x)
    sparse = to_sparse(model, dense_above=-1.0, poison=True)
    partial = []
    real = dnn.PackedConv.__call__

    def spy(self, t, *, relu=False):
        partial.extend(k for e in sparse.stage_executors() for k in e.unit_kernels if getattr(k, "dn3", None) is self)
        return real(self, t, relu=relu)

    monkeypatch.setattr(dnn.PackedConv, "__call__", spy)
    fast = sparse(x)
    assert any(s.num_units.min() < s.num_units.max() for s in fast.stages)  # some rows halted
    assert partial  # conv3 ran out of place: the dense path with halted rows, on packed weights
    assert_same_as_dense_and_plain_ops(sparse, x, dense, fast)


@needs_dnn
def test_refresh_repacks_the_weights():
    model = small_model("resnet50", "sact", dtype=torch.float32, halting_bias=-30.0, seed=5)
    x = torch.randn(1, 3, 33, 33)
    sparse = to_sparse(model)
    sparse(x)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.9)
    sparse.refresh()
    with torch.no_grad():
        dense = model(x)
    assert_same(dense, sparse(x), atol=1e-5 * float(dense.logits.abs().max()))


def test_folded_stem_equals_the_models_stem():
    from sact.sparse.unit_kernels import ResNetStem

    model = small_model("resnet50", "sact", dtype=torch.float32, seed=6)
    assert ResNetStem.supports(model)
    assert not ResNetStem.supports(small_model("resnet50_v2", "sact"))  # TF-style stem: the model's own
    assert not ResNetStem.supports(small_model("resnet20_cifar", "sact"))
    stem = ResNetStem(model)
    for x in (torch.randn(2, 3, 35, 31), torch.randn(1, 3, 32, 32).contiguous(memory_format=torch.channels_last)):
        with torch.no_grad():
            ref, ref_flops = model.forward_stem(x)
            y, flops = stem(x)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
        assert torch.equal(flops, ref_flops)
    if dnn.available():
        assert stem.conv._packs  # the packed path ran
    with pytest.raises(ValueError, match="input channels"):
        stem(torch.randn(1, 4, 16, 16))  # the model's own check
    sparse = to_sparse(model)
    assert sparse.stem is not None and to_sparse(small_model("resnet50_v2", "sact")).stem is None
