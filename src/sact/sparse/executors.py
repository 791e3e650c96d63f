"""Sparse executors: where the stage loop's steps run at inference.

The loop itself is :func:`sact.stage.run_stage`; these executors only decide *where* a
unit, a halting branch and the accumulation of the stage output run:

* :class:`RowExecutor` (SACT): the stage's features are one flat channels-last row buffer
  (:mod:`sact.sparse.rows`); a unit runs at the still-active rows (its first convolution
  at their 3x3-dilated set), the halting branch at the active rows, and the output
  ``sum_n p^n x^n`` is accumulated at the active rows only;
* :class:`ImageSubsetExecutor` (ACT): later units run on the sub-batch of images still
  running.

Both are compact (:attr:`sact.stage.StageRun.compact`): the loop hands them the indices
of the running positions and applies the halting recurrence to those positions only
(halted positions never change again, so the values are those of the dense loop).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from ..stage import AdaptiveStage, DenseRun, Executor, StageRun, Where
from . import native
from .refs import keep_ref
from .halting_kernels import make_halting_kernel
from .native_stage import NativeBasicStage
from .rows import image_index, neighbour_table, rows_view
from .rowset import Geometry, RowSet
from .unit_kernels import RowBottleneck0, RowPreActBottleneck0, make_unit_kernel

__all__ = ["RowExecutor", "ImageSubsetExecutor", "NativeStageExecutor", "StageBackend", "register_backend", "backends",
           "make_executor"]


class _RowRun:
    """One SACT stage call on a row buffer ``X`` ``(N + 1, C)`` (last row zero)."""

    compact = True
    fused_step = None  # set below where the native fused step applies

    def __init__(self, ex: "RowExecutor", stage: AdaptiveStage, x: Tensor) -> None:
        self.ex = ex
        if ex.unit0 is not None:
            X = ex.unit0(x, poison=ex.poison)  # rows (N + 1, C), last row zero
            s = stage.units[0].stride
            b, h, w = x.shape[0], (x.shape[-2] - 1) // s + 1, (x.shape[-1] - 1) // s + 1
        else:
            x0 = stage.units[0](x)
            b, c, h, w = x0.shape
            X = x0.new_empty(b * h * w + 1, c)
            X[-1].zero_()
            rows_view(X, b, h, w).copy_(x0)
            del x0
        self.X = X
        dev = X.device
        self.geo = Geometry(b, h, w, X.shape[1], neighbour_table(b, h, w, dev), image_index(b, h, w, dev),
                            ex.chunk_rows, ex.poison, native.use_for(X))
        acc = torch.float32 if X.dtype in (torch.float16, torch.bfloat16) else X.dtype
        # [B, C] running channel sums (the halting branches' global term), kept by the unit kernels
        self.S = X[: self.geo.n].view(b, h * w, -1).sum(1, dtype=acc)
        self.O: Tensor | None = None  # stage output rows
        self._everything: RowSet | None = None
        if self.geo.native and ex.fused_step:
            self.fused_step = self._fused_step  # the loop's step + accumulation, fused natively

    @property
    def features(self) -> Tensor:
        g = self.geo
        return rows_view(self.X, g.batch, g.height, g.width)

    def _rows(self, where: Where) -> RowSet:
        if where.idx is None:
            if self._everything is None:
                self._everything = RowSet.everything(self.geo, self.X.device)
            return self._everything
        rows = where.shared.get("rows")  # the unit and the branch after it share one set
        if rows is None:
            rows = where.shared["rows"] = RowSet(where.idx, self.geo, False, where.mask)
        return rows

    def unit(self, n: int, where: Where) -> None:
        self.ex.unit_kernels[n - 1].run(self.X, self.S, self._rows(where))

    def halting(self, n: int, where: Where) -> Tensor:
        rows = self._rows(where)
        if rows.idx.numel() == 0:
            return self.X.new_empty(0)
        h = self.ex.halting_kernels[n].run(self.X, self.S, rows)
        g = self.geo
        return h.view(g.batch, g.height, g.width) if where.idx is None else h

    def accumulate(self, n: int, weight: Tensor, where: Where) -> None:
        X, g = self.X, self.geo
        w = weight.reshape(-1).to(X.dtype)
        if where.idx is None:
            if self.O is None:
                self.O = torch.mul(X[: g.n], w.unsqueeze(1), out=g.scratch(g.n, X.shape[1], X))
            else:
                self.O.addcmul_(X[: g.n], w.unsqueeze(1))
        elif where.idx.numel():
            if g.native:
                native.accumulate_rows(self.O, X, where.idx, w)
            else:
                self.O.index_add_(0, where.idx, X.index_select(0, where.idx).mul_(w.unsqueeze(1)))

    def output(self) -> Tensor:
        g = self.geo
        return self.O.view(g.batch, g.height, g.width, -1).permute(0, 3, 1, 2)

    def _fused_step(self, n: int, state, proba: Tensor | None, where: Where, dist_n: Tensor, eps: float) -> Tensor:
        """The loop's halting step, accumulation and next index set in one native call (CPU)."""
        X, g = self.X, self.geo
        if self.O is None:
            self.O = g.scratch(g.n, X.shape[1], X)
        p = None if proba is None else proba.reshape(-1)
        return native.halting_step_rows(state, dist_n.view(-1), self.O, X, where.idx, p, eps, first=n == 0)


