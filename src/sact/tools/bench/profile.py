"""Where the sparse engine's time goes: a per-stage, per-unit profile of one forward.

The profile does not touch the engine: :class:`ProfilingExecutor` wraps a stage executor
(:class:`~sact.sparse.RowExecutor`, :class:`~sact.sparse.ImageSubsetExecutor`, any
:class:`~sact.stage.StageExecutor`) and times each call the stage loop
(:func:`sact.stage.run_stage`) makes on it and on the :class:`~sact.stage.StageRun` it
returns, with a clock (``time.perf_counter``):

* ``start``: unit 0 at every position (for row executors also the row buffer, the
  neighbour tables and the channel sums);
* ``unit(n)`` for each later unit, with the fraction of positions it runs at;
* ``halting(n)``: the halting branch after unit ``n``;
* ``accumulate(n)`` and ``output()``: the weighted sum of the unit outputs.

Forward hooks on the stages time each stage call as a whole; the **loop remainder** is the
stage time minus the timed calls: the stage loop's own bookkeeping (the halting step,
index sets and masks of the next unit, FLOP counting, the halting distribution). The
forward minus the stages is the stem, the head and the model's glue.

``sact bench --profile`` adds these tables to the benchmark's results;
:func:`profile_sparse` profiles one :class:`~sact.sparse.SparseModel` call.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from ...stage import AdaptiveStage, Executor, StageRun, Where

__all__ = ["ProfilingExecutor", "StageProfiler", "ForwardRecord", "StageRecord", "Profile", "profile_sparse",
           "summarize", "profile_markdown"]

Clock = Callable[[], float]


@dataclass
class StageRecord:
    """Seconds one stage call spent in each part (one forward).

    Attributes:
        total: the whole stage call (forward hooks around the stage module).
        start: the executor's ``start`` (unit 0 and the executor's setup).
        units: ``{n: seconds}`` of ``unit(n)``, ``n >= 1``.
        halting: ``{n: seconds}`` of ``halting(n)``.
        accumulate: ``{n: seconds}`` of ``accumulate(n)``.
        output: ``output()``.
        active: ``{n: fraction}`` of the positions unit ``n`` (and branch ``n``) ran at.
        paths: ``{n: "sparse" | "dense" | ...}`` the row kernel's path, when known.
        whole: the executor's ``run_whole`` (a whole stage in one native call; then
            ``units``/``halting``/``accumulate`` stay empty).
    """

    total: float = 0.0
    start: float = 0.0
    whole: float = 0.0
    units: dict[int, float] = field(default_factory=dict)
    halting: dict[int, float] = field(default_factory=dict)
    accumulate: dict[int, float] = field(default_factory=dict)
    output: float = 0.0
    active: dict[int, float] = field(default_factory=dict)
    paths: dict[int, str] = field(default_factory=dict)

    @property
    def timed(self) -> float:
        """Seconds inside the executor's calls."""
        return self.whole + self.start + sum(self.units.values()) + sum(self.halting.values()) + sum(
            self.accumulate.values()) + self.output

    @property
    def loop(self) -> float:
        """Seconds of the stage loop outside the executor's calls (its bookkeeping)."""
        return self.total - self.timed


@dataclass
class ForwardRecord:
    """One profiled forward: its total and one :class:`StageRecord` per stage."""

    total: float = 0.0
    stages: list[StageRecord] = field(default_factory=list)

    @property
    def outside_stages(self) -> float:
        """Seconds outside the stages: stem, head and the model's glue."""
        return self.total - sum(s.total for s in self.stages)


def _positions(stage: AdaptiveStage, features: Tensor) -> int:
    # SACT positions are B*H*W; ACT positions are images.
    b, _, h, w = features.shape
    return b * h * w if stage.mode == "sact" else b


def _fraction(where: Where, stage: AdaptiveStage, features: Tensor) -> float:
    if where.idx is not None:
        return where.idx.numel() / _positions(stage, features)
    if where.mask is not None:  # a non-compact executor: the mask says where the unit runs
        return float(where.mask.float().mean())
    return 1.0


