"""The halting unit of a dense training run as one autograd operation with its own backward.

For unit ``n`` of an ACT / SACT stage, :func:`halting_unit` computes in one
:class:`torch.autograd.Function`:

1. the halting branch of :mod:`sact.halting` (``h^n``; none for the last unit, ``h = 1``):
   SACT ``sigmoid(conv_kxk(act(BN_l(x))) + b + linear(act(BN_g(mean_hw(x)))))`` per position,
   ACT ``sigmoid(linear(act(BN_g(mean_hw(x)))) + b)`` per image;
2. the halting step of :func:`sact.act.halting_step` (cumulative sum, remainder, ponder cost,
   the weight ``p^n``, positions already halted, the ``1 - eps`` threshold);
3. the accumulation ``out += p^n * x`` of the stage output (eq. (4)).

Why: the torch-op composition spends more time on the halting machinery than its FLOPs
warrant: a ``C -> 1`` 3x3 convolution is badly served by oneDNN (forward and both backward
convolutions), and the recurrence is ~20 tiny ops per unit, each with its autograd node. Here
the local convolution is ``k*k`` shifted dot products, ``Y = W[K, C] @ A[C, HW]`` per image
(one batched matmul) followed by the sum of the ``K`` shifted planes; the backward is written
by hand (the transposed products, the batch-norm backward kernel, the recurrence's piecewise
gradient). On the CPU, where :mod:`sact.native` builds, :class:`_NativeHaltingUnit` runs the
same function on the C++ kernels of ``csrc/halting_train.cpp`` (float32 / float64, NCHW or
channels-last, 3x3 taps, BN in training mode; see :func:`_native`): one pass over ``x`` for the
local BN's batch statistics, one per image for the taps, logits, step and accumulation, and
three in the backward; the ``[B, C]`` global term stays torch ops. Its batch statistics are its
own sums (equal to the torch kernel's up to rounding). ``sact.native.set_enabled(False)`` (or
``SACT_NATIVE=0``) leaves the torch ops, which are also the path for other devices.

Batch norm follows :class:`torch.nn.BatchNorm2d` exactly: batch statistics and the running
statistics update (momentum, unbiased variance, ``num_batches_tracked``) in training mode, the
running statistics in eval mode. Autocast: like :func:`sact.halting.full_precision`, the branch
and the recurrence run in the branch's weight dtype (at least float32), the accumulation in the
features' dtype.

:class:`sact.stage.DenseRun` uses it for training on the CPU when the stage's branches are the
built-in :class:`~sact.halting.ACTHalting` / :class:`~sact.halting.SACTHalting` with plain
``nn.BatchNorm2d`` (see :func:`applies`). By default (``SACT_FUSED_HALTING`` unset or ``auto``,
:func:`set_enabled` ``(None)``) it runs where it was measured faster than the torch-op path (the
reference it is tested against): where its native kernels run every branch of the stage
(:func:`_native_ok`: CPU training on float32 / float64 features, channels-last or NCHW, 3x3 taps;
docs/training.md, "Cost of a training step"); elsewhere (autocast's bfloat16 features, other
devices, no native kernels) the torch-op path runs. ``SACT_FUSED_HALTING=1``
(``set_enabled(True)``) uses it wherever it applies (the torch-op version where the native
kernels cannot run), ``SACT_FUSED_HALTING=0`` never.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import native
from .act import HaltingState, halting_step
from .halting import ACTHalting, SACTHalting, full_precision

__all__ = ["enabled", "set_enabled", "use", "applies", "halting_unit", "step_backward"]

# SACT_FUSED_HALTING: auto (the default): the native kernels on float32 / float64 CPU features, where they measured
# faster than the torch-op path (docs/training.md, "Cost of a training step"; the demo trains to numbers within
# its seed spread with it, benchmarks/results/demo_seeds_fused.md); 1 / 0: always / never
_SETTINGS = {"1": True, "0": False, "auto": None, "": None}


def _from_environment() -> bool | None:
    value = os.environ.get("SACT_FUSED_HALTING", "auto").strip().lower()
    if value not in _SETTINGS:
        warnings.warn(f"SACT_FUSED_HALTING={value!r} is not one of auto, 1, 0: using auto", stacklevel=2)
        return None
    return _SETTINGS[value]


_state = {"setting": _from_environment()}


def enabled() -> bool:
    """Whether dense training runs may use the fused halting unit (``SACT_FUSED_HALTING`` / :func:`set_enabled`:
    auto or on)."""
    return _state["setting"] is not False


def set_enabled(flag: bool | None) -> bool | None:
    """The fused halting unit always (``True``), never (``False``) or by default (``None``: ``auto``) in this
    process; returns the previous setting."""
    prev = _state["setting"]
    _state["setting"] = None if flag is None else bool(flag)
    return prev


@contextlib.contextmanager
def use(flag: bool | None):
    """Context manager: the fused halting unit always (``True``), never or by default (``None``) inside the block."""
    prev = set_enabled(flag)
    try:
        yield
    finally:
        set_enabled(prev)


# ---------------------------------------------------------------------------------------
# Which branches the fused unit reproduces
# ---------------------------------------------------------------------------------------


def _slope(act: nn.Module) -> float | None:
    """Negative slope of a supported activation (``None``: identity); raises for others."""
    if type(act) is nn.Identity:
        return None
    if type(act) is nn.LeakyReLU:
        return float(act.negative_slope)
    if type(act) is nn.ReLU:
        return 0.0
    raise TypeError(type(act).__name__)


def _plain_bn(bn: nn.Module) -> bool:
    return (type(bn) is nn.BatchNorm2d and bn.affine and bn.track_running_stats and bn.momentum is not None
            and bn.running_mean is not None)


def _branch_ok(branch: nn.Module) -> bool:
    if type(branch) is SACTHalting:
        parts = [(branch.local_bn, branch.local_act), (branch.global_bn, branch.global_act)]
        conv = branch.local_conv
        if conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1 or conv.bias is None \
                or conv.padding != (conv.kernel_size[0] // 2, conv.kernel_size[1] // 2) \
                or conv.kernel_size[0] != conv.kernel_size[1] or branch.global_conv.bias is not None:
            return False
    elif type(branch) is ACTHalting:
        parts = [(branch.global_bn, branch.global_act)]
        if branch.global_conv.bias is None:
            return False
    else:
        return False
    try:
        [_slope(a) for _, a in parts]
    except TypeError:
        return False
    return all(_plain_bn(bn) for bn, _ in parts)


def applies(stage: nn.Module, x: Tensor) -> bool:
    """True when :func:`halting_unit` reproduces ``stage``'s halting for the features ``x``.

    Enabled, a training-mode ACT / SACT stage, features on the CPU in a float dtype, built-in
    branches (plain BN, identity / ReLU / leaky-ReLU activations), and a batch of more than one
    image (a one-image training batch is an error that the torch path reports); by default
    (``auto``) also the native kernels running every branch (:func:`_native_ok`).
    """
    setting = _state["setting"]
    if setting is False or not (stage.training and stage.mode in ("act", "sact") and x.device.type == "cpu"
                                and x.is_floating_point() and x.shape[0] > 1):
        return False
    return all(_branch_ok(b) and (setting is True or _native_ok(b, x)) for b in stage.halting)


# ---------------------------------------------------------------------------------------
# Pure functions: batch norm, the branch, the recurrence
# ---------------------------------------------------------------------------------------


@dataclass
class _BN:
    """A BN's settings and buffers (the running statistics are updated in place in training mode)."""

    running_mean: Tensor
    running_var: Tensor
    num_batches_tracked: Tensor | None
    momentum: float
    eps: float
    training: bool

    @classmethod
    def of(cls, bn: nn.BatchNorm2d) -> "_BN":
        return cls(bn.running_mean, bn.running_var, bn.num_batches_tracked, bn.momentum, bn.eps, bn.training)


