"""An adaptive stage: residual units run with ACT / SACT halting, in one loop.

Semantics (reference ``act.py:spatially_adaptive_computation_time`` and
``resnet_act.py``; paper Alg. 2):

* unit 0 (the strided / projection unit) runs at every position;
* after unit ``n < U-1`` a halting branch predicts ``h^n``; the last unit has none and
  always halts;
* unit ``n >= 1`` updates only the positions still active after unit ``n - 1``:
  ``x^n = x^{n-1} + m^n * F^n(x^{n-1})`` (the unit applies the mask), so a halted
  position keeps its features in all later units;
* the stage output is ``sum_n p^n x^n`` with the halting distribution ``p`` (eq. (4)).

ACT is the same loop with one position per image; like the reference's ``act`` wrapper it
runs every unit on every image and lets the halting distribution weight the outputs
(halted images get weight 0). ``vanilla`` runs every unit everywhere and returns the last
output.

:func:`run_stage` is the one loop that owns these semantics. *Where* a unit, a halting
branch and the accumulation run is decided by a :class:`StageExecutor`: the
:class:`DenseExecutor` here (training and the reference: every position, masks), or the
sparse engine's executors (:mod:`sact.sparse`: row sets, image subsets), which compute
the same values. FLOPs always come from the units' and branches' own ``flops`` methods
on the masks the loop builds, so every executor reports the same count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Protocol, Sequence

import torch
from torch import Tensor, nn

from . import halting_fused
from .act import DEFAULT_EPS, HaltingState, halting_step
from .halting import make_halting

__all__ = ["StageOutput", "AdaptiveStage", "MODES", "Mode", "Where", "StageExecutor", "StageRun", "Executor",
           "DenseExecutor", "DenseRun", "FusedStep", "HaltingUnit", "run_stage"]

Mode = Literal["vanilla", "act", "sact"]
MODES: tuple[str, ...] = ("vanilla", "act", "sact")


@dataclass
class StageOutput:
    """What one stage reports besides its features.

    Attributes:
        ponder_map: ``[B, H, W]`` ponder cost ``N + 1 + R`` per position (differentiable
            through ``R``). ACT: constant over ``H, W``. vanilla: ``U`` everywhere.
        num_units: ``[B, H, W]`` int64, units executed per position (``N + 1``).
        halting_distribution: ``[B, U, H, W]`` weights of the unit outputs (sum to 1 over U).
        flops: ``[B]`` int64 FLOPs this stage spent on each image (units + halting branches).
    """

    ponder_map: Tensor
    num_units: Tensor
    halting_distribution: Tensor
    flops: Tensor

    @property
    def ponder_cost(self) -> Tensor:
        """``[B]`` mean of the ponder map over positions (what the loss uses)."""
        return self.ponder_map.flatten(1).mean(1)

    @property
    def num_units_mean(self) -> Tensor:
        """``[B]`` mean number of executed units over positions."""
        return self.num_units.float().flatten(1).mean(1)


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


# ---------------------------------------------------------------------------------------
# Executors: where the loop's steps run
# ---------------------------------------------------------------------------------------


class Where:
    """The positions a unit (and the halting branch after it) must update.

    Attributes:
        idx: ``[n]`` int64 indices of the still-running positions into the flattened
            position grid (``B*H*W`` for SACT, ``B`` for ACT), sorted; ``None`` when every
            position runs or the executor does not compact (:attr:`StageRun.compact`).
        mask: ``[B, 1, H, W]`` 0/1 in the features' dtype, or ``None`` for every position
            (unit 0, and vanilla stages); ACT: the image's flag broadcast over ``H, W``.
            Built on first use from the running positions.
    """

    def __init__(self, active: Tensor | HaltingState | None = None, idx: Tensor | None = None, *,
                 dtype: torch.dtype | None = None, shape: tuple[int, int, int, int] | None = None) -> None:
        self.idx = idx
        self._active, self._dtype, self._shape = active, dtype, shape  # active: bool [S], or a state (lazy)
        self._mask: Tensor | None = None
        #: scratch space of the executor: what unit ``n`` and the halting branch after it share
        #: (e.g. the row set of these positions); a new ``Where`` starts empty
        self.shared: dict = {}

    @property
    def everywhere(self) -> bool:
        """True when every position runs (no mask)."""
        return self._active is None

    @property
    def mask(self) -> Tensor | None:
        if self._active is None:
            return None
        if self._mask is None:
            active = self._active
            m = (~active.finished if isinstance(active, HaltingState) else active).to(self._dtype)
            self._mask = m.unsqueeze(1) if m.dim() == 3 else m.view(-1, 1, 1, 1).expand(self._shape)
        return self._mask


#: ``fused_step(n, state, proba, where, dist_n, eps) -> idx``: see :attr:`StageRun.fused_step`.
FusedStep = Callable[[int, HaltingState, "Tensor | None", "Where", Tensor, float], Tensor]
#: ``halting_unit(n, state, eps) -> (state, weight)``: see :attr:`StageRun.halting_unit`.
HaltingUnit = Callable[[int, HaltingState, float], "tuple[HaltingState, Tensor]"]


class StageRun(Protocol):
    """One call of a stage under an executor: holds the features in the executor's layout.

    ``compact`` executors take halting probabilities and weights only at ``where.idx``
    (``[n]``); the others at every position (``[B, H, W]`` or ``[B]``), halted ones ignored.

    ``fused_step`` is ``None`` (the loop's generic halting step) or, for a compacting run, an
    accelerated copy of one step of the loop: the halting step, the accumulation and the next
    index set, updating ``state`` and ``dist_n`` in place and returning the next ``idx``
    (tested equal to the generic path).

    ``halting_unit`` is ``None`` or, for a run over every position, halting branch ``n`` (none
    for the last unit), the halting step and the accumulation as one differentiable op
    (:func:`sact.halting_fused.halting_unit`), returning the new state and the weight ``p^n``
    (tested equal to the generic path, values and gradients).
    """

    compact: bool
    fused_step: FusedStep | None
    halting_unit: HaltingUnit | None

    @property
    def features(self) -> Tensor:
        """``[B, C, H, W]`` the current features (a view is fine; used for FLOPs and shapes)."""
        ...

    def unit(self, n: int, where: Where) -> None:
        """Run unit ``n >= 1`` where it must run (features elsewhere stay as they are)."""
        ...

    def halting(self, n: int, where: Where) -> Tensor:
        """Halting probabilities of branch ``n`` at ``where`` (``[n]`` if compact, else all positions)."""
        ...

    def accumulate(self, n: int, weight: Tensor, where: Where) -> None:
        """Add ``weight * features`` of unit ``n`` to the stage output (``weight`` as for :meth:`halting`)."""
        ...

    def output(self) -> Tensor:
        """``[B, C, H, W]`` the stage output ``sum_n p^n x^n`` (vanilla: the last unit's output)."""
        ...

class StageExecutor(Protocol):
    """Decides where a stage runs: ``start(stage, x)`` runs unit 0 everywhere and returns a :class:`StageRun`.

    ``run_whole(stage, x) -> (features, StageOutput) | None`` (optional) is an accelerated copy
    of the whole loop (e.g. the native CIFAR stage of :mod:`sact.sparse.native_stage`), tested
    equal to it; ``None`` means "not for this input", and the loop runs with ``start``.
    :class:`Executor` is a base with the defaults (no whole-stage path); an executor with
    ``start`` alone works too.
    """

    def start(self, stage: "AdaptiveStage", x: Tensor) -> StageRun: ...

    def run_whole(self, stage: "AdaptiveStage", x: Tensor) -> "tuple[Tensor, StageOutput] | None": ...


class Executor:
    """Base of executors: implement :meth:`start`; :meth:`run_whole` defaults to "no whole-stage path"."""

    def start(self, stage: "AdaptiveStage", x: Tensor) -> StageRun:
        raise NotImplementedError

    def run_whole(self, stage: "AdaptiveStage", x: Tensor) -> "tuple[Tensor, StageOutput] | None":
        return None


class DenseRun:
    """Every unit at every position with masks (training, the reference); a base for runs that
    keep the dense layout (e.g. the sparse engine's ACT image-subset run)."""

    compact = False
    fused_step: FusedStep | None = None
    halting_unit: HaltingUnit | None = None

    def __init__(self, stage: "AdaptiveStage", x: Tensor, *, fused: bool = False) -> None:
        """``fused``: halting steps through :func:`sact.halting_fused.halting_unit` (the caller
        checked :func:`sact.halting_fused.applies`)."""
        self.stage = stage
        self.x = stage.units[0](x)  # [B, C, H, W]
        self.out: Tensor | None = None
        if fused:
            self.halting_unit = self._halting_unit

    def _halting_unit(self, n: int, state: HaltingState, eps: float) -> tuple[HaltingState, Tensor]:
        branch = self.stage.halting[n] if n < self.stage.num_units - 1 else None
        self.out, state, weight = halting_fused.halting_unit(branch, self.x, self.out, state, eps=eps)
        return state, weight

    @property
    def features(self) -> Tensor:
        return self.x

    def unit(self, n: int, where: Where) -> None:
        # SACT masks the residual; ACT runs every unit on every image like the reference
        # (masks only weight the outputs), so BatchNorm batch statistics match it in training.
        self.x = self.stage.units[n](self.x, where.mask if self.stage.mode == "sact" else None)

    def halting(self, n: int, where: Where) -> Tensor:
        return self.stage.halting[n](self.x)  # [B, H, W] (SACT) or [B] (ACT)

    def accumulate(self, n: int, weight: Tensor, where: Where) -> None:
        w = weight.to(self.x.dtype)
        w = w.unsqueeze(1) if w.dim() == 3 else w.view(-1, 1, 1, 1)
        self.out = w * self.x if self.out is None else torch.addcmul(self.out, self.x, w)

    def output(self) -> Tensor:
        return self.x if self.out is None else self.out


class DenseExecutor(Executor):
    """The reference execution: every unit everywhere, halted positions masked."""

    def start(self, stage: "AdaptiveStage", x: Tensor) -> StageRun:
        # training on the CPU where sact.halting_fused.applies (SACT_FUSED_HALTING): the fused halting unit
        return DenseRun(stage, x, fused=halting_fused.applies(stage, x))


DENSE = DenseExecutor()


# ---------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------


def run_stage(stage: "AdaptiveStage", x: Tensor, executor: StageExecutor | None = None) -> tuple[Tensor, StageOutput]:
    """Run ``stage`` on ``x`` under ``executor`` (default: dense): the one stage loop.

    Args:
        stage: the stage.
        x: ``[B, C_in, H_in, W_in]``.
        executor: where units, halting branches and the accumulation run.

    Returns:
        ``(features [B, C, H, W], StageOutput)``.
    """
    executor = executor or DENSE
    # the optional hooks (run_whole, fused_step, halting_unit) are declared by StageExecutor / StageRun
    # with defaults in Executor / DenseRun; an executor written with ``start`` alone has none
    whole = getattr(executor, "run_whole", None)
    done = None if whole is None else whole(stage, x)
    if done is not None:
        return done
    units = stage.units
    num_u = stage.num_units
    run = executor.start(stage, x)  # unit 0, every position
    # Built-in units and branches state their FLOPs as rates: counted once per stage from the
    # final unit counts (the same formulas, vectorised); any other unit is counted per step.
    per_step_flops = stage.mode == "vanilla" or not stage.has_flop_rates()
    flops = units[0].flops(x, None) if per_step_flops else None
    feats = run.features
    b, _, h, w = feats.shape
    dev = feats.device

    if stage.mode == "vanilla":
        everywhere = Where()
        for n in range(1, num_u):
            flops = flops + units[n].flops(run.features, None)
            run.unit(n, everywhere)
        full = torch.full((b, h, w), num_u, device=dev)
        dist = torch.zeros(b, num_u, h, w, dtype=feats.dtype, device=dev)
        dist[:, -1] = 1
        return run.output(), StageOutput(full.to(feats.dtype), full.long(), dist, flops)

    spatial = stage.mode == "sact"
    shape = (b, h, w) if spatial else (b,)
    state = HaltingState.initial(feats.new_empty(shape))  # at least float32 (see HaltingState)
    dist = torch.zeros((num_u, *shape), dtype=state.cumsum.dtype, device=dev)
    fused = getattr(run, "fused_step", None)
    fused_unit = getattr(run, "halting_unit", None)
    n_pos = state.cumsum.numel()
    where = Where()
    for n in range(num_u):
        if n > 0:
            if per_step_flops:
                flops = flops + units[n].flops(run.features, where.mask)
            run.unit(n, where)
        if per_step_flops and n < num_u - 1:
            flops = flops + stage.halting[n].flops(run.features, where.mask)
        if fused_unit is not None:  # branch, step and accumulation as one differentiable op
            state, dist[n] = fused_unit(n, state, stage.eps)
            if n < num_u - 1:
                where = _next_where(state, where, run.compact, feats.dtype, (b, 1, h, w))
            continue
        proba = None if n == num_u - 1 else run.halting(n, where)  # the last unit always halts
        if fused is not None:  # the same step, accumulation and next index set, in one native call
            idx = fused(n, state, proba, where, dist[n], stage.eps)
            where = Where(state, None if idx.numel() == n_pos else idx, dtype=feats.dtype, shape=(b, 1, h, w))
            continue
        if where.idx is None:
            state, weight = halting_step(state, proba, eps=stage.eps)
            dist[n] = weight
        else:
            sub, weight = halting_step(state.select(where.idx), proba, eps=stage.eps)
            state = state.merge(where.idx, sub)
            dist[n].view(-1).index_copy_(0, where.idx, weight)
        run.accumulate(n, weight, where)
        if n < num_u - 1:
            where = _next_where(state, where, run.compact, feats.dtype, (b, 1, h, w))

    ponder, num_units = state.ponder_cost, state.num_units
    if not per_step_flops:
        flops = stage.flops_from_num_units(x, num_units, h * w)
    if spatial:
        dist = dist.permute(1, 0, 2, 3)  # [B, U, H, W]
    else:  # ACT: constant maps over H, W
        dist = dist.t()[:, :, None, None].expand(b, num_u, h, w)
        ponder = ponder.view(b, 1, 1).expand(b, h, w)
        num_units = num_units.view(b, 1, 1).expand(b, h, w)
    return run.output(), StageOutput(ponder, num_units, dist.to(feats.dtype) if feats.dtype != dist.dtype else dist,
                                     flops)


def _next_where(state: HaltingState, prev: Where, compact: bool, dtype: torch.dtype, mask_shape) -> Where:
    """The positions the next unit updates: those not finished after this one."""
    active = ~state.finished  # [B, H, W] or [B]
    idx = None
    if compact:
        if prev.idx is None:
            idx = active.reshape(-1).nonzero().view(-1)
        else:  # only the previously running positions can still run
            idx = prev.idx[active.reshape(-1).index_select(0, prev.idx)]
        if idx.numel() == active.numel():
            idx = None  # nothing halted yet: every position, no index needed
    return Where(active, idx, dtype=dtype, shape=mask_shape)


# ---------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------


def _tracing() -> bool:
    """True under ``torch.compile`` / ``torch.export``: memoised tensors would become constants
    of one trace (fake tensors in the next), so the FLOP memos are bypassed there."""
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)  # torch < 2.6 has no is_exporting
    return torch.compiler.is_compiling() or exporting()


class AdaptiveStage(nn.Module):
    """Runs residual units as one ACT / SACT / vanilla stage.

    Units are registered as children ``"0", "1", ...`` (so parameter names match
    torchvision's ``layer1.0.conv1.weight``); halting branches live under ``halting.<n>``.

    Args:
        units: residual units following the protocol of :mod:`sact.units` (unit 0 may be
            strided; units ``1..U-1`` must keep the shape).
        mode: ``"vanilla"``, ``"act"`` or ``"sact"``.
        halting_factory: ``(mode, channels) -> nn.Module`` building a halting branch;
            default :func:`sact.halting.make_halting`.
        eps: halting threshold ``1 - eps``.
    """

    def __init__(
        self,
        units: Sequence[nn.Module],
        *,
        mode: str = "sact",
        halting_factory: Callable[[str, int], nn.Module] | None = None,
        eps: float = DEFAULT_EPS,
    ) -> None:
        super().__init__()
        self.mode = _check_mode(mode)
        if len(units) == 0:
            raise ValueError("a stage needs at least one unit")
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"eps must be in [0, 1), got {eps}")
        for i, unit in enumerate(units):
            for attr in ("out_channels", "flops"):
                if not hasattr(unit, attr):
                    raise TypeError(f"unit {i} ({type(unit).__name__}) lacks {attr!r}; see sact.units.ResidualUnit")
            self.add_module(str(i), unit)
        self.num_units = len(units)
        self.eps = eps
        factory = halting_factory or make_halting
        channels = units[0].out_channels
        self.halting = (
            nn.ModuleList(factory(mode, channels) for _ in range(self.num_units - 1)) if mode != "vanilla" else None
        )

    @property
    def units(self) -> list[nn.Module]:
        """The residual units in order."""
        return [getattr(self, str(i)) for i in range(self.num_units)]

    def __getitem__(self, idx: int) -> nn.Module:
        return self.units[idx]

    def __len__(self) -> int:
        return self.num_units

    def forward(self, x: Tensor, executor: StageExecutor | None = None) -> tuple[Tensor, StageOutput]:
        """Run the stage (see :func:`run_stage`).

        Args:
            x: ``[B, C_in, H_in, W_in]``.
            executor: where the steps run; ``None`` for the dense reference execution.

        Returns:
            ``(features [B, C, H, W], StageOutput)``.
        """
        return run_stage(self, x, executor)

    # ---- FLOPs from the halting outcome: the units' formulas as rates, vectorised ----

    def has_flop_rates(self) -> bool:
        """True when every later unit and every halting branch states its FLOPs as rates
        (``masked_flop_rates`` / ``flop_rates``: the built-in ones do)."""
        if getattr(self, "_has_rates", None) is None:
            ok = all(hasattr(u, "masked_flop_rates") for u in self.units[1:]) and all(
                hasattr(b, "flop_rates") for b in (self.halting or []))
            object.__setattr__(self, "_has_rates", ok)
        return self._has_rates

    def _flop_rates(self) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
        """Per unit ``n``: masked rates of unit ``n`` (0 for unit 0) and rates of halting branch ``n``."""
        if getattr(self, "_rates_cache", None) is None:
            for i, u in enumerate(self.units[1:], start=1):
                if not hasattr(u, "masked_flop_rates"):
                    raise TypeError(f"unit {i} ({type(u).__name__}) has no masked_flop_rates(); use its flops()")
            unit_rates = [(0, 0, 0)] + [u.masked_flop_rates() for u in self.units[1:]]
            halt_rates = [b.flop_rates() for b in self.halting] + [(0, 0)] if self.halting is not None else []
            object.__setattr__(self, "_rates_cache", (
                [r[0] for r in unit_rates], [r[1] for r in unit_rates], [r[2] for r in unit_rates],
                [r[0] for r in halt_rates], [r[1] for r in halt_rates],
            ))
        return self._rates_cache

    def flops_from_counts(self, x: Tensor, active: Tensor, dilated: Tensor, hw: int | None = None) -> Tensor:
        """``[B]`` FLOPs of a SACT stage from its per-unit position counts.

        The same formulas as the units' and branches' ``flops`` (their ``masked_flop_rates`` /
        ``flop_rates``), vectorised: for executors that know the counts without masks.

        Args:
            x: the stage input ``[B, C_in, H_in, W_in]`` (its shape gives unit 0's FLOPs).
            active: ``[U, B]`` int64, positions unit ``n`` (and halting branch ``n``) ran at;
                row 0 is every position of the stage's map.
            dilated: ``[U, B]`` int64, positions of the 3x3-dilated active set (row 0 unused).
            hw: positions of the stage's map (default: read from ``active[0]``; pass it when
                tracing, e.g. under ``torch.export``, where the value is data-dependent).
        """
        rd, ra, re, hr, hi = self._flop_rates()
        if hw is None:
            hw = int(active[0, 0]) if active.shape[1] else 0
        key = ("coef", active.dtype, active.device)
        cache = {} if _tracing() else self._flop_cache()  # a traced constant must not outlive its trace
        if key not in cache:
            cache[key] = torch.tensor([[a + h for a, h in zip(ra, hr)], rd], dtype=active.dtype,
                                      device=active.device)[:, :, None]  # [2, U, 1]
        coef = cache[key]
        total = (coef[0] * active).sum(0) + (coef[1] * dilated).sum(0)
        return self._unit0_flops(x) + total + (sum(hi) + sum(re) * hw)

    def _flop_cache(self) -> dict:
        """Memo of shape-only FLOP terms (eager mode only: see :func:`_tracing`)."""
        if getattr(self, "_flops_memo", None) is None:
            object.__setattr__(self, "_flops_memo", {})
        return self._flops_memo

    def _unit0_flops(self, x: Tensor) -> Tensor:
        """``units[0].flops(x, None)``, remembered per input shape (it depends on nothing else)."""
        shape = tuple(x.shape)
        if _tracing() or not all(type(s) is int for s in shape):
            return self.units[0].flops(x, None)
        key = ("unit0", shape, x.device)
        cache = self._flop_cache()
        if key not in cache:
            if len(cache) > 64:
                cache.clear()
            cache[key] = self.units[0].flops(x, None)
        return cache[key]

    def flops_from_num_units(self, x: Tensor, num_units: Tensor, hw: int) -> Tensor:
        """``[B]`` FLOPs of the stage given its final unit counts.

        Unit ``n >= 1`` (and halting branch ``n``) ran where ``num_units > n``, which fixes
        every mask of the loop, so this equals the per-step count.

        Args:
            x: the stage input (its shape gives unit 0's FLOPs).
            num_units: SACT ``[B, H, W]``, ACT ``[B]``: int64 in ``1..U``.
            hw: positions of the stage's feature map.
        """
        if self.mode == "sact":
            from .flops import dilate_mask

            steps = torch.arange(self.num_units, device=num_units.device).view(-1, 1, 1, 1)
            u, (b, h, w) = self.num_units, num_units.shape
            active = (num_units.unsqueeze(0) > steps).view(u, b, -1).sum(2)  # where unit n ran (row 0: everywhere)
            # the 3x3 dilation of {num_units > n} is {dilate(num_units) > n} (a max commutes with a threshold):
            # one max-pool of the unit counts instead of one per unit
            reach = dilate_mask(num_units.unsqueeze(1).to(torch.float32)).squeeze(1)  # [B, H, W]
            dilated = (reach.unsqueeze(0) > steps).view(u, b, -1).sum(2)
            return self.flops_from_counts(x, active, dilated, hw)
        rd, ra, re, hr, hi = self._flop_rates()
        # cum[k]: FLOPs of units 1..k and halting branches 0..k (an image that ran k + 1 units)
        cum, acc = [], 0
        for n in range(self.num_units):
            acc += (rd[n] + ra[n] + re[n] + hr[n]) * hw + hi[n]
            cum.append(acc)
        table = torch.tensor(cum, dtype=torch.long, device=num_units.device)
        return self._unit0_flops(x) + table.index_select(0, num_units.reshape(-1) - 1)