class _ProfiledRun:
    """A :class:`~sact.stage.StageRun` that times every call on the wrapped run."""

    def __init__(self, run: StageRun, stage: AdaptiveStage, record: StageRecord, clock: Clock) -> None:
        self._run, self._stage, self._rec, self._clock = run, stage, record, clock
        # the loop takes the engine's fused path where the run has one: timed as the accumulation
        self.fused_step = None if getattr(run, "fused_step", None) is None else self._fused_step

    @property
    def compact(self) -> bool:
        return self._run.compact

    @property
    def features(self) -> Tensor:
        return self._run.features

    def unit(self, n: int, where: Where) -> None:
        self._rec.active[n] = _fraction(where, self._stage, self._run.features)
        t0 = self._clock()
        self._run.unit(n, where)
        self._rec.units[n] = self._rec.units.get(n, 0.0) + self._clock() - t0

    def halting(self, n: int, where: Where) -> Tensor:
        t0 = self._clock()
        out = self._run.halting(n, where)
        self._rec.halting[n] = self._rec.halting.get(n, 0.0) + self._clock() - t0
        return out

    def accumulate(self, n: int, weight: Tensor, where: Where) -> None:
        t0 = self._clock()
        self._run.accumulate(n, weight, where)
        self._rec.accumulate[n] = self._rec.accumulate.get(n, 0.0) + self._clock() - t0

    def _fused_step(self, n: int, state, proba, where: Where, dist_n: Tensor, eps: float) -> Tensor:
        """The wrapped run's fused halting step + accumulation, timed as the accumulation."""
        t0 = self._clock()
        idx = self._run.fused_step(n, state, proba, where, dist_n, eps)
        self._rec.accumulate[n] = self._rec.accumulate.get(n, 0.0) + self._clock() - t0
        return idx

    def output(self) -> Tensor:
        t0 = self._clock()
        out = self._run.output()
        self._rec.output += self._clock() - t0
        return out


class ProfilingExecutor(Executor):
    """Wraps a stage executor and times each call the stage loop makes on it.

    Args:
        inner: the executor to time.
        records: where to put the current call's times: ``records()`` returns the
            :class:`StageRecord` of this stage for the forward in progress.
        clock: seconds as a float (default ``time.perf_counter``).
    """

    def __init__(self, inner, *, records: Callable[[], StageRecord], clock: Clock = time.perf_counter) -> None:
        self.inner = inner
        self._records = records
        self._clock = clock

    def run_whole(self, stage: AdaptiveStage, x: Tensor):
        """The inner executor's whole-stage path (if it has one), timed as one call."""
        whole = getattr(self.inner, "run_whole", None)
        if whole is None:
            return None
        rec = self._records()
        t0 = self._clock()
        out = whole(stage, x)
        if out is not None:
            rec.whole += self._clock() - t0
        return out

    def start(self, stage: AdaptiveStage, x: Tensor) -> StageRun:
        rec = self._records()
        t0 = self._clock()
        run = self.inner.start(stage, x)
        rec.start += self._clock() - t0
        return _ProfiledRun(run, stage, rec, self._clock)


