"""Row kernels of residual units: a unit evaluated at a set of rows of the stage's buffer.

Every kernel works on the stage's row buffer ``X`` ``(N + 1, C)`` (see
:mod:`sact.sparse.rows`) in place: it updates ``X`` at the active rows only and keeps the
per-image channel sums ``S`` ``[B, C]`` (for the halting branches' global term) up to date.
FLOPs are not counted here: the stage loop counts them with the units' own formulas.

Known units (:class:`~sact.units.Bottleneck`, :class:`~sact.units.PreActBasicUnit`,
torchvision's :class:`~sact.models.resnet.BasicBlock`) get a gather-GEMM-scatter path with
batch norm folded into the convolutions, and a dense path
on a zero-copy channels-last view of ``X`` used when the active fraction is above
``dense_above`` (the break-even point). Any other unit runs as ``unit(x, mask)``
(:class:`DenseMaskedUnit`). The reference's pre-activation bottleneck
(:class:`~sact.models.resnet_v2.PreActBottleneck`, the released ImageNet models) gets
:class:`SparsePreActBottleneck`. :class:`RowBottleneck0` / :class:`RowPreActBottleneck0`
run unit 0 of a bottleneck stage (every position, strided) straight into a fresh row buffer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..flops import conv_flops
from ..models.resnet import BasicBlock, ResNet
from ..models.resnet_v2 import PreActBottleneck
from ..units import Bottleneck, PreActBasicUnit
from . import dnn, native
from .dnn import PackedConv, packed_linear_weight
from .refs import keep_ref
from .fold import bn_scale_shift, conv_as_matrix, fold_conv_bn, foldable_bn
from .gemm import linear, linear_add, use_onednn
from .rows import rows_view
from .rowset import RowSet, chunks, refresh_sums

__all__ = [
    "SparseBottleneck",
    "SparsePreActBasic",
    "SparseBasicBlock",
    "SparsePreActBottleneck",
    "DenseMaskedUnit",
    "RowBottleneck0",
    "RowPreActBottleneck0",
    "make_unit_kernel",
    "DEFAULT_DENSE_ABOVE",
    "ResNetStem",
]

#: Active fraction above which a unit runs densely on the buffer view: the measured
#: break-even points (``sact bench --break-even``, docs/sparse.md). ``@small``: maps of at
#: most ``SMALL_MAP`` positions per image (e.g. 14x14), where the dense convolution is less
#: efficient.
DEFAULT_DENSE_ABOVE = {
    # native kernels with oneDNN products: sparse wins up to 0.97-1.0 (0.71-0.97 on 7x7 maps;
    # benchmarks/results/break_even_2threads.md, 2 threads, wall clock)
    "SparseBottleneck": 0.9,
    "SparseBottleneck@small": 0.9,
    "SparsePreActBottleneck": 0.9,
    "SparsePreActBottleneck@small": 0.9,
    "SparsePreActBasic": 0.25,
    # break-even 0.28-0.31 at 64x56x56, batch 1 and 8 (the same file)
    "SparseBasicBlock": 0.3,
}
SMALL_MAP = 256
#: The native kernels split a row set across threads (one chunk each, single-threaded
#: GEMMs) when it has at least this many rows per thread; smaller sets run as one chunk
#: with multi-threaded GEMMs.
NATIVE_MIN_ROWS = 64


class _UnitKernel(nn.Module):
    """Base: ``run(X, S, rows)`` chooses the sparse or the dense path (nothing to do for no rows)."""

    dense_above: float = 1.0
    dense_above_small: float = 1.0

    def run(self, X: Tensor, S: Tensor, rows: RowSet) -> None:
        if rows.idx.numel() == 0:
            return
        thr = self.dense_above_small if rows.geo.hw <= SMALL_MAP else self.dense_above
        if rows.all_active or rows.fraction > thr:
            self.run_dense(X, S, rows)
        else:
            self.run_sparse(X, S, rows)


def _conv2_3x3(conv: nn.Conv2d, stride: int = 1) -> bool:
    return (conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.stride == (stride, stride))


class _BottleneckRows(_UnitKernel):
    """A stride-1 bottleneck with an identity shortcut on rows, BN folded.

    ``y = act(x + conv3(relu(conv2(relu(conv1(pre(x)))))))`` where ``pre`` is the identity
    (post-activation, torchvision) or ``relu(bn0(x))`` (pre-activation, ResNet-v2; the
    buffers ``s0`` / ``t0``), ``act`` a ReLU (``final_relu``) or the identity, and every
    convolution has its BN folded in. Sparse path: ``conv1`` on the dilated rows (one
    ``addmm``, written into a scratch buffer with a zero pad row), then per chunk of active
    rows: gather the 3x3 neighbour rows -> ``addmm`` (conv2) -> ``addmm`` (conv3) ->
    residual (+ ReLU) -> write back. Subclasses fold their unit in :meth:`refresh`.
    """

    final_relu: bool = True

    def __init__(self, unit: nn.Module, *, dense_above: float) -> None:
        super().__init__()
        keep_ref(self, "unit", unit)
        self.dense_above = dense_above
        for name in ("s0", "t0", "m1", "b1", "w2", "b2", "m2", "m3", "b3", "wt1", "wt2", "wt3"):
            self.register_buffer(name, torch.empty(0), persistent=False)
        self.refresh()

    def _set(self, pre: tuple[Tensor, Tensor] | None, c1, c2, c3, dt: torch.dtype) -> None:
        """Store the folded ``(weight, bias)`` of the three convolutions and the optional pre-activation BN."""
        if pre is not None:
            self.s0, self.t0 = pre[0].to(dt), pre[1].to(dt)
        self.m1, self.b1 = conv_as_matrix(c1[0]).to(dt), c1[1].to(dt)
        self.w2, self.b2 = c2[0].to(dt).contiguous(memory_format=torch.channels_last), c2[1].to(dt)
        self.m2 = conv_as_matrix(c2[0]).to(dt)
        self.m3, self.b3 = conv_as_matrix(c3[0]).to(dt), c3[1].to(dt)
        self.wt1, self.wt3 = self.m1.t().contiguous(), self.m3.t().contiguous()  # (out, in) for oneDNN
        self.wt2 = self.m2.t().contiguous()
        # the same weights packed for oneDNN: the dense path's convolutions (on the buffers above), the sparse
        # path's products
        self.dn1 = PackedConv(_as_1x1(self.wt1), self.b1)
        self.dn2 = PackedConv(self.w2, self.b2, padding=1)
        self.dn3 = PackedConv(_as_1x1(self.wt3), self.b3)
        self.packed = tuple(packed_linear_weight(w) for w in (self.wt1, self.wt2, self.wt3))

    def _conv1_input(self, x: Tensor) -> Tensor:
        if self.s0.numel() == 0:
            return x
        return x.mul(self.s0).add_(self.t0).relu_()  # x*s then +t, then ReLU: the native kernel's order

    def run_dense(self, X: Tensor, S: Tensor, rows: RowSet) -> None:
        # 1x1 convolutions as GEMMs on the rows, the 3x3 one on a channels-last view (no layout copies).
        g = rows.geo
        width = self.m1.shape[1]
        xr = X[: g.n]
        if dnn.usable(X):
            # oneDNN with packed weights, bias and ReLU fused; with every row active conv3 adds into the
            # buffer in place, else its result is added at the active rows only
            v = rows_view(X, g.batch, g.height, g.width)
            p = v if self.s0.numel() == 0 else rows_view(self._conv1_input(xr), g.batch, g.height, g.width)
            t = self.dn2(self.dn1(p, relu=True), relu=True)
            if rows.all_active:
                self.dn3.add_(v, t, relu=self.final_relu)
            else:
                y = self.dn3(t).permute(0, 2, 3, 1).reshape(g.n, -1)  # channels-last: a view of its rows
                xr.addcmul_(y, rows.active.to(y.dtype).unsqueeze(1))
                if self.final_relu:
                    xr.relu_()  # halted rows are >= 0 already: ReLU keeps them
            refresh_sums(X, S, g)
            return
        t = linear(self._conv1_input(xr), self.wt1, self.b1, relu=True)  # (N, width)
        t = F.conv2d(t.view(g.batch, g.height, g.width, width).permute(0, 3, 1, 2), self.w2, self.b2, padding=1)
        t = t.relu_().permute(0, 2, 3, 1).reshape(g.n, width)
        if rows.all_active:
            y = linear_add(t, xr, self.wt3, self.b3)  # conv3 + bias + residual in one product
            xr.copy_(y.relu_() if self.final_relu else y)
        else:
            xr.addcmul_(linear(t, self.wt3, self.b3), rows.active.to(t.dtype).unsqueeze(1))
            if self.final_relu:
                xr.relu_()  # halted rows are >= 0 already: ReLU keeps them
        refresh_sums(X, S, g)

    def _products(self, X: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
        """The ``(out, in)`` weights the native kernel multiplies with through oneDNN (packed where
        :mod:`~sact.sparse.dnn` applies), or ``None`` for ``at::mm`` with the ``m`` matrices."""
        if not use_onednn(X):
            return None
        return self.packed if dnn.usable(X) else (self.wt1, self.wt2, self.wt3)

    def run_sparse(self, X: Tensor, S: Tensor, rows: RowSet) -> None:
        g = rows.geo
        width = self.m1.shape[1]
        dil = rows.dilated
        t1 = g.scratch(g.n + 1, width, X, pad_row=True)  # conv1 output rows; pad row = conv2's zero padding
        if g.native:
            native.bottleneck_rows(X, S, t1, rows.idx, dil, g.nbr, self.m1, self.b1, self.m2, self.b2, self.m3,
                                   self.b3, g.hw, g.chunk, NATIVE_MIN_ROWS,
                                   pre_scale=self.s0 if self.s0.numel() else None,
                                   pre_shift=self.t0 if self.t0.numel() else None, final_relu=self.final_relu,
                                   wt=self._products(X))
            return
        t1.index_copy_(0, dil, linear(self._conv1_input(X.index_select(0, dil)), self.wt1, self.b1, relu=True))
        idx, nbr = rows.idx, rows.nbr
        resum = rows.fraction > 0.5  # one pass over X is cheaper than per-chunk deltas then
        for s, e in chunks(idx.numel(), g.chunk):
            ic = idx[s:e]
            gathered = t1.index_select(0, nbr[s:e].reshape(-1)).view(e - s, 9 * width)  # restricted im2col
            r = torch.addmm(self.b2, gathered, self.m2).relu_()
            r = torch.addmm(self.b3, r, self.m3)
            old = X.index_select(0, ic)
            r.add_(old)  # new rows
            if self.final_relu:
                r.relu_()
            if not resum:
                img = g.img.index_select(0, ic)
                S.index_add_(0, img, r.to(S.dtype))
                S.index_add_(0, img, old.to(S.dtype), alpha=-1)
            X.index_copy_(0, ic, r)
        if resum:
            refresh_sums(X, S, g)


class SparseBottleneck(_BottleneckRows):
    """:class:`~sact.units.Bottleneck` (torchvision; stride 1, identity shortcut) on rows."""

    final_relu = True

    @staticmethod
    def supports(unit: nn.Module) -> bool:
        return (
            isinstance(unit, Bottleneck)
            and unit.stride == 1
            and unit.downsample is None
            and all(foldable_bn(b) for b in (unit.bn1, unit.bn2, unit.bn3))
            and _conv2_3x3(unit.conv2)
        )

    @torch.no_grad()
    def refresh(self) -> None:
        """Re-fold the unit's current weights (call after changing them)."""
        u = self.unit
        self._set(None, fold_conv_bn(u.conv1, u.bn1), fold_conv_bn(u.conv2, u.bn2), fold_conv_bn(u.conv3, u.bn3),
                  u.conv1.weight.dtype)