class RowExecutor(nn.Module, Executor):
    """SACT stages on a row buffer: units and halting branches at the active rows only.

    Known units and branches get row kernels with batch norm folded
    (:mod:`sact.sparse.unit_kernels`, :mod:`sact.sparse.halting_kernels`); any other unit
    or branch runs densely masked on the buffer's view (exact, no speed-up).

    Args:
        stage: a SACT stage (its modules are shared, not copied).
        dense_above: active fraction above which a unit runs densely (see :func:`sact.to_sparse`).
        chunk_rows: rows per chunk of the fused loops.
        poison: NaN-fill scratch buffers before use.
    """

    def __init__(self, stage: AdaptiveStage, *, dense_above=None, chunk_rows: int = 768, poison: bool = False) -> None:
        super().__init__()
        if stage.mode != "sact":
            raise ValueError(f"RowExecutor runs SACT stages, got mode {stage.mode!r}")
        keep_ref(self, "stage", stage)
        self.chunk_rows = chunk_rows
        self.poison = poison
        #: use the native fused halting step (CPU, native kernels loaded); False: the generic loop
        self.fused_step = True
        self.unit_kernels = nn.ModuleList(make_unit_kernel(u, dense_above=dense_above) for u in stage.units[1:])
        self.halting_kernels = nn.ModuleList(make_halting_kernel(b) for b in stage.halting)
        u0 = stage.units[0]
        self.unit0 = next((cls(u0) for cls in (RowBottleneck0, RowPreActBottleneck0) if cls.supports(u0)), None)

    def refresh(self) -> None:
        """Re-fold batch norms after the stage's weights changed."""
        for k in list(self.unit_kernels) + list(self.halting_kernels) + [self.unit0]:
            if k is not None:
                k.refresh()

    def start(self, stage: AdaptiveStage, x: Tensor) -> StageRun:
        if stage is not self.stage:
            raise ValueError("this executor was built for another stage")
        return _RowRun(self, stage, x)


class _ImageRun(DenseRun):
    """One ACT stage call: later units on the images still running (unit 0 and the
    features as the dense run's)."""

    compact = True

    def unit(self, n: int, where: Where) -> None:
        idx, unit = where.idx, self.stage.units[n]
        if idx is None:
            self.x = unit(self.x)
        elif idx.numel():
            self.x = self.x.index_copy(0, idx, unit(self.x.index_select(0, idx)))

    def halting(self, n: int, where: Where) -> Tensor:
        idx, branch = where.idx, self.stage.halting[n]
        if idx is None:
            return branch(self.x)
        return branch(self.x.index_select(0, idx)) if idx.numel() else self.x.new_empty(0)

    def accumulate(self, n: int, weight: Tensor, where: Where) -> None:
        w = weight.to(self.x.dtype).view(-1, 1, 1, 1)
        if where.idx is None:
            self.out = w * self.x if self.out is None else self.out.add_(w * self.x)
        elif where.idx.numel():
            self.out.index_add_(0, where.idx, w * self.x.index_select(0, where.idx))

    def output(self) -> Tensor:
        return self.out