class StageProfiler:
    """Records one :class:`ForwardRecord` per forward of ``model`` run with :attr:`executors`.

    Use as a context manager (it installs forward hooks on the stages and removes them on
    exit), then call the model with ``executors=profiler.executors`` inside
    :meth:`forward`::

        with StageProfiler(model, executors) as prof:
            with prof.forward():
                model(x, executors=prof.executors)
        prof.records[-1]

    Args:
        model: an adaptive ResNet (its ``stages`` are timed).
        executors: one per stage, ``None`` for a stage that runs without one (timed as a
            whole only).
        clock: seconds as a float (default ``time.perf_counter``).
    """

    def __init__(self, model: nn.Module, executors: Sequence | None, *, clock: Clock = time.perf_counter) -> None:
        self.model = model
        self.stages = list(model.stages)
        inner = list(executors) if executors is not None else [None] * len(self.stages)
        if len(inner) != len(self.stages):
            raise ValueError(f"got {len(inner)} executors for {len(self.stages)} stages")
        self.clock = clock
        self.records: list[ForwardRecord] = []
        self._current: ForwardRecord | None = None
        self._starts: dict[int, float] = {}
        self._hooks: list = []
        self.executors = [
            None if e is None else ProfilingExecutor(e, records=self._stage_record(i), clock=clock)
            for i, e in enumerate(inner)
        ]

    def _stage_record(self, i: int) -> Callable[[], StageRecord]:
        def get() -> StageRecord:
            if self._current is None:
                raise RuntimeError("a profiled executor ran outside StageProfiler.forward()")
            return self._current.stages[i]

        return get

    def __enter__(self) -> "StageProfiler":
        for i, stage in enumerate(self.stages):
            self._hooks.append(stage.register_forward_pre_hook(self._pre_hook(i)))
            self._hooks.append(stage.register_forward_hook(self._post_hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def _pre_hook(self, i: int):
        def hook(module, args):
            self._starts[i] = self.clock()

        return hook

    def _post_hook(self, i: int):
        def hook(module, args, output):
            if self._current is not None and i in self._starts:
                self._current.stages[i].total += self.clock() - self._starts.pop(i)

        return hook

    @contextmanager
    def forward(self) -> Iterator[ForwardRecord]:
        """Times one forward: run the model inside this context; appends to :attr:`records`."""
        self._current = ForwardRecord(stages=[StageRecord() for _ in self.stages])
        t0 = self.clock()
        try:
            yield self._current
            self._current.total = self.clock() - t0
            self.records.append(self._current)
        finally:
            self._current = None


def _loop_executor(ex):
    """The executor that runs the stage loop (a whole-stage executor's ``fallback``)."""
    return getattr(ex, "fallback", ex) if ex is not None else None


@contextmanager
def _track_paths(executors: Sequence, paths: Callable[[int], dict]) -> Iterator[None]:
    """Record which path (sparse rows / dense view) each row kernel takes.

    Row kernels with a ``run_sparse`` / ``run_dense`` pair get instance-level wrappers for
    the duration (removed on exit); kernels without (the dense masked fallback) are
    labelled by their class. Only the profile's own engine is touched.
    """
    patched = []
    try:
        for i, ex in enumerate(executors):
            for k, kernel in enumerate(getattr(_loop_executor(ex), "unit_kernels", None) or []):
                unit = k + 1
                for name in ("run_sparse", "run_dense"):
                    if not hasattr(type(kernel), name):
                        continue
                    bound = getattr(kernel, name)

                    def wrapped(*args, _f=bound, _i=i, _u=unit, _p=name[4:], **kw):
                        paths(_i)[_u] = _p
                        return _f(*args, **kw)

                    object.__setattr__(kernel, name, wrapped)
                    patched.append((kernel, name))
        yield
    finally:
        for kernel, name in patched:
            kernel.__dict__.pop(name, None)


def _kernel_names(executor) -> dict[int, str]:
    """``{unit: kernel class}`` of a row executor (unit 0 included), when it has row kernels."""
    executor = _loop_executor(executor)
    if executor is None or not hasattr(executor, "unit_kernels"):
        return {}
    names = {k + 1: type(kern).__name__ for k, kern in enumerate(executor.unit_kernels)}
    unit0 = getattr(executor, "unit0", None)
    names[0] = type(unit0).__name__ if unit0 is not None else "module (dense)"
    return names


@dataclass
class Profile:
    """The profiled calls of one engine on one input.

    Attributes:
        records: one :class:`ForwardRecord` per profiled call.
        kernels: per stage, ``{unit: kernel class}`` of a row executor (empty otherwise).
        modes: per stage, its mode.
        output: the :class:`~sact.ModelOutput` of the last profiled call.
    """

    records: list[ForwardRecord]
    kernels: list[dict[int, str]]
    modes: list[str]
    output: object = None


def profile_sparse(sparse: nn.Module, x: Tensor, *, warmup: int = 1, reps: int = 5,
                   clock: Clock = time.perf_counter) -> Profile:
    """Profile ``reps`` calls of a :class:`~sact.sparse.SparseModel` on ``x``.

    The model's own forward runs (``sparse(x)``), with its executors wrapped by
    :class:`ProfilingExecutor` for the duration of the call.

    Args:
        sparse: the engine (``sact.to_sparse(model)``); use one built for profiling, as
            its kernels are wrapped while this runs.
        x: ``[B, C, H, W]`` the input.
        warmup: untimed calls first.
        reps: profiled calls.
        clock: seconds as a float.
    """
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    executors = sparse.stage_executors()
    with torch.no_grad():
        for _ in range(warmup):
            sparse(x)
    prof = StageProfiler(sparse.model, executors, clock=clock)
    out = None
    # SparseModel.forward asks stage_executors() for its executors: hand it the wrapped
    # ones for the duration (an instance attribute, removed afterwards).
    object.__setattr__(sparse, "stage_executors", lambda: prof.executors)
    try:
        with prof, _track_paths(executors, lambda i: prof._current.stages[i].paths), torch.no_grad():
            for _ in range(reps):
                with prof.forward():
                    out = sparse(x)
    finally:
        sparse.__dict__.pop("stage_executors", None)
    return Profile(prof.records, [_kernel_names(e) for e in executors], [s.mode for s in sparse.model.stages], out)


def _med(values) -> float:
    values = list(values)
    return statistics.median(values) if values else 0.0


def summarize(profile: Profile) -> dict:
    """Medians over the profiled calls, in milliseconds, as a JSON-friendly dict.

    Returns:
        ``{"calls", "forward_ms", "parts_ms", "outside_stages_ms", "stages": [{"stage", "mode",
        "total_ms", "unit0_ms", "units_ms", "halting_ms", "accumulate_ms", "loop_ms",
        "per_unit": [{"unit", "active", "kernel", "path", "unit_ms", "halting_ms",
        "accumulate_ms"}]}]}``. Each part is the median over calls of that part (``halting_ms``
        ``None`` for the last unit, which has no branch); ``parts_ms`` is the sum of the
        stage and outside medians, which need not equal the median forward exactly.
    """
    records = profile.records
    if not records:
        raise ValueError("no profiled calls to summarize")
    kernels, modes = profile.kernels, profile.modes
    ms = 1e3
    stages = []
    for i in range(len(records[0].stages)):
        recs = [r.stages[i] for r in records]
        units = sorted(set().union(*(r.units for r in recs), *(r.halting for r in recs), *(r.accumulate for r in recs)))
        per_unit = []
        for n in units:
            paths = {r.paths.get(n) for r in recs} - {None}
            kernel = kernels[i].get(n, "")
            per_unit.append({
                "unit": n,
                "active": _med(r.active.get(n, 1.0) for r in recs),
                "kernel": kernel,
                "path": "/".join(sorted(paths)) if paths else ("unit 0" if n == 0 else ""),
                "unit_ms": ms * _med(r.start if n == 0 else r.units.get(n, 0.0) for r in recs),
                "halting_ms": ms * _med(r.halting[n] for r in recs) if all(n in r.halting for r in recs) else None,
                "accumulate_ms": ms * _med(r.accumulate.get(n, 0.0) for r in recs),
            })
        stages.append({
            "stage": i + 1,
            "mode": modes[i],
            "total_ms": ms * _med(r.total for r in recs),
            "unit0_ms": ms * _med(r.start for r in recs),
            "whole_ms": ms * _med(r.whole for r in recs),
            "units_ms": ms * _med(sum(r.units.values()) for r in recs),
            "halting_ms": ms * _med(sum(r.halting.values()) for r in recs),
            "accumulate_ms": ms * _med(sum(r.accumulate.values()) + r.output for r in recs),
            "loop_ms": ms * _med(r.loop for r in recs),
            "per_unit": per_unit,
        })
    outside = ms * _med(r.outside_stages for r in records)
    return {
        "calls": len(records),
        "forward_ms": ms * _med(r.total for r in records),
        "parts_ms": outside + sum(s["total_ms"] for s in stages),
        "outside_stages_ms": outside,
        "stages": stages,
    }


def profile_markdown(profile: dict, title: str) -> str:
    """Two tables: per stage (where the time goes) and per unit (active fraction, path, times)."""
    parts = profile["parts_ms"] or float("nan")

    def pct(v: float) -> str:
        return f"{100 * v / parts:.0f}%"

    lines = [
        f"#### Profile: {title}",
        "",
        f"Medians over {profile['calls']} profiled calls: forward {profile['forward_ms']:.2f} ms, the medians of "
        f"its parts sum to {parts:.2f} ms (the shares are of this sum). `unit 0` includes the "
        "executor's setup (row buffer, neighbour tables, channel sums); `loop` is the stage time outside the "
        "executor's calls (halting step, index sets and masks, FLOP counting); `native stage`: the whole stage "
        "in one native call (CIFAR units; its own per-unit profile: `NativeBasicStage.profile`).",
        "",
        "| stage | total ms (share) | native stage | unit 0 | units 1.. | halting | accumulation | loop |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in profile["stages"]:
        lines.append(
            f"| {s['stage']} ({s['mode']}) | {s['total_ms']:.2f} ({pct(s['total_ms'])}) | {s.get('whole_ms', 0.0):.2f} | "
            f"{s['unit0_ms']:.2f} | {s['units_ms']:.2f} | {s['halting_ms']:.2f} | {s['accumulate_ms']:.2f} | "
            f"{s['loop_ms']:.2f} |")
    lines.append(f"| stem, head, glue | {profile['outside_stages_ms']:.2f} ({pct(profile['outside_stages_ms'])}) "
                 "| | | | | | |")
    lines += ["", "| stage | unit | active | kernel | path | unit ms | halting ms | accumulation ms |",
              "|---|---|---|---|---|---|---|---|"]
    for s in profile["stages"]:
        for u in s["per_unit"]:
            lines.append(f"| {s['stage']} | {u['unit']} | {u['active']:.2f} | {u['kernel']} | {u['path']} | "
                         f"{u['unit_ms']:.3f} | {'-' if u['halting_ms'] is None else format(u['halting_ms'], '.3f')} | "
                         f"{u['accumulate_ms']:.3f} |")
    return "\n".join(lines) + "\n"