class SparsePreActBottleneck(_BottleneckRows):
    """The reference's pre-activation bottleneck (ResNet-v2; stride 1, identity shortcut) on rows:
    ``y = x + conv3(...(conv1(relu(bn0(x)))))``, no ReLU after the sum."""

    final_relu = False

    @staticmethod
    def supports(unit: nn.Module) -> bool:
        return (
            isinstance(unit, PreActBottleneck)
            and unit.stride == 1
            and unit.shortcut is None
            and all(foldable_bn(b) for b in (unit.preact, unit.conv1_bn, unit.conv2_bn))
            and unit.conv1.kernel_size == unit.conv3.kernel_size == (1, 1)
            and unit.conv1.groups == unit.conv3.groups == 1
            and _conv2_3x3(unit.conv2)
        )

    @torch.no_grad()
    def refresh(self) -> None:
        """Re-fold the unit's current weights."""
        u = self.unit
        self._set(bn_scale_shift(u.preact), fold_conv_bn(u.conv1, u.conv1_bn), fold_conv_bn(u.conv2, u.conv2_bn),
                  fold_conv_bn(u.conv3, None), u.conv1.weight.dtype)


def _act_(t: Tensor, slope: float) -> Tensor:
    """In-place ReLU (``slope == 0``) or leaky ReLU."""
    return t.relu_() if slope == 0.0 else F.leaky_relu_(t, slope)