def bn_forward(bn: _BN, x: Tensor, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(BN(x), save_mean, save_invstd)`` for ``x`` ``[B, C, ...]``: the kernel of
    :class:`torch.nn.BatchNorm2d`, with its running-statistics update in training mode."""
    if bn.training and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
    return torch.native_batch_norm(x, weight, bias, bn.running_mean, bn.running_var, bn.training, bn.momentum, bn.eps)


def bn_backward(bn: _BN, dy: Tensor, x: Tensor, weight: Tensor, save_mean: Tensor, save_invstd: Tensor
                ) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias)`` of :func:`bn_forward` from ``dy`` (the gradient of ``BN(x)``)."""
    return torch.ops.aten.native_batch_norm_backward(dy, x, weight, bn.running_mean, bn.running_var, save_mean,
                                                     save_invstd, bn.training, bn.eps, [True, True, True])


def _act(z: Tensor, slope: float | None) -> Tensor:
    """The branch activation, in place on ``z`` (a temporary)."""
    return z if slope is None else F.leaky_relu_(z, slope)


def _act_grad(dy: Tensor, out: Tensor, slope: float | None) -> Tensor:
    """Gradient through the activation from its output (``out > 0`` iff its input ``> 0``)."""
    return dy if slope is None else torch.ops.aten.leaky_relu_backward(dy, out, slope, True)


def shift_sum(y: Tensor, k: int) -> Tensor:
    """``[B, K, H, W]`` per-tap planes ``y[b, t, p] = W_t . a[p]`` -> ``[B, H, W]``
    ``sum_t y[b, t, p + off_t]`` with zero padding (``off_t = (t // k, t % k) - k // 2``):
    the kxk convolution of ``a`` (``K = k*k``)."""
    r = k // 2
    yp = F.pad(y, (r, r, r, r))  # [B, K, H + 2r, W + 2r]
    h, w = y.shape[2:]
    out = y[:, (k * k) // 2].clone()  # the centre tap
    for t in range(k * k):
        if t != (k * k) // 2:
            ky, kx = divmod(t, k)
            out += yp[:, t, ky:ky + h, kx:kx + w]
    return out


def shift_sum_backward(dz: Tensor, k: int) -> Tensor:
    """The adjoint of :func:`shift_sum`: ``[B, H, W]`` -> ``[B, K, H, W]`` with ``dy[b, t, q] = dz[b, q - off_t]``."""
    r = k // 2
    h, w = dz.shape[1:]
    dzp = F.pad(dz, (2 * r, 2 * r, 2 * r, 2 * r))  # [B, H + 4r, W + 4r]
    return torch.stack([dzp[:, 2 * r - ky + r:2 * r - ky + r + h, 2 * r - kx + r:2 * r - kx + r + w]
                        for ky in range(k) for kx in range(k)], 1)


def step_backward(g_cumsum: Tensor, g_rem: Tensor, g_ponder: Tensor, g_weight: Tensor, cur: Tensor,
                  just: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(dh, d cumsum, d remainder, d ponder)`` ``[S]`` of :func:`sact.act.halting_step` from those of its
    outputs (``cur``: finished after the unit). The ponder increment is 1 (constant) before halting,
    ``R`` at the halting unit; the weight is ``h`` before halting, ``R`` at it, 0 after."""
    zero = torch.zeros_like(g_weight)
    dh = g_cumsum + torch.where(cur, zero, g_weight - g_rem)
    drem = g_rem + torch.where(just, g_weight + g_ponder, zero)
    return dh, g_cumsum, drem, g_ponder


# ---------------------------------------------------------------------------------------
# The autograd Function
# ---------------------------------------------------------------------------------------


@dataclass
class _Spec:
    """What the Function needs besides its tensor inputs."""

    spatial: bool  # SACT (per position) or ACT (per image)
    branch: bool  # False for the last unit (h = 1)
    eps: float  # halting threshold 1 - eps
    local_bn: _BN | None = None
    global_bn: _BN | None = None
    local_slope: float | None = None
    global_slope: float | None = None
    k: int = 3


def _channels_last(x: Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _taps(w9: Tensor, a: Tensor) -> Tensor:
    """``[B, K, H, W]`` per-tap products ``W[K, C] @ a[b][C, HW]`` of ``a`` ``[B, C, H, W]`` (one batched matmul)."""
    b, c, h, w = a.shape
    if _channels_last(a):  # [B*HW, C] @ [C, K]: one matrix product
        return (a.permute(0, 2, 3, 1).reshape(-1, c) @ w9.t()).view(b, h, w, -1).permute(0, 3, 1, 2)
    return torch.bmm(w9.expand(b, -1, -1), a.reshape(b, c, h * w)).view(b, -1, h, w)


def _taps_backward(w9: Tensor, a: Tensor, dy: Tensor) -> tuple[Tensor, Tensor]:
    """``(da [B, C, H, W] in a's memory format, dW [K, C])`` of :func:`_taps` from ``dy`` ``[B, K, H, W]``."""
    b, c, h, w = a.shape
    k2 = w9.shape[0]
    if _channels_last(a):
        af = a.permute(0, 2, 3, 1).reshape(-1, c)  # [B*HW, C]
        dyf = dy.permute(0, 2, 3, 1).reshape(-1, k2)  # [B*HW, K]
        return (dyf @ w9).view(b, h, w, c).permute(0, 3, 1, 2), dyf.t() @ af
    af = a.reshape(b, c, h * w)
    dyf = dy.reshape(b, k2, h * w)
    da = torch.bmm(w9.t().expand(b, -1, -1), dyf).view(b, c, h, w)
    return da, torch.bmm(dyf, af.transpose(1, 2)).sum(0)


def _global_forward(spec: _Spec, g: Tensor, gw, gb) -> tuple[Tensor, tuple]:
    """``act(BN_g(g))`` ``[B, C]`` of the pooled features ``g = mean_hw(x)`` ``[B, C]`` (the raw features,
    not the local BN's) and what the backward needs."""
    ga, gm, gi = bn_forward(spec.global_bn, g, gw, gb)
    ga = _act(ga, spec.global_slope)
    return ga, (g, ga, gm, gi)


def _global_backward(spec: _Spec, dz_img: Tensor, saved: tuple, gw, gcw) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward of ``linear(act(BN_g(g)))`` from ``dz_img`` ``[B]``: ``(dg [B, C], dgw, dgb, dgcw)``."""
    g, ga, gm, gi = saved
    dgcw = (dz_img @ ga).reshape(gcw.shape)
    dga = _act_grad(dz_img[:, None] * gcw.reshape(1, -1), ga, spec.global_slope)  # [B, C]
    return (*bn_backward(spec.global_bn, dga, g, gw, gm, gi), dgcw)


def _sact_logits_forward(spec: _Spec, x: Tensor, lw, lb, lcw, lcb, gw, gb, gcw):
    """SACT halting logits ``[B, H, W]`` of ``x`` ``[B, C, H, W]`` and what the backward needs."""
    c, k = x.shape[1], spec.k
    w9 = lcw.reshape(c, k * k).t()  # [K, C], tap t = ky * k + kx
    pre, lm, li = bn_forward(spec.local_bn, x, lw, lb)
    a = _act(pre, spec.local_slope)  # [B, C, H, W]
    local = shift_sum(_taps(w9, a), k) + lcb  # [B, H, W]
    ga, gsaved = _global_forward(spec, x.mean((2, 3)), gw, gb)
    z = local + (ga @ gcw.reshape(-1))[:, None, None]  # [B, H, W]
    return z, (a, lm, li, gsaved)


def _sact_logits_backward(spec: _Spec, dz: Tensor, x: Tensor, saved, lw, lcw, gw, gcw):
    """Gradients of :func:`_sact_logits_forward` from ``dz`` ``[B, H, W]``:
    ``(dx [B, C, H, W], dlw, dlb, dlcw, dlcb, dgw, dgb, dgcw)``."""
    a, lm, li, gsaved = saved
    c, h, w = x.shape[1:]
    k = spec.k
    dg, dgw, dgb, dgcw = _global_backward(spec, dz.sum((1, 2)), gsaved, gw, gcw)
    da, dw9 = _taps_backward(lcw.reshape(c, k * k).t(), a, shift_sum_backward(dz, k))
    dx, dlw, dlb = bn_backward(spec.local_bn, _act_grad(da, a, spec.local_slope), x, lw, lm, li)
    dx = dx.add_((dg / (h * w))[:, :, None, None])  # the pooled term: d mean_hw
    return dx, dlw, dlb, dw9.t().reshape(lcw.shape), dz.sum().reshape(1), dgw, dgb, dgcw


def _act_logits_forward(spec: _Spec, x: Tensor, gw, gb, gcw, gcb):
    """ACT halting logits ``[B]`` of ``x`` ``[B, C, H, W]`` and what the backward needs."""
    ga, gsaved = _global_forward(spec, x.mean((2, 3)), gw, gb)
    return ga @ gcw.reshape(-1) + gcb, gsaved


class _HaltingUnit(torch.autograd.Function):
    """Branch, halting step and accumulation of one unit (see the module docstring)."""

    @staticmethod
    def forward(ctx, spec: _Spec, x, out, cumsum, remainder, ponder, finished, num_units,
                lw, lb, lcw, lcb, gw, gb, gcw, gcb):
        saved = ()
        xb = None
        if spec.branch:
            xb = x.to(gcw.dtype)  # the branch runs in its weights' dtype (see full_precision)
            if spec.spatial:
                z, saved = _sact_logits_forward(spec, xb, lw, lb, lcw, lcb, gw, gb, gcw)
            else:
                z, saved = _act_logits_forward(spec, xb, gw, gb, gcw, gcb)
            hb = torch.sigmoid(z)
            h = hb.to(cumsum.dtype)
        else:
            hb = None
            h = torch.ones_like(cumsum)
        new, weight = halting_step(HaltingState(cumsum, finished, remainder, ponder, num_units), h, eps=spec.eps)
        cumsum, remainder, ponder, cur, num_units = new.cumsum, new.remainder, new.ponder_cost, new.finished, new.num_units
        just = cur & ~finished  # halted at this unit (kept for the backward)
        wx = weight.to(x.dtype)
        wx = wx[:, None] if spec.spatial else wx.view(-1, 1, 1, 1)
        new_out = x * wx if out is None else torch.addcmul(out, x, wx)
        ctx.spec, ctx.saved, ctx.first, ctx.state_dtype = spec, saved, out is None, cumsum.dtype
        ctx.save_for_backward(x, xb, hb, cur, just, wx, lw, lcw, gw, gcw)
        ctx.mark_non_differentiable(cur, num_units)
        return new_out, cumsum, remainder, ponder, cur, num_units, weight

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_out, g_cumsum, g_rem, g_ponder, _g_finished, _g_num_units, g_weight):
        spec = ctx.spec
        x, xb, hb, cur, just, wx, lw, lcw, gw, gcw = ctx.saved_tensors

        def given(t: Tensor | None) -> Tensor:  # an unused output's gradient arrives as None
            return torch.zeros(cur.shape, dtype=ctx.state_dtype, device=cur.device) if t is None else t

        g_w = given(g_weight)  # [S]: d/d weight, from dist and from the accumulation
        if g_out is not None:
            g_w = g_w + (g_out * x).sum(1 if spec.spatial else (1, 2, 3)).to(g_w.dtype)
        dh, dc, dr, dp = step_backward(given(g_cumsum), given(g_rem), given(g_ponder), g_w, cur, just)
        grads = [None] * 8  # lw, lb, lcw, lcb, gw, gb, gcw, gcb
        dx = None
        if spec.branch:
            dz = dh.to(hb.dtype) * hb * (1 - hb)  # through the sigmoid
            if spec.spatial:
                dx, *g8 = _sact_logits_backward(spec, dz, xb, ctx.saved, lw, lcw, gw, gcw)
                grads = [*g8, None]
            else:
                dg, dgw, dgb, dgcw = _global_backward(spec, dz, ctx.saved, gw, gcw)
                dx = (dg / (x.shape[2] * x.shape[3]))[:, :, None, None].expand(xb.shape)  # the mean's backward
                grads = [None, None, None, None, dgw, dgb, dgcw, dz.sum().reshape(1)]
        if g_out is not None:
            if dx is None:
                dx = g_out * wx
            elif spec.spatial and dx.dtype == x.dtype:
                dx = dx.addcmul_(g_out, wx)
            else:
                dx = torch.addcmul(dx.to(x.dtype), g_out, wx)
        elif dx is not None:
            dx = dx.to(x.dtype).contiguous(memory_format=_format(x))
        return (None, dx, None if ctx.first else g_out, dc, dr, dp, None, None, *grads)


def _format(x: Tensor) -> torch.memory_format:
    return torch.channels_last if _channels_last(x) else torch.contiguous_format


def _native_ops():
    """The native kernels' ops, ``torch.ops.sact_native`` (a function: tests observe the calls)."""
    return torch.ops.sact_native


def _native(branch: nn.Module | None, x: Tensor, state: HaltingState) -> bool:
    """Whether :class:`_NativeHaltingUnit` runs the unit: :func:`_native_ok` and the state in the features' dtype."""
    return state.cumsum.dtype == x.dtype and _native_ok(branch, x)


def _native_ok(branch: nn.Module | None, x: Tensor) -> bool:
    """Whether the native kernels can run ``branch`` on the features ``x``: built and enabled
    (:mod:`sact.native`), the features and the branch in one dtype (float32 / float64; autocast's
    bfloat16 features take the torch ops), the branch's BNs in training mode, 3x3 taps."""
    if x.dtype not in (torch.float32, torch.float64) or not native.use_for(x):
        return False
    if branch is None:
        return True
    conv = getattr(branch, "local_conv", None)
    return (all(p.dtype == x.dtype for p in branch.parameters()) and (conv is None or conv.kernel_size == (3, 3))
            and all(m.training for m in branch.modules() if isinstance(m, nn.BatchNorm2d)))


def _slope_value(slope: float | None) -> float:
    return 1.0 if slope is None else slope  # the kernels' activation: z > 0 ? z : slope * z


class _NativeHaltingUnit(torch.autograd.Function):
    """:class:`_HaltingUnit` on the native kernels of ``csrc/halting_train.cpp``: the local BN's statistics
    in one pass over ``x``, then per image the tap planes, logits, halting step and accumulation; the
    backward in three passes (the step's backward; the BN and tap reductions; ``dx``). The global term
    (``[B, C]``) stays torch ops."""

    @staticmethod
    def forward(ctx, spec: _Spec, x, out, cumsum, remainder, ponder, finished, num_units,
                lw, lb, lcw, lcb, gw, gb, gcw, gcb):
        ops = _native_ops()
        fmt = _format(x)
        x = x.contiguous(memory_format=fmt)
        e = x.new_empty(0)  # an absent tensor
        scale = shift = mean = invstd = w9 = glob = e
        ctx.gsaved = None
        if spec.branch:
            if spec.spatial:
                bn = spec.local_bn
                if bn.num_batches_tracked is not None:
                    bn.num_batches_tracked.add_(1)
                scale, shift, mean, invstd, pooled = ops.halting_train_stats(
                    x, lw, lb, bn.running_mean, bn.running_var, bn.momentum, bn.eps)
                w9 = lcw.reshape(x.shape[1], -1).t().contiguous()  # [K, C], tap t = ky * k + kx
            else:
                pooled = ops.halting_train_stats(x, e, e, e, e, 0.0, 0.0)[4]  # [B, C]
            ga, ctx.gsaved = _global_forward(spec, pooled, gw, gb)
            glob = ga @ gcw.reshape(-1) + (lcb if spec.spatial else gcb)  # [B]
        new_out, cumsum, remainder, ponder, cur, num_units, weight, h = ops.halting_train_forward(
            x, e if out is None else out.contiguous(memory_format=fmt), scale, shift,
            _slope_value(spec.local_slope), w9, glob, cumsum, remainder, ponder, finished, num_units, spec.eps)
        ctx.spec, ctx.first, ctx.lcw_shape = spec, out is None, None if lcw is None else lcw.shape
        ctx.save_for_backward(x, h, cur, finished, weight, scale, shift, mean, invstd, w9, gw, gcw)
        ctx.mark_non_differentiable(cur, num_units)
        return new_out, cumsum, remainder, ponder, cur, num_units, weight

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_out, g_cumsum, g_rem, g_ponder, _g_finished, _g_num_units, g_weight):
        spec = ctx.spec
        x, h, cur, finished, weight, scale, shift, mean, invstd, w9, gw, gcw = ctx.saved_tensors
        ops = _native_ops()
        e = x.new_empty(0)
        go = e if g_out is None else g_out.contiguous(memory_format=_format(x))
        g_logit, drem, dz_img = ops.halting_train_backward_step(
            go, x, *[e if t is None else t for t in (g_weight, g_cumsum, g_rem, g_ponder)], h, cur, finished)
        grads = [None] * 8  # lw, lb, lcw, lcb, gw, gb, gcw, gcb
        dpool = e
        if spec.branch:
            dpool, dgw, dgb, dgcw = _global_backward(spec, dz_img, ctx.gsaved, gw, gcw)
            grads[4:7] = dgw, dgb, dgcw
            grads[3 if spec.spatial else 7] = dz_img.sum().reshape(1)  # the bias
        dx, dlw, dlb, dw9 = ops.halting_train_backward_x(go, x, weight, g_logit, scale, shift,
                                                         _slope_value(spec.local_slope), w9, mean, invstd, dpool)
        if spec.branch and spec.spatial:
            grads[:3] = dlw, dlb, dw9.t().reshape(ctx.lcw_shape)
        return (None, dx, None if ctx.first else g_out, g_cumsum, drem, g_ponder, None, None, *grads)


def halting_unit(branch: nn.Module | None, x: Tensor, out: Tensor | None, state: HaltingState, *,
                 eps: float) -> tuple[Tensor, HaltingState, Tensor]:
    """One unit's halting branch, halting step and accumulation, as one differentiable op.

    Args:
        branch: the unit's :class:`~sact.halting.ACTHalting` / :class:`~sact.halting.SACTHalting`
            (see :func:`applies`), or ``None`` for the last unit (``h = 1``).
        x: ``[B, C, H, W]`` the unit's output.
        out: ``[B, C, H, W]`` the stage output so far, or ``None`` before unit 0.
        state: the halting state before the unit (positions ``S``: ``[B, H, W]`` SACT, ``[B]`` ACT).
        eps: halting threshold ``1 - eps``.

    Returns:
        ``(out + p^n * x, state after the unit, p^n [S])``: the values of
        ``halting_step(state, branch(x))`` and ``DenseRun.accumulate``.
    """
    spatial = state.cumsum.dim() == 3
    spec = _Spec(spatial=spatial, branch=branch is not None, eps=float(eps))
    params = [None] * 8
    if branch is not None:
        spec.global_bn, spec.global_slope = _BN.of(branch.global_bn), _slope(branch.global_act)
        gp = [branch.global_bn.weight, branch.global_bn.bias, branch.global_conv.weight]
        if spatial:
            spec.local_bn, spec.local_slope = _BN.of(branch.local_bn), _slope(branch.local_act)
            spec.k = branch.local_conv.kernel_size[0]
            params = [branch.local_bn.weight, branch.local_bn.bias, branch.local_conv.weight,
                      branch.local_conv.bias, *gp, None]
        else:
            params = [None] * 4 + gp + [branch.global_conv.bias]
    no_autocast, _ = full_precision(x, x)  # dtypes are chosen inside (see _HaltingUnit.forward)
    fn = _NativeHaltingUnit if _native(branch, x, state) else _HaltingUnit
    with no_autocast:
        new_out, cumsum, remainder, ponder, finished, num_units, weight = fn.apply(
            spec, x, out, state.cumsum, state.remainder, state.ponder_cost, state.finished, state.num_units, *params)
    return new_out, HaltingState(cumsum, finished, remainder, ponder, num_units), weight
