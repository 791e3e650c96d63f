"""A whole CIFAR stage in one native call: the accelerated copy of the stage loop.

:class:`NativeBasicStage` runs an :class:`~sact.stage.AdaptiveStage` of
:class:`~sact.units.PreActBasicUnit` (the reference's CIFAR unit) with its SACT or ACT
halting branches in eval mode through one C++ call (``csrc/basic_stage.cpp``): the loop over
units, each unit's direct 3x3 convolutions (unit ``n >= 1``: ``conv1`` at the 3x3-dilated
active positions, ``conv2`` + residual at the active ones), the halting branch, the
recurrence of :func:`sact.act.halting_step` and the weighted sum of the unit outputs. It
returns what ``stage.eval()(x)`` returns, with the FLOPs from the units' own formulas
(:meth:`~sact.stage.AdaptiveStage.flops_from_counts` /
:meth:`~sact.stage.AdaptiveStage.flops_from_num_units`) on the position counts the kernel
reports.

The native kernels must be built (:func:`sact.sparse.native.available`); callers check
``native.use_for(x)`` and otherwise run the pure-PyTorch engine, which stays the reference.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..halting import ACTHalting, SACTHalting
from ..stage import AdaptiveStage, StageOutput
from ..units import Conv2dSame, PreActBasicUnit
from . import native
from .fold import bn_scale_shift, conv_as_matrix, fold_conv_bn, foldable_bn

__all__ = ["NativeBasicStage"]

_META_VERSION = 1  # must match kMetaVersion in csrc/basic_stage.cpp
_DTYPES = (torch.float32, torch.float64)
_ACTS = (nn.LeakyReLU, nn.ReLU, nn.Identity)


def _slope(act: nn.Module) -> float:
    """The activation as a leaky ReLU slope: identity 1, ReLU 0."""
    if isinstance(act, nn.LeakyReLU):
        return float(act.negative_slope)
    return 0.0 if isinstance(act, nn.ReLU) else 1.0


def _conv3x3(conv: nn.Module, padding: tuple[int, int] | None) -> bool:
    return (
        isinstance(conv, nn.Conv2d)
        and conv.kernel_size == (3, 3)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and (padding is None or conv.padding == padding)
    )


def _unit_ok(unit: nn.Module, first: bool) -> bool:
    if type(unit) is not PreActBasicUnit:  # a subclass may compute something else
        return False
    if not (foldable_bn(unit.bn1) and foldable_bn(unit.bn2)):
        return False
    if not (isinstance(unit.act1, _ACTS) and isinstance(unit.act2, _ACTS)):
        return False
    if not (isinstance(unit.conv1, Conv2dSame) and _conv3x3(unit.conv1, (0, 0)) and _conv3x3(unit.conv2, (1, 1))):
        return False
    if unit.conv2.stride != (1, 1) or unit.conv1.stride != (unit.stride, unit.stride):
        return False
    if first:
        return unit.stride in (1, 2)
    return unit.stride == 1 and unit.in_channels == unit.out_channels and not unit.activate_before_residual


def _halting_ok(branch: nn.Module, mode: str, channels: int) -> bool:
    if mode == "sact":
        return (
            type(branch) is SACTHalting
            and foldable_bn(branch.local_bn)
            and foldable_bn(branch.global_bn)
            and isinstance(branch.local_act, _ACTS)
            and isinstance(branch.global_act, _ACTS)
            and _conv3x3(branch.local_conv, (1, 1))
            and branch.local_conv.stride == (1, 1)
            and branch.local_conv.out_channels == 1
            and branch.local_conv.in_channels == channels
            and branch.global_conv.kernel_size == (1, 1)
            and branch.global_conv.out_channels == 1
        )
    return (
        type(branch) is ACTHalting
        and foldable_bn(branch.global_bn)
        and isinstance(branch.global_act, _ACTS)
        and branch.global_conv.kernel_size == (1, 1)
        and branch.global_conv.out_channels == 1
        and branch.global_conv.in_channels == channels
    )


class NativeBasicStage(nn.Module):
    """Inference-only native execution of a CIFAR :class:`~sact.stage.AdaptiveStage`.

    Batch norm is folded into the convolutions where exact (``bn2`` into ``conv1``); the
    pre-activation and halting BNs are applied as per-channel affine maps. Weights are
    shared with the stage (call :meth:`refresh` after changing them). Scratch buffers are
    kept per input shape, dtype and thread count and reused across calls, so one module runs
    one call at a time (use one module per Python thread).

    Args:
        stage: a stage for which :meth:`supports` is true.

    Attributes:
        poison: fill the scratch buffers with NaN before every call (a debugging aid the
            tests use to show that nothing uninitialised is read).
        profile: ``None``, or a float64 tensor ``(U + 1, 8)`` (see :meth:`new_profile`) to which
            every call adds the seconds the calling thread spent per unit and phase.
    """

    #: Columns of :attr:`profile` (``csrc/basic_stage.cpp`` ``ProfCol``): masks and bookkeeping,
    #: pre-activation (``act1(bn1(x))``), conv1, conv2 with residual, halting branch with the
    #: recurrence and the weighted sum, barrier waits, then the summed active and dilated
    #: fractions. Row ``U`` column 0 counts the images the thread ran.
    PROFILE_COLUMNS = ("bookkeeping", "preact", "conv1", "conv2", "halting", "wait", "active", "dilated")

    def __init__(self, stage: AdaptiveStage) -> None:
        super().__init__()
        if not self.supports(stage):
            raise ValueError(f"NativeBasicStage does not support this stage (mode {getattr(stage, 'mode', None)!r})")
        object.__setattr__(self, "stage", stage)  # shared with the wrapped model, not registered twice
        self.mode = stage.mode
        self.poison = False
        self.profile: Tensor | None = None
        self.register_buffer("weights", torch.empty(0), persistent=False)
        self.register_buffer("meta", torch.empty(0, dtype=torch.long), persistent=False)
        self._scratch: dict[tuple, Tensor] = {}
        self.refresh()

    @staticmethod
    def supports(stage: nn.Module) -> bool:
        """True for "sact" / "act" stages of :class:`~sact.units.PreActBasicUnit` with foldable
        (eval-mode running statistics) BNs and the standard halting branches, on the CPU in
        float32 or float64. Whether the native kernels are built is a separate question
        (:func:`sact.sparse.native.use_for`)."""
        if not isinstance(stage, AdaptiveStage) or stage.mode not in ("sact", "act"):
            return False
        units = stage.units
        if not all(_unit_ok(u, i == 0) for i, u in enumerate(units)):
            return False
        c = units[0].out_channels
        if any(u.out_channels != c for u in units):
            return False
        if stage.halting is None or len(stage.halting) != len(units) - 1:
            return False
        if not all(_halting_ok(b, stage.mode, c) for b in stage.halting):
            return False
        params = list(stage.parameters())
        return all(p.dtype in _DTYPES and p.device.type == "cpu" for p in params) and len({p.dtype for p in params}) <= 1

    @torch.no_grad()
    def refresh(self) -> None:
        """Re-fold and re-pack the stage's current weights (call after changing them)."""
        stage = self.stage
        units = stage.units
        dtype = units[0].conv1.weight.dtype
        parts: list[Tensor] = []
        size = 0

        def put(t: Tensor | float) -> int:
            nonlocal size
            t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
            parts.append(t)
            size += t.numel()
            return size - t.numel()

        zero = put(0.0)
        unit_fields, halt_fields = [], []
        for u in units:
            s1, t1 = bn_scale_shift(u.bn1)
            w1, b1 = fold_conv_bn(u.conv1, u.bn2)  # act2(bn2(conv1(.))): bn2 folded
            w2, b2 = fold_conv_bn(u.conv2, None)
            unit_fields += [put(s1), put(t1), put(conv_as_matrix(w1)), put(b1), put(conv_as_matrix(w2)), put(b2),
                            put(_slope(u.act1)), put(_slope(u.act2))]
        for br in stage.halting:
            sg, tg = bn_scale_shift(br.global_bn)
            wg = br.global_conv.weight.detach().double().reshape(-1)
            bg = put(br.global_conv.bias.detach()) if br.global_conv.bias is not None else zero
            if self.mode == "sact":
                sl, tl = bn_scale_shift(br.local_bn)
                wl = br.local_conv.weight.detach().double()[0].permute(1, 2, 0).reshape(-1)  # (ky, kx, c)
                bl = put(br.local_conv.bias.detach()) if br.local_conv.bias is not None else zero
                local = [put(sl), put(tl), put(wl), bl, put(_slope(br.local_act))]
            else:
                local = [-1, -1, -1, -1, -1]
            halt_fields += local + [put(sg), put(tg), put(wg), bg, put(_slope(br.global_act))]
        u0 = units[0]
        header = [_META_VERSION, 0 if self.mode == "sact" else 1, len(units), u0.in_channels, u0.out_channels,
                  u0.stride, int(u0.activate_before_residual)]
        self.weights = torch.cat(parts).to(dtype)
        self.meta = torch.tensor(header + unit_fields + halt_fields, dtype=torch.long)
        self._scratch.clear()

    def new_profile(self) -> Tensor:
        """A zero ``(U + 1, 8)`` float64 tensor to assign to :attr:`profile`."""
        return torch.zeros(self.stage.num_units + 1, len(self.PROFILE_COLUMNS), dtype=torch.float64)

    def _scratch_for(self, x: Tensor, threads: int) -> Tensor:
        key = (x.shape[2], x.shape[3], x.dtype, threads)
        buf = self._scratch.get(key)
        if buf is None:
            nbytes = torch.ops.sact_native.basic_stage_scratch_bytes(self.meta, x.shape[2], x.shape[3], threads,
                                                                      x.element_size())
            buf = torch.empty(-(-nbytes // x.element_size()), dtype=x.dtype)
            self._scratch[key] = buf
        if self.poison:
            buf.fill_(float("nan"))
        return buf

    @torch.no_grad()
    def forward(self, x: Tensor) -> tuple[Tensor, StageOutput]:
        """Run the stage natively.

        Args:
            x: the stage input ``[B, C_in, H, W]``, float32 or float64 on the CPU, any memory
                format (channels-last reads fastest).

        Returns:
            ``(features [B, C, H', W'] (channels-last), StageOutput)``, equal to
            ``stage.eval()(x)``.
        """
        if x.dim() != 4 or x.device.type != "cpu":
            raise ValueError(f"expected a CPU image batch [B, C, H, W], got shape {tuple(x.shape)} on {x.device}")
        if x.dtype != self.weights.dtype:
            if x.dtype not in _DTYPES or self.stage.units[0].conv1.weight.dtype != x.dtype:
                raise ValueError(f"input dtype {x.dtype} does not match the stage's {self.weights.dtype}")
            self.refresh()  # the model was converted since the last fold
        if not native.available():
            raise RuntimeError(f"the native kernels are not available: {native.load_error()}")
        threads = torch.get_num_threads()
        scratch = self._scratch_for(x, threads)
        feat, ponder, nunits, dist, counts = torch.ops.sact_native.basic_stage(
            x, self.weights, self.meta, scratch, float(self.stage.eps), threads, self.profile
        )
        b, h, w = feat.shape[:3]
        if self.mode == "sact":
            flops = self.stage.flops_from_counts(x, counts[0], counts[1], h * w)
        else:
            flops = self.stage.flops_from_num_units(x, nunits, h * w)
            u = dist.shape[1]
            dist = dist[:, :, None, None].expand(b, u, h, w)
            ponder = ponder.view(b, 1, 1).expand(b, h, w)
            nunits = nunits.view(b, 1, 1).expand(b, h, w)
        return feat.permute(0, 3, 1, 2), StageOutput(ponder, nunits, dist, flops)