class _BasicRows(_UnitKernel):
    """A stride-1 basic block with an identity shortcut on rows, BN folded.

    ``y = act_out(x + conv2(act_mid(conv1(pre(x)))))`` with two 3x3 convolutions, where
    ``pre`` is the identity or a pre-activation ``act_pre(bn(x))`` (the buffers ``s0`` /
    ``t0``; zero padding comes after it, as in the dense unit), ``act_mid`` / ``act_pre``
    ReLU or leaky ReLU (``slope_mid`` / ``slope_pre``), ``act_out`` a ReLU
    (``final_relu``) or the identity, and every BN after a convolution folded into it.
    Sparse path: ``conv1`` on the dilated rows (gathered 3x3 neighbour rows -> one ``addmm``
    per chunk, into a scratch buffer with a zero pad row), then per chunk of active rows:
    gather -> ``addmm`` (``conv2``) -> residual (+ ReLU) -> write back. Dense path: the two
    convolutions on the buffer's channels-last view. Subclasses fold their unit in
    :meth:`refresh` (:meth:`_set`).
    """

    final_relu: bool = False

    def __init__(self, unit: nn.Module, *, dense_above: float) -> None:
        super().__init__()
        keep_ref(self, "unit", unit)
        self.dense_above = dense_above
        self.slope_pre = 0.0
        self.slope_mid = 0.0
        for name in ("s0", "t0", "w1", "b1", "w2", "b2", "m1", "m2"):
            self.register_buffer(name, torch.empty(0), persistent=False)
        self.refresh()

    def _set(self, pre: tuple[Tensor, Tensor] | None, c1: tuple[Tensor, Tensor], c2: tuple[Tensor, Tensor],
             dt: torch.dtype) -> None:
        """Store the folded ``(weight, bias)`` of both convolutions and the optional pre-activation BN."""
        if pre is not None:
            self.s0, self.t0 = pre[0].to(dt), pre[1].to(dt)
        self.w1, self.b1 = c1[0].to(dt), c1[1].to(dt)
        self.w2, self.b2 = c2[0].to(dt), c2[1].to(dt)
        self.m1, self.m2 = conv_as_matrix(c1[0]).to(dt), conv_as_matrix(c2[0]).to(dt)

    def run_dense(self, X: Tensor, S: Tensor, rows: RowSet) -> None:
        g = rows.geo
        v = rows_view(X, g.batch, g.height, g.width)
        p = v
        if self.s0.numel():
            p = _act_(v * self.s0.view(1, -1, 1, 1) + self.t0.view(1, -1, 1, 1), self.slope_pre)
        r = _act_(F.conv2d(p, self.w1, self.b1, padding=1), self.slope_mid)
        r = F.conv2d(r, self.w2, self.b2, padding=1)
        if not rows.all_active:
            r.mul_(rows.mask(r.dtype))
        v.add_(r)
        if self.final_relu:
            v.relu_()  # halted positions are >= 0 already: ReLU keeps them
        refresh_sums(X, S, g)

    def run_sparse(self, X: Tensor, S: Tensor, rows: RowSet) -> None:
        g = rows.geo
        c = g.channels
        pad = g.n
        dil = rows.dilated
        t1 = g.scratch(g.n + 1, self.m1.shape[1], X, pad_row=True)
        for s, e in chunks(dil.numel(), g.chunk):
            nb = g.nbr.index_select(0, dil[s:e])  # (m, 9)
            p = X.index_select(0, nb.view(-1)).view(e - s, 9, c)  # restricted im2col (pad row: zeros)
            if self.s0.numel():
                _act_(p.mul_(self.s0).add_(self.t0), self.slope_pre)
                p.masked_fill_((nb == pad).unsqueeze(-1), 0.0)  # zero padding after BN + activation
            t1.index_copy_(0, dil[s:e], _act_(torch.addmm(self.b1, p.view(e - s, 9 * c), self.m1), self.slope_mid))
        idx, nbr = rows.idx, rows.nbr
        for s, e in chunks(idx.numel(), g.chunk):
            ic = idx[s:e]
            r = torch.addmm(self.b2, t1.index_select(0, nbr[s:e].reshape(-1)).view(e - s, -1), self.m2)
            img = g.img.index_select(0, ic)
            old = X.index_select(0, ic)
            if self.final_relu:
                new = r.add_(old).relu_()
                S.index_add_(0, img, (new - old).to(S.dtype))
            else:
                S.index_add_(0, img, r.to(S.dtype))
                new = old.add_(r)
            X.index_copy_(0, ic, new)