class ImageSubsetExecutor(nn.Module, Executor):
    """ACT stages: unit ``n >= 1`` and its halting branch run on the sub-batch of running images."""

    def __init__(self, stage: AdaptiveStage) -> None:
        super().__init__()
        if stage.mode != "act":
            raise ValueError(f"ImageSubsetExecutor runs ACT stages, got mode {stage.mode!r}")
        keep_ref(self, "stage", stage)

    def refresh(self) -> None:
        """Nothing is folded."""

    def start(self, stage: AdaptiveStage, x: Tensor) -> StageRun:
        return _ImageRun(stage, x)


class NativeStageExecutor(nn.Module, Executor):
    """A whole stage in one native call (:class:`~sact.sparse.native_stage.NativeBasicStage`,
    the CIFAR pre-activation units), with a loop executor for inputs it does not take.

    ``run_whole`` is the accelerated copy of the stage loop (CPU, float32 / float64, native
    kernels built and enabled); anything else (CUDA, bfloat16, no compiler) runs the loop
    with ``fallback`` (:class:`RowExecutor` or :class:`ImageSubsetExecutor`).
    """

    def __init__(self, stage: AdaptiveStage, fallback: nn.Module, *, poison: bool = False) -> None:
        super().__init__()
        keep_ref(self, "stage", stage)
        self.native = NativeBasicStage(stage)
        self.fallback = fallback
        self.poison = poison

    @property
    def poison(self) -> bool:
        return self.native.poison

    @poison.setter
    def poison(self, value: bool) -> None:
        self.native.poison = bool(value)
        if hasattr(self.fallback, "poison"):
            self.fallback.poison = bool(value)

    def refresh(self) -> None:
        """Re-fold after the stage's weights changed."""
        self.native.refresh()
        self.fallback.refresh()

    def run_whole(self, stage: AdaptiveStage, x: Tensor):
        if x.dtype in (torch.float32, torch.float64) and native.use_for(x):
            return self.native(x)
        return None

    def start(self, stage: AdaptiveStage, x: Tensor) -> StageRun:
        return self.fallback.start(stage, x)


@dataclass(frozen=True)
class StageBackend:
    """A whole-stage backend: an executor whose ``run_whole`` runs the stages it ``supports``
    in one call, falling back to the loop executor for the inputs it does not take.

    Attributes:
        name: what it is called (``register_backend`` replaces a backend of the same name).
        supports: ``supports(stage) -> bool``, decided once when the engine is built.
        build: ``build(stage, fallback, poison=...) -> Executor`` (``fallback``: the loop
            executor of the stage, :class:`RowExecutor` or :class:`ImageSubsetExecutor`).
    """

    name: str
    supports: Callable[[AdaptiveStage], bool]
    build: Callable[..., Executor]


#: whole-stage backends, tried in order: the first that supports a stage wraps its executor
_BACKENDS: list[StageBackend] = []


def register_backend(backend: StageBackend, *, first: bool = False) -> None:
    """Adds a whole-stage backend (e.g. another device's kernels) without editing the engine."""
    _BACKENDS[:] = [b for b in _BACKENDS if b.name != backend.name]
    _BACKENDS.insert(0 if first else len(_BACKENDS), backend)


def backends() -> list[StageBackend]:
    """The registered whole-stage backends, in the order they are tried."""
    return list(_BACKENDS)


register_backend(StageBackend("native-cifar", NativeBasicStage.supports, NativeStageExecutor))


def make_executor(stage: AdaptiveStage, *, dense_above=None, chunk_rows: int = 768, poison: bool = False) -> nn.Module | None:
    """The sparse executor of ``stage`` (``None`` for vanilla stages: they run densely): the
    loop executor of its mode, wrapped by the first registered backend that supports it."""
    if stage.mode == "sact":
        ex = RowExecutor(stage, dense_above=dense_above, chunk_rows=chunk_rows, poison=poison)
    elif stage.mode == "act":
        ex = ImageSubsetExecutor(stage)
    else:
        return None
    backend = next((b for b in _BACKENDS if b.supports(stage)), None)
    return ex if backend is None else backend.build(stage, ex, poison=poison)