def _conv3x3(conv: nn.Conv2d) -> bool:
    return (conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1)


class SparsePreActBasic(_BasicRows):
    """:class:`~sact.units.PreActBasicUnit` (the reference's CIFAR unit; stride 1, same channels) on rows:
    ``y = x + conv2(lrelu2(bn2(conv1(lrelu(bn1(x))))))``, ``bn2`` folded into ``conv1``, no ReLU after the sum."""

    final_relu = False

    @staticmethod
    def supports(unit: nn.Module) -> bool:
        return (
            isinstance(unit, PreActBasicUnit)
            and unit.stride == 1
            and unit.in_channels == unit.out_channels
            and not unit.activate_before_residual
            and foldable_bn(unit.bn1)
            and foldable_bn(unit.bn2)
            and isinstance(unit.act1, nn.LeakyReLU)
            and isinstance(unit.act2, nn.LeakyReLU)
            and unit.conv1.kernel_size == (3, 3)  # Conv2dSame: padding 1 at stride 1
            and unit.conv1.groups == 1
            and unit.conv1.dilation == (1, 1)
            and _conv3x3(unit.conv2)
        )

    @torch.no_grad()
    def refresh(self) -> None:
        """Re-fold the unit's current weights."""
        u = self.unit
        self.slope_pre = float(u.act1.negative_slope)
        self.slope_mid = float(u.act2.negative_slope)
        self._set(bn_scale_shift(u.bn1), fold_conv_bn(u.conv1, u.bn2), fold_conv_bn(u.conv2, None), u.conv1.weight.dtype)


class SparseBasicBlock(_BasicRows):
    """torchvision's :class:`~sact.models.resnet.BasicBlock` (ResNet-18/34; stride 1, identity shortcut) on rows:
    ``y = relu(x + bn2(conv2(relu(bn1(conv1(x))))))``, both BNs folded."""

    final_relu = True

    @staticmethod
    def supports(unit: nn.Module) -> bool:
        return (
            isinstance(unit, BasicBlock)
            and unit.stride == 1
            and unit.downsample is None
            and foldable_bn(unit.bn1)
            and foldable_bn(unit.bn2)
            and _conv3x3(unit.conv1)
            and _conv3x3(unit.conv2)
        )

    @torch.no_grad()
    def refresh(self) -> None:
        """Re-fold the unit's current weights."""
        u = self.unit
        self._set(None, fold_conv_bn(u.conv1, u.bn1), fold_conv_bn(u.conv2, u.bn2), u.conv1.weight.dtype)


class DenseMaskedUnit(_UnitKernel):
    """Any unit of the protocol: ``unit(x, mask)`` on the buffer's view, copied back."""

    def __init__(self, unit: nn.Module) -> None:
        super().__init__()
        keep_ref(self, "unit", unit)

    def refresh(self) -> None:
        """Nothing is folded."""

    def run(self, X: Tensor, S: Tensor, rows: RowSet) -> None:
        if rows.idx.numel() == 0:
            return
        g = rows.geo
        v = rows_view(X, g.batch, g.height, g.width)
        v.copy_(self.unit(v, None if rows.all_active else rows.mask(X.dtype)))
        refresh_sums(X, S, g)


def make_unit_kernel(unit: nn.Module, *, dense_above: float | dict | None = None) -> nn.Module:
    """The fastest kernel that computes ``unit`` exactly (falls back to :class:`DenseMaskedUnit`)."""
    for cls in (SparseBottleneck, SparsePreActBottleneck, SparsePreActBasic, SparseBasicBlock):
        if cls.supports(unit):
            name = cls.__name__
            table = dict(DEFAULT_DENSE_ABOVE)
            if isinstance(dense_above, dict):
                table.update(dense_above)
            elif dense_above is not None:
                table = {name: float(dense_above), name + "@small": float(dense_above)}
            kernel = cls(unit, dense_above=table[name])
            kernel.dense_above_small = table.get(name + "@small", table[name])
            return kernel
    return DenseMaskedUnit(unit)


class RowBottleneck0(nn.Module):
    """Unit 0 of a bottleneck stage (strided, projection shortcut) written straight into a row buffer.

    Dense at every position, BN folded: the 1x1 convolutions are GEMMs on channels-last
    rows, the (strided) 3x3 one a convolution on a channels-last view; the result lands in
    a fresh ``(N + 1, C)`` buffer with a zero pad row, so no layout copy is needed.
    """

    def __init__(self, unit: Bottleneck) -> None:
        super().__init__()
        keep_ref(self, "unit", unit)
        self.stride = unit.stride
        for name in ("w2", "b2", "wt1", "b1", "wt3", "b3", "wtd", "bd"):
            self.register_buffer(name, torch.empty(0), persistent=False)
        self.refresh()

    @staticmethod
    def supports(unit: nn.Module) -> bool:
        if not isinstance(unit, Bottleneck):
            return False
        ds = unit.downsample
        ds_ok = ds is None or (
            isinstance(ds, nn.Sequential)
            and len(ds) == 2
            and isinstance(ds[0], nn.Conv2d)
            and ds[0].kernel_size == (1, 1)
            and ds[0].padding == (0, 0)
            and ds[0].groups == 1
            and foldable_bn(ds[1])
        )
        c1, c2, c3 = unit.conv1, unit.conv2, unit.conv3
        return (
            ds_ok
            and all(foldable_bn(b) for b in (unit.bn1, unit.bn2, unit.bn3))
            and c1.kernel_size == c3.kernel_size == (1, 1)
            and c1.stride == c3.stride == (1, 1)
            and c1.groups == c3.groups == 1
            and c2.kernel_size == (3, 3)
            and c2.padding == (1, 1)
            and c2.dilation == (1, 1)
            and c2.groups == 1
        )

    @torch.no_grad()
    def refresh(self) -> None:
        """Re-fold the unit's current weights."""
        u = self.unit
        dt = u.conv1.weight.dtype
        w1, b1 = fold_conv_bn(u.conv1, u.bn1)
        w2, b2 = fold_conv_bn(u.conv2, u.bn2)
        w3, b3 = fold_conv_bn(u.conv3, u.bn3)
        self.wt1, self.b1 = w1.to(dt).flatten(1).contiguous(), b1.to(dt)  # (out, in) 1x1 weights
        self.w2, self.b2 = w2.to(dt).contiguous(memory_format=torch.channels_last), b2.to(dt)
        self.wt3, self.b3 = w3.to(dt).flatten(1).contiguous(), b3.to(dt)
        self.dn1 = PackedConv(_as_1x1(self.wt1), self.b1)
        self.dn2 = PackedConv(self.w2, self.b2, stride=self.stride, padding=1)
        self.dn3 = PackedConv(_as_1x1(self.wt3), self.b3)
        self.dnd = None
        if u.downsample is not None:
            wd, bd = fold_conv_bn(u.downsample[0], u.downsample[1])
            self.wtd, self.bd = wd.to(dt).flatten(1).contiguous(), bd.to(dt)
            self.dnd = PackedConv(_as_1x1(self.wtd), self.bd, stride=u.downsample[0].stride[0])

    def forward(self, x: Tensor, *, poison: bool = False) -> Tensor:
        """``x`` ``[B, C_in, H, W]`` -> rows ``(B*H'*W' + 1, C)`` (last row zero)."""
        u = self.unit
        b, cin, h, w = x.shape
        x = x.contiguous(memory_format=torch.channels_last)
        if dnn.usable(x):
            # oneDNN with packed weights: bias and ReLU fused, conv3 + residual + ReLU added into the buffer in place
            t = self.dn2(self.dn1(x, relu=True), relu=True)
            out = _row_buffer(t.shape[0] * t.shape[-2] * t.shape[-1], self.wt3.shape[0], x, poison)
            v = rows_view(out, t.shape[0], t.shape[-2], t.shape[-1])
            v.copy_(x if self.dnd is None else self.dnd(x))
            self.dn3.add_(v, t, relu=True)
            return out
        rows_in = x.permute(0, 2, 3, 1).reshape(b * h * w, cin)
        width = self.wt1.shape[0]
        t = linear(rows_in, self.wt1, self.b1, relu=True)
        t = F.conv2d(t.view(b, h, w, width).permute(0, 3, 1, 2), self.w2, self.b2, stride=self.stride, padding=1)
        ho, wo = t.shape[-2:]
        n = b * ho * wo
        t = t.relu_().permute(0, 2, 3, 1).reshape(n, width)
        if u.downsample is not None:
            s = u.downsample[0].stride[0]
            xs = x[:, :, ::s, ::s] if s > 1 else x
            shortcut = linear(xs.permute(0, 2, 3, 1).reshape(n, cin), self.wtd, self.bd)
        else:
            shortcut = rows_in
        return _with_pad_row(linear_add(t, shortcut, self.wt3, self.b3).relu_(), poison)


class RowPreActBottleneck0(nn.Module):
    """Unit 0 of a ResNet-v2 stage (pre-activation, strided, projection shortcut) into a row buffer.

    Dense at every position: ``p = relu(bn0(x))`` on channels-last rows; the shortcut is a
    1x1 (strided) convolution of ``p`` (or ``x`` subsampled when the depth is unchanged);
    ``conv1`` / ``conv2`` with their BNs folded (GEMM, then a convolution on a channels-last
    view), ``conv3`` a GEMM; the result lands in a fresh ``(N + 1, C)`` buffer with a zero pad row.
    """

    def __init__(self, unit: PreActBottleneck) -> None:
        super().__init__()
        keep_ref(self, "unit", unit)
        self.stride = unit.stride
        for name in ("s0", "t0", "wt1", "b1", "w2", "b2", "wt3", "b3", "wts", "bs"):
            self.register_buffer(name, torch.empty(0), persistent=False)
        self.refresh()

    @staticmethod
    def supports(unit: nn.Module) -> bool:
        if not isinstance(unit, PreActBottleneck):
            return False
        sc = unit.shortcut
        return (
            (sc is None or (sc.kernel_size == (1, 1) and sc.padding == (0, 0) and sc.groups == 1
                            and sc.stride == (unit.stride, unit.stride)))
            and all(foldable_bn(b) for b in (unit.preact, unit.conv1_bn, unit.conv2_bn))
            and unit.conv1.kernel_size == unit.conv3.kernel_size == (1, 1)
            and unit.conv1.stride == unit.conv3.stride == (1, 1)
            and unit.conv1.groups == unit.conv3.groups == 1
            and _conv2_3x3(unit.conv2, unit.stride)
        )

    @torch.no_grad()
    def refresh(self) -> None:
        """Re-fold the unit's current weights."""
        u = self.unit
        dt = u.conv1.weight.dtype
        s0, t0 = bn_scale_shift(u.preact)
        w1, b1 = fold_conv_bn(u.conv1, u.conv1_bn)
        w2, b2 = fold_conv_bn(u.conv2, u.conv2_bn)
        w3, b3 = fold_conv_bn(u.conv3, None)
        self.s0, self.t0 = s0.to(dt), t0.to(dt)
        self.wt1, self.b1 = w1.to(dt).flatten(1).contiguous(), b1.to(dt)  # (out, in) 1x1 weights
        self.w2, self.b2 = w2.to(dt).contiguous(memory_format=torch.channels_last), b2.to(dt)
        self.wt3, self.b3 = w3.to(dt).flatten(1).contiguous(), b3.to(dt)
        self.dn1 = PackedConv(_as_1x1(self.wt1), self.b1)
        self.dn2 = PackedConv(self.w2, self.b2, stride=self.stride, padding=1)
        self.dn3 = PackedConv(_as_1x1(self.wt3), self.b3)
        self.dns = None
        if u.shortcut is not None:
            ws, bs = fold_conv_bn(u.shortcut, None)
            self.wts, self.bs = ws.to(dt).flatten(1).contiguous(), bs.to(dt)
            self.dns = PackedConv(_as_1x1(self.wts), self.bs, stride=self.stride)

    def forward(self, x: Tensor, *, poison: bool = False) -> Tensor:
        """``x`` ``[B, C_in, H, W]`` -> rows ``(B*H'*W' + 1, C)`` (last row zero)."""
        u = self.unit
        b, cin, h, w = x.shape
        s = self.stride
        x = x.contiguous(memory_format=torch.channels_last)
        p = x.permute(0, 2, 3, 1).reshape(b * h * w, cin).mul(self.s0).add_(self.t0).relu_()  # pre-activation rows
        if dnn.usable(x):
            # oneDNN with packed weights (see RowBottleneck0.forward); no ReLU after the sum
            pv = p.view(b, h, w, cin).permute(0, 3, 1, 2)
            t = self.dn2(self.dn1(pv, relu=True), relu=True)
            out = _row_buffer(t.shape[0] * t.shape[-2] * t.shape[-1], self.wt3.shape[0], x, poison)
            v = rows_view(out, t.shape[0], t.shape[-2], t.shape[-1])
            v.copy_(x[:, :, ::s, ::s] if self.dns is None else self.dns(pv))
            self.dn3.add_(v, t)
            return out
        width = self.wt1.shape[0]
        t = linear(p, self.wt1, self.b1, relu=True)
        t = F.conv2d(t.view(b, h, w, width).permute(0, 3, 1, 2), self.w2, self.b2, stride=s, padding=1)
        ho, wo = t.shape[-2:]
        n = b * ho * wo
        t = t.relu_().permute(0, 2, 3, 1).reshape(n, width)
        if u.shortcut is not None:
            ps = p.view(b, h, w, cin)[:, ::s, ::s].reshape(n, cin) if s > 1 else p
            shortcut = linear(ps, self.wts, self.bs)
        else:
            xs = x[:, :, ::s, ::s] if s > 1 else x
            shortcut = xs.permute(0, 2, 3, 1).reshape(n, cin)
        return _with_pad_row(linear_add(t, shortcut, self.wt3, self.b3), poison)


def _as_1x1(wt: Tensor) -> Tensor:
    """``(out, in)`` -> ``[out, in, 1, 1]``, a view (a 1x1 convolution's weight)."""
    return wt[:, :, None, None]


def _row_buffer(n: int, c: int, like: Tensor, poison: bool) -> Tensor:
    """A fresh ``(n + 1, c)`` row buffer of ``like``'s dtype whose last row is zero (NaN elsewhere when poisoning)."""
    out = like.new_empty(n + 1, c)
    if poison:
        out.fill_(float("nan"))
    out[-1].zero_()
    return out


def _with_pad_row(y: Tensor, poison: bool) -> Tensor:
    """``(n, C)`` rows -> a fresh ``(n + 1, C)`` row buffer whose last row is zero."""
    out = _row_buffer(y.shape[0], y.shape[1], y, poison)
    out[:-1].copy_(y)
    return out


class ResNetStem(nn.Module):
    """The torchvision stem of :class:`~sact.models.resnet.ResNet` (``maxpool(relu(bn1(conv1(x))))``), BN folded.

    On float32 CPU inputs the 7x7 convolution runs with its weight packed and the ReLU fused
    (:class:`~sact.sparse.dnn.PackedConv`): the engine's "stem/head" time of ResNet-50 at batch 1 went
    from 2.07 ms (``sparse_speed_runtimes_profile_2threads.md``) to 1.66 ms
    (``sparse_speed_runtimes_dnn_profile_2threads.md``; OpenVINO 0.92 ms).
    Anything else runs the model's own :meth:`forward_stem`. Called as ``model(x, stem=...)``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        keep_ref(self, "model", model)
        self.conv = None
        self.refresh()

    @staticmethod
    def supports(model: nn.Module) -> bool:
        if not (isinstance(model, ResNet) and type(model).forward_stem is ResNet.forward_stem):
            return False
        c, pool = model.conv1, model.maxpool
        return (
            type(c) is nn.Conv2d and c.groups == 1 and c.dilation == (1, 1) and c.padding_mode == "zeros"
            and c.stride[0] == c.stride[1] and c.padding[0] == c.padding[1] and foldable_bn(model.bn1)
            and type(model.relu) is nn.ReLU
            and type(pool) is nn.MaxPool2d and not pool.ceil_mode and not pool.return_indices
            and pool.dilation in (1, (1, 1))
        )

    @torch.no_grad()
    def refresh(self) -> None:
        """Re-fold the stem's current weights."""
        m = self.model
        w, b = fold_conv_bn(m.conv1, m.bn1)
        dt = m.conv1.weight.dtype
        self.conv = PackedConv(w.to(dt), b.to(dt), stride=m.conv1.stride[0], padding=m.conv1.padding[0])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``[B, C_in, H, W]`` -> (features, FLOPs ``[B]``), as
        :meth:`ResNet.forward_stem <sact.models.resnet.ResNet.forward_stem>`."""
        m = self.model
        if not dnn.usable(x) or x.shape[1:2] != (m.in_chans,) or self.conv.weight.device != x.device:
            return m.forward_stem(x)
        y = self.conv(x, relu=True)
        flops = conv_flops(m.conv1, torch.full((x.shape[0],), y.shape[-2] * y.shape[-1], device=x.device))
        p = m.maxpool
        return F.max_pool2d(y, p.kernel_size, p.stride, p.padding), flops
