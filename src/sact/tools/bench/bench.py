"""Speed benchmark of the sparse engine against the vanilla network and the dense SACT model.

Each row times four variants side by side in one process, interleaved (one call of each
per round, the order rotating from round to round), after a warm-up, over ``R`` rounds:

* ``vanilla_nchw``: the vanilla network (same unit weights), NCHW;
* ``vanilla_cl``: the same network and input channels-last (the conversion is timed);
* ``dense_sact``: the SACT model computed densely with masks (``model(x)``);
* ``sparse``: the engine (``sact.to_sparse(model)(x)``).

The baseline is the faster vanilla variant by median wall time over the rounds (the
report says which). Per round the ratios ``t_sparse / t_baseline`` and
``t_sparse / t_dense_sact`` are taken; the report gives their median, interquartile range
and min-max over rounds, and the efficiency

    E = (1 - t_sparse / t_vanilla) / (1 - F_sparse / F_vanilla)

from the median ratio (its range from the min-max ratios), and the same against the dense
SACT model with ``F`` of the same model when nothing halts. Before timing, the row checks
that the engine's FLOPs and halting maps equal the dense model's and reports the largest
logit difference.

Rows: the ImageNet ResNets at 224 px and the CIFAR ResNets at 32 px with imposed object
halting at target FLOP ratios plus "nothing halts" (:mod:`sact.tools.bench.workloads`), and a
trained checkpoint on real Cluttered Fashion-MNIST test canvases (``--checkpoint``).
``--profile`` adds where the engine's time goes (:mod:`sact.tools.bench.profile`).

**Against the runtimes** (``--runtimes``, default ``auto``: those installed): after the rows
of one model, image side and batch size, the plain network (same weights) exported to ONNX
runs in ONNX Runtime and OpenVINO beside PyTorch eager and the engine at each of the group's
halting levels, every contender in its own worker process, rounds interleaved
(:mod:`sact.tools.bench.runtimes`); with ``--profile`` also OpenVINO's per-layer times per
residual unit beside the engine's.

Results: ``OUT/sparse_speed[_TAG].json`` and ``.md`` (``OUT`` = ``./sact_bench`` unless
``--out``), rewritten atomically after every row; an existing result is never replaced
unless ``--overwrite``. Run ``sact bench`` (:mod:`sact.commands.bench` parses its flags into
:class:`BenchSettings` and calls :func:`run_bench`) or ``python -m sact.tools.bench``.
"""

from __future__ import annotations

import copy
import gc
import itertools
import math
import os
import platform
import re
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ..._version import __version__
from ...io.files import atomic_write_bytes, dumps_json
from ...errors import InputError, RunFailure, SactError
from ...sparse import native
from ...sparse.model import to_sparse
from .profile import profile_markdown, profile_sparse, summarize
from .runtimes import (
    OUTPUT_RTOL,
    Contender,
    export_plain,
    gflops_per_second,
    max_rel_diff,
    onnx_units,
    openvino_units,
    resolve_runtimes,
    runtime_versions,
    temporary_folder,
    time_workers,
)
from .workloads import (
    TrainedModel,
    calibrate_radius,
    impose_no_halting,
    load_trained,
    object_inputs,
    object_model,
    vanilla_twin,
)

__all__ = ["Workload", "BenchOptions", "BenchSettings", "BenchError", "FULL_GRID", "QUICK_GRID", "TRAINED",
           "select_workloads", "run_bench", "run_benchmark", "run_break_even", "spread", "efficiency", "ratio_summary",
           "time_rounds", "markdown", "environment", "measure_runtimes", "raise_failed_checks"]

IMAGENET_MODELS = ("resnet50", "resnet101", "resnet50_v2", "resnet101_v2")
CIFAR_MODELS = ("resnet32_cifar", "resnet110_cifar")
#: FLOP ratios (vs the vanilla network) the imposed halting is calibrated to.
IMAGENET_TARGETS = (0.45, 0.6, 0.75)
CIFAR_TARGETS = (0.3, 0.5, 0.7)
#: (model, image side, batch sizes, halting: None = nothing halts, else a target FLOP ratio)
FULL_GRID = tuple((m, 224, (1, 8), (None, *IMAGENET_TARGETS)) for m in IMAGENET_MODELS) + tuple(
    (m, 32, (1, 16), (None, *CIFAR_TARGETS)) for m in CIFAR_MODELS)
QUICK_GRID = (("resnet50", 224, (1,), (None, 0.6)), ("resnet32_cifar", 32, (1,), (None, 0.5)))
#: Name of the rows of a trained checkpoint (``--checkpoint``), and their batch sizes.
TRAINED = "trained"
TRAINED_BATCHES = (1, 8)
VARIANTS = ("vanilla_nchw", "vanilla_cl", "dense_sact", "sparse")
MALLOC_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
#: A FLOP ratio this close to 1 has no efficiency (nothing to save).
FLAT = 5e-3
FORMAT = "sact-sparse-bench"


class BenchError(InputError):
    """A benchmark request that cannot run (bad settings, a result file in the way): exit 2."""


@dataclass(frozen=True)
class Workload:
    """One row: a model, an input size, a batch size and the halting.

    Attributes:
        model: registry name, or ``"trained"`` for the checkpoint's rows.
        image_size: input side.
        batch: images per call.
        flop_target: imposed object halting calibrated to this FLOP ratio vs vanilla;
            ``None``: nothing halts (trained rows: the model's own halting).
        model_kwargs: registry keyword arguments as ``(name, value)`` pairs.
    """

    model: str
    image_size: int
    batch: int
    flop_target: float | None = None
    model_kwargs: tuple[tuple[str, Any], ...] = ()

    @property
    def halting(self) -> str:
        """``"learned"`` (trained rows), ``"none"`` or ``"object"``."""
        if self.model == TRAINED:
            return "learned"
        return "none" if self.flop_target is None else "object"


@dataclass(kw_only=True)
class BenchOptions:
    """How to run the benchmark.

    Attributes:
        reps: timed rounds per row (each round calls every variant once).
        warmup: untimed rounds first.
        threads: torch intra-op threads during the run (restored afterwards).
        out: folder of the result files.
        stem: result file name without suffix (``sparse_speed`` or ``sparse_speed_TAG``).
        overwrite: replace existing result files of the same name.
        profile: add the per-unit profile of the engine to every row.
        seed: seed of the synthetic inputs.
        progress: a tqdm progress bar on stderr.
        command: the command line, recorded in the results.
        runtimes: runtimes to time the plain network in, per group of rows, each contender
            in its own process (:func:`measure_runtimes`); empty: none.
    """

    reps: int = 10
    warmup: int = 2
    threads: int = 2
    out: Path = Path("sact_bench")
    stem: str = "sparse_speed"
    overwrite: bool = False
    profile: bool = False
    seed: int = 0
    progress: bool = True
    command: str = ""
    runtimes: Sequence[str] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.reps, int) or self.reps < 1:
            raise ValueError(f"reps must be a positive int, got {self.reps!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be a non-negative int, got {self.warmup!r}")
        if not isinstance(self.threads, int) or self.threads < 1:
            raise ValueError(f"threads must be a positive int, got {self.threads!r}")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.stem or ""):
            raise ValueError(f"stem must be letters, digits, '_', '.', '-', got {self.stem!r}")
        self.out = Path(self.out)

    @property
    def paths(self) -> tuple[Path, Path]:
        """``(json, md)`` result files."""
        return self.out / f"{self.stem}.json", self.out / f"{self.stem}.md"


@dataclass(kw_only=True)
class BenchSettings:
    """What ``sact bench`` asks for: one field per flag (``--no-progress`` is ``progress=False``).

    Checked when built; a bad value raises :class:`BenchError` naming the flag.

    Attributes:
        quick: the short grid, 3 rounds and 1 warm-up round unless ``reps`` / ``warmup``.
        models: only these models (``"trained"``: the ``checkpoint`` rows); ``None``: all.
        batch: only these batch sizes; ``None``: all (trained rows: 1 and 8; break-even: 1 and 8).
        threads: torch intra-op threads.
        reps: timed rounds per row; ``None``: 10 (``quick``: 3).
        warmup: untimed rounds first; ``None``: 2 (``quick``: 1).
        checkpoint: a trained ACT / SACT checkpoint, for rows on its own test canvases.
        data_dir: the Fashion-MNIST folder of the ``checkpoint`` rows.
        out: folder of the result files.
        tag: result files ``sparse_speed_TAG`` / ``break_even_TAG``; ``None``: ``sparse_speed``
            (``sparse_speed_quick`` with ``quick``) / ``break_even``.
        overwrite: replace result files of the same name.
        profile: add the per-stage, per-unit profile of the engine to every row.
        break_even: instead of the rows, the break-even active fraction of each unit kernel.
        seed: seed of the synthetic inputs.
        progress: a progress bar and one line per row on stderr.
        command: the command line, recorded in the results.
        runtimes: ``["auto"]`` (the installed ones of ONNX Runtime and OpenVINO), ``["none"]``,
            or names (``onnxruntime``, ``openvino``); a missing one is skipped with a warning.
    """

    quick: bool = False
    models: Sequence[str] | None = None
    batch: Sequence[int] | None = None
    threads: int = 2
    reps: int | None = None
    warmup: int | None = None
    checkpoint: str | Path | None = None
    data_dir: str | Path | None = None
    out: str | Path = "sact_bench"
    tag: str | None = None
    overwrite: bool = False
    profile: bool = False
    break_even: bool = False
    seed: int = 0
    progress: bool = True
    command: str = ""
    runtimes: Sequence[str] = ("auto",)

    def __post_init__(self) -> None:
        try:
            resolve_runtimes(self.runtimes)
        except ValueError as e:
            raise BenchError(f"--runtimes: {e}") from e
        if self.batch is not None and min(self.batch) < 1:
            raise BenchError(f"--batch sizes must be positive, got {self.batch}")
        for flag, value, low in (("--reps", self.reps, 1), ("--warmup", self.warmup, 0),
                                 ("--threads", self.threads, 1)):
            if value is not None and value < low:
                raise BenchError(f"{flag} must be at least {low}, got {value}")
        if self.tag is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.tag):
            raise BenchError(f"--tag must be letters, digits, '_', '.' or '-' (a file name), got {self.tag!r}")
        if self.models is not None and TRAINED in self.models and not self.checkpoint:
            raise BenchError(f"--models {TRAINED} needs --checkpoint")

    def options(self) -> BenchOptions:
        """The run's :class:`BenchOptions` (rounds, result file names)."""
        reps = self.reps if self.reps is not None else (3 if self.quick else 10)
        warmup = self.warmup if self.warmup is not None else (1 if self.quick else 2)
        base = "break_even" if self.break_even else "sparse_speed"
        stem = base + (f"_{self.tag}" if self.tag else ("_quick" if self.quick else ""))
        return BenchOptions(reps=reps, warmup=warmup, threads=self.threads, out=Path(self.out), stem=stem,
                            overwrite=self.overwrite, profile=self.profile, seed=self.seed, progress=self.progress,
                            command=self.command, runtimes=tuple(resolve_runtimes(self.runtimes)[0]))


# ---------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------


def select_workloads(*, quick: bool = False, models: Sequence[str] | None = None,
                     batches: Sequence[int] | None = None, trained_size: int | None = None) -> list[Workload]:
    """The rows of the full (or quick) grid, filtered by model and batch size.

    Args:
        quick: the short grid.
        models: keep these models (``"trained"``: the checkpoint's rows); ``None``: all.
        batches: keep these batch sizes (trained rows: these instead of 1 and 8); ``None``: all.
        trained_size: canvas side of the checkpoint's rows; ``None``: no trained rows.
    """
    rows = [
        Workload(name, size, b, t)
        for name, size, bs, targets in (QUICK_GRID if quick else FULL_GRID)
        if models is None or name in models
        for b in bs
        if batches is None or b in batches
        for t in targets
    ]
    if trained_size is not None and (models is None or TRAINED in models):
        rows += [Workload(TRAINED, trained_size, b) for b in (batches or TRAINED_BATCHES)]
    return rows


@dataclass
class _Variants:
    """The timed callables' models for one model (shared by its rows)."""

    dense: nn.Module  # the SACT model, dense masked
    sparse: nn.Module
    full: nn.Module  # the same network when nothing halts (for F_full)
    vanilla: nn.Module
    vanilla_cl: nn.Module


def _variants(dense: nn.Module, full: nn.Module, vanilla: nn.Module) -> _Variants:
    vanilla_cl = copy.deepcopy(vanilla).to(memory_format=torch.channels_last)
    return _Variants(dense, to_sparse(dense), full, vanilla, vanilla_cl)


class _ModelCache:
    """Builds the variants of one model at a time (rows come grouped by model)."""

    def __init__(self, trained: TrainedModel | None) -> None:
        self.trained = trained
        self.key = None
        self.value: dict[str, _Variants] = {}

    def get(self, wl: Workload) -> dict[str, _Variants]:
        key = (wl.model, wl.model_kwargs)
        if key != self.key:
            self.key, self.value = None, {}
            gc.collect()
            if wl.model == TRAINED:
                model = self.trained.model
                full = impose_no_halting(copy.deepcopy(model)).eval()
                self.value = {"learned": _variants(model, full, vanilla_twin(model))}
            else:
                obj, full = object_model(wl.model, image_size=wl.image_size, **dict(wl.model_kwargs))
                vanilla = vanilla_twin(full)
                self.value = {"object": _variants(obj, full, vanilla), "none": _variants(full, full, vanilla)}
            self.key = key
        return self.value


def _inputs(wl: Workload, v: _Variants, trained: TrainedModel | None, seed: int) -> tuple[Tensor, float | None]:
    """``(x, radius)``: the row's input (radius of the calibrated disc, if any)."""
    if wl.model == TRAINED:
        if wl.batch > trained.images.shape[0]:
            raise BenchError(f"batch {wl.batch} exceeds the {trained.images.shape[0]} canvases drawn")
        return trained.images[: wl.batch].contiguous(), None
    in_chans = v.dense.in_chans
    if wl.flop_target is None:
        return object_inputs(wl.batch, wl.image_size, None, in_chans=in_chans, seed=seed)[0], None
    with torch.no_grad():
        f_vanilla = v.vanilla(torch.zeros(wl.batch, in_chans, wl.image_size, wl.image_size)).flops.double().sum().item()

        def ratio(r: float) -> float:
            x = object_inputs(wl.batch, wl.image_size, r, in_chans=in_chans, seed=seed)[0]
            return v.sparse(x).flops.double().sum().item() / f_vanilla

        radius, _ = calibrate_radius(ratio, wl.flop_target)
    return object_inputs(wl.batch, wl.image_size, radius, in_chans=in_chans, seed=seed)[0], radius


# ---------------------------------------------------------------------------------------
# Timing and statistics
# ---------------------------------------------------------------------------------------


def time_rounds(fns: dict[str, Callable[[], object]], *, warmup: int, reps: int,
                clock: Callable[[], float] = time.perf_counter,
                ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Call every function once per round, ``warmup`` untimed rounds then ``reps`` timed ones.

    The order rotates by one each round (A B C, B C A, C A B, ...), so no variant always
    runs first or after the same neighbour.

    Returns:
        ``(wall, cpu)``: ``{name: [seconds per round]}`` of wall-clock and process CPU time.
    """
    names = list(fns)
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    with torch.no_grad():
        for _ in range(warmup):
            for k in names:
                fns[k]()
        for r in range(reps):
            s = r % len(names)
            for k in names[s:] + names[:s]:
                w0, c0 = clock(), time.process_time()
                fns[k]()
                wall[k].append(clock() - w0)
                cpu[k].append(time.process_time() - c0)
    return wall, cpu


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, quartiles (inclusive method) and min-max of ``values``."""
    v = [float(x) for x in values]
    if not v:
        raise ValueError("spread of no values")
    q25, _, q75 = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else (v[0], v[0], v[0])
    return {"median": statistics.median(v), "q25": q25, "q75": q75, "min": min(v), "max": max(v)}


def efficiency(time_ratio: float, flop_ratio: float) -> float | None:
    """``E = (1 - time_ratio) / (1 - flop_ratio)``; ``None`` when ``flop_ratio >= 0.995`` (nothing saved)."""
    if flop_ratio >= 1.0 - FLAT:
        return None
    return (1.0 - time_ratio) / (1.0 - flop_ratio)


def ratio_summary(num: Sequence[float], den: Sequence[float], flop_ratio: float) -> dict:
    """Per-round ratios ``num[r] / den[r]``: their spread and the efficiency from it.

    Returns:
        ``{"ratio": spread, "rounds": [ratios], "e": {"median", "iqr": [lo, hi], "range": [lo, hi]}}``;
        ``e`` is ``None`` when the FLOP ratio is about 1. ``E`` falls as the ratio grows,
        so its low end comes from the high ratio.
    """
    if len(num) != len(den) or not num:
        raise ValueError(f"need as many numerators as denominators, got {len(num)} and {len(den)}")
    ratios = [n / d for n, d in zip(num, den)]
    s = spread(ratios)
    e = None
    if efficiency(s["median"], flop_ratio) is not None:
        e = {"median": efficiency(s["median"], flop_ratio),
             "iqr": [efficiency(s["q75"], flop_ratio), efficiency(s["q25"], flop_ratio)],
             "range": [efficiency(s["max"], flop_ratio), efficiency(s["min"], flop_ratio)]}
    return {"ratio": s, "rounds": ratios, "e": e}


# ---------------------------------------------------------------------------------------
# One row
# ---------------------------------------------------------------------------------------


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _checks(dense_out, sparse_out) -> dict:
    flops_equal = torch.equal(dense_out.flops, sparse_out.flops)
    maps_equal = all(torch.equal(a.num_units, b.num_units) for a, b in zip(dense_out.stages, sparse_out.stages))
    diff = (dense_out.logits.double() - sparse_out.logits.double()).abs().max().item()
    scale = dense_out.logits.double().abs().max().item()
    agree = (dense_out.logits.argmax(1) == sparse_out.logits.argmax(1)).double().mean().item()
    return {"flops_equal": flops_equal, "num_units_equal": maps_equal, "logits_max_abs_diff": diff,
            "logits_max_abs": scale, "top1_agreement": agree, "ok": bool(flops_equal and maps_equal)}


def measure_row(wl: Workload, v: _Variants, x: Tensor, *, options: BenchOptions) -> dict:
    """Check and time one row (see the module docstring); returns its JSON-friendly dict."""
    load_start = _loadavg()
    with torch.no_grad():
        dense_out, sparse_out = v.dense(x), v.sparse(x)
        f_vanilla = v.vanilla(x).flops.double().mean().item()
        f_full = (dense_out if v.full is v.dense else v.full(x)).flops.double().mean().item()
    checks = _checks(dense_out, sparse_out)
    f_sparse = sparse_out.flops.double().mean().item()
    f_vs_vanilla, f_vs_full = f_sparse / f_vanilla, f_sparse / f_full
    del dense_out, sparse_out
    fns = {
        "vanilla_nchw": lambda: v.vanilla(x),
        "vanilla_cl": lambda: v.vanilla_cl(x.contiguous(memory_format=torch.channels_last)),
        "dense_sact": lambda: v.dense(x),
        "sparse": lambda: v.sparse(x),
    }
    wall, cpu = time_rounds(fns, warmup=options.warmup, reps=options.reps)
    medians = {k: statistics.median(t) for k, t in wall.items()}
    baseline = min(("vanilla_nchw", "vanilla_cl"), key=lambda k: medians[k])
    row = {
        "model": wl.model,
        "image": wl.image_size,
        "batch": wl.batch,
        "halting": wl.halting,
        "flop_target": wl.flop_target,
        "flops": {"sparse": f_sparse, "vanilla": f_vanilla, "no_halt": f_full},
        "flop_ratio_vs_vanilla": f_vs_vanilla,
        "flop_ratio_vs_no_halt": f_vs_full,
        "checks": checks,
        "rounds": options.reps,
        "ms": {k: {key: 1e3 * val for key, val in spread(t).items()} for k, t in wall.items()},
        "cpu_ms": {k: 1e3 * statistics.median(t) for k, t in cpu.items()},
        "rounds_ms": {k: [1e3 * s for s in t] for k, t in wall.items()},
        "baseline": baseline,
        "vs_vanilla": ratio_summary(wall["sparse"], wall[baseline], f_vs_vanilla),
        "vs_dense_sact": ratio_summary(wall["sparse"], wall["dense_sact"], f_vs_full),
        "loadavg_start": load_start,
    }
    if options.profile:
        row["profile"] = summarize(profile_sparse(to_sparse(v.dense), x, warmup=1, reps=options.reps))
    row["loadavg_end"] = _loadavg()
    return row


def _label(row: dict) -> str:
    """``none``, ``object 0.45`` or ``learned``: the halting of a row (or of a sparse contender entry)."""
    return f"object {row['flop_target']:.2f}" if row["halting"] == "object" else row["halting"]


def _stage_names(model: nn.Module) -> list[str]:
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(st)] for st in model.stages]


def measure_runtimes(group: Sequence[tuple[_Variants, Tensor, dict]], onnx_path: Path, *,
                     options: BenchOptions) -> dict:
    """Time the plain network in PyTorch and the runtimes beside the engine, each in its own process.

    Args:
        group: the rows of one model, image side and batch size: ``(variants, input, row)``
            as measured by :func:`measure_row` (the same vanilla network in all).
        onnx_path: that vanilla network exported to ONNX.
        options: rounds, warm-up, threads, runtimes, profile.

    Returns:
        ``{"model", "image", "batch", "contenders": {name: {"kind", "pid", "calls", "warmup_rounds", "ms",
        "rounds_ms", "gflops"}}, "best", "output_checks", "flops_plain", "sparse": [{"name",
        "halting", "flop_target", "flop_ratio", "vs_best"}], "units", "bench_pid", "loadavg_*"}``.
        ``best``: the plain contender (PyTorch or a runtime) with the lowest median;
        ``vs_best``: :func:`ratio_summary` of the sparse rounds over the best's rounds;
        ``units`` (``--profile`` with OpenVINO): OpenVINO's and the engine's ms per unit.
    """
    from tqdm import tqdm

    load_start = _loadavg()
    v0, x0, row0 = group[0]
    wl = (row0["model"], row0["image"], row0["batch"])
    contenders = [Contender.from_module("torch", "torch", v0.vanilla, x0)]
    contenders += [Contender.from_module(f"sparse {_label(r)}", "sparse", v.dense, x) for v, x, r in group]
    contenders += [Contender(rt, rt, x0.numpy(), path=str(onnx_path)) for rt in options.runtimes]
    profile_layers = options.profile and "openvino" in options.runtimes
    with tqdm(total=options.reps, desc=f"{wl[0]} b{wl[2]} vs runtimes", file=sys.stderr, leave=False,
              disable=not options.progress) as bar:
        workers = time_workers(contenders, threads=options.threads, rounds=options.reps, warmup=options.warmup,
                               layers={"openvino": options.reps} if profile_layers else None,
                               progress=bar.update)
    by_name = {w.contender.name: w for w in workers}
    f_plain = row0["flops"]["vanilla"]
    flops = {w.contender.name: f_plain for w in workers if w.contender.kind != "sparse"}
    flops.update({f"sparse {_label(r)}": r["flops"]["sparse"] for _, _, r in group})
    out = {
        "model": wl[0], "image": wl[1], "batch": wl[2], "runtimes": list(options.runtimes),
        "rounds": options.reps, "bench_pid": os.getpid(), "flops_plain": f_plain,
        "contenders": {w.contender.name: {
            "kind": w.contender.kind, "pid": w.pid, "calls": w.calls, "warmup_rounds": w.warmup_rounds,
            "ms": {k: 1e3 * val for k, val in spread(w.seconds).items()},
            "rounds_ms": [1e3 * t for t in w.seconds],
            "gflops": gflops_per_second(flops[w.contender.name], wl[2], statistics.median(w.seconds)),
        } for w in workers},
    }
    plain = [n for n, c in out["contenders"].items() if c["kind"] != "sparse"]
    best = min(plain, key=lambda n: out["contenders"][n]["ms"]["median"])
    out["best"] = best
    out["output_checks"] = {}
    for rt in options.runtimes:
        d = max_rel_diff(by_name[rt].logits, by_name["torch"].logits)
        out["output_checks"][rt] = {"max_rel_diff": d, "ok": d <= OUTPUT_RTOL}
    out["sparse"] = [{
        "name": f"sparse {_label(r)}", "halting": r["halting"], "flop_target": r["flop_target"],
        "flop_ratio": r["flop_ratio_vs_vanilla"],
        "vs_best": ratio_summary(by_name[f"sparse {_label(r)}"].seconds, by_name[best].seconds,
                                 r["flop_ratio_vs_vanilla"]),
    } for _, _, r in group]
    if profile_layers and all(r.get("profile") for _, _, r in group):
        ov = openvino_units(by_name["openvino"].layers, onnx_units(onnx_path, _stage_names(v0.vanilla)))
        out["units"] = _unit_table(ov, [(_label(r), r["profile"]) for _, _, r in group])
    out["loadavg_start"], out["loadavg_end"] = load_start, _loadavg()
    return out


def _unit_table(ov: dict[str, dict], profiles: Sequence[tuple[str, dict]]) -> list[dict]:
    """Per unit: OpenVINO's ms and kernels beside the engine's ms (unit + halting + accumulation) per halting level."""
    engine: dict[str, dict[str, dict]] = {}
    for label, prof in profiles:
        for s in prof["stages"]:
            for u in s["per_unit"]:
                ms = u["unit_ms"] + (u["halting_ms"] or 0.0) + u["accumulate_ms"]
                engine.setdefault(f"{s['stage']}.{u['unit']}", {})[label] = {
                    "ms": ms, "active": u["active"], "kernel": u["kernel"]}
            engine.setdefault(f"{s['stage']} loop", {})[label] = {"ms": s["loop_ms"] + s.get("whole_ms", 0.0),
                                                                  "active": None, "kernel": "stage loop"}
        engine.setdefault("stem/head", {})[label] = {"ms": prof["outside_stages_ms"], "active": None, "kernel": ""}

    def order(key: str) -> tuple:
        nums = re.findall(r"\d+", key)
        return (0, 0, 0) if key == "stem/head" else (2, 0, 0) if key == "other" else (
            1, int(nums[0]), int(nums[1]) if len(nums) > 1 else 10**6)

    return [{"unit": k, "openvino_ms": ov.get(k, {}).get("ms"), "openvino_exec": ov.get(k, {}).get("exec", []),
             "engine": engine.get(k, {})} for k in sorted(set(ov) | set(engine), key=order)]


# ---------------------------------------------------------------------------------------
# Environment, report, files
# ---------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(threads: int) -> dict:
    """CPU, threads, versions, allocator settings, native kernels and the load average."""
    native_state = "disabled (SACT_NATIVE=0)" if not native.enabled() else (
        "loaded" if native.available() else f"unavailable ({native.load_error()})")
    return {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "sact": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "malloc": {k: os.environ.get(k) for k in MALLOC_VARS},
        "native_kernels": native_state,
        "loadavg_start": _loadavg(),
        "loadavg_end": None,
    }


def _f(v, fmt: str = ".2f") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def _ratio_cell(s: dict) -> str:
    r = s["ratio"]
    return f"{_f(r['median'])} [{_f(r['q25'])}-{_f(r['q75'])}] ({_f(r['min'])}-{_f(r['max'])})"


def _e_cell(s: dict) -> str:
    e = s["e"]
    return "-" if e is None else f"{_f(e['median'])} ({_f(e['range'][0])} to {_f(e['range'][1])})"


def _load_cell(row: dict) -> str:
    a, b = row.get("loadavg_start"), row.get("loadavg_end")
    return "-" if not a or not b else f"{a[0]:.1f}-{b[0]:.1f}"


def _header(doc: dict) -> list[str]:
    env = doc["env"]
    load = env.get("loadavg_start") or [float("nan")]
    load_end = env.get("loadavg_end") or [float("nan")]
    return [
        f"Command: `{doc['command']}`",
        "",
        f"CPU: {env['cpu']} ({env['cpu_count']} cores), threads: {env['threads']}, torch {env['torch']}, "
        f"sact {env['sact']}, native kernels: {env['native_kernels']}, MALLOC: {env['malloc']}, "
        f"load average at start {_f(load[0])}"
        + ("" if env.get("loadavg_end") is None else f", at end {_f(load_end[0])}")
        + "".join(f", {k} {v}" for k, v in env.get("runtimes", {}).items()),
        "",
    ]


def markdown(doc: dict) -> str:
    """The results as markdown: environment, one table of all rows, then the profiles."""
    if "break_even" in doc:
        return _break_even_markdown(doc)
    lines = _header(doc) + [
        f"{doc['settings']['reps']} timed rounds per row after {doc['settings']['warmup']} warm-up rounds; each "
        "round calls every variant once, the order rotating. `F` = FLOPs per image; `no-halt` = the same SACT "
        "model when nothing halts. Ratios are per round, shown as median [interquartile range] (min-max). "
        "`best vanilla` = the faster of the NCHW and channels-last (`CL`) vanilla network by median time, "
        "named in the cell. E = (1 - t_sparse/t_vanilla) / (1 - F_sparse/F_vanilla) from the median ratio, "
        "(range) from the min-max ratios; against the dense SACT model with F_no-halt. `-`: nothing to save "
        "(FLOP ratio about 1). checks: sparse FLOPs and halting maps equal the dense model's, then the "
        "largest logit difference relative to the largest |logit| (random-init deep networks have logits up "
        "to 1e7; float32 rounding gives about 1e-6).",
        "",
        "| model | px | batch | halting | F / F vanilla | F / F no-halt "
        "| ms vanilla NCHW / CL / dense SACT / sparse | sparse / best vanilla | E vs vanilla "
        "| sparse / dense SACT | E vs dense SACT | checks | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        halting = {"none": "none", "learned": "learned"}.get(r["halting"], f"object ({_f(r['flop_target'])})")
        ms = " / ".join(_f(r["ms"][k]["median"], ".1f") for k in VARIANTS)
        base = "CL" if r["baseline"] == "vanilla_cl" else "NCHW"
        c = r["checks"]
        rel = c["logits_max_abs_diff"] / max(c["logits_max_abs"], 1e-30)
        check = ("ok" if c["ok"] else "**DIFFER**") + f", {rel:.0e} rel."
        lines.append(
            f"| {r['model']} | {r['image']} | {r['batch']} | {halting} | {_f(r['flop_ratio_vs_vanilla'])} | "
            f"{_f(r['flop_ratio_vs_no_halt'])} | {ms} | {_ratio_cell(r['vs_vanilla'])} vs {base} | "
            f"{_e_cell(r['vs_vanilla'])} | {_ratio_cell(r['vs_dense_sact'])} | {_e_cell(r['vs_dense_sact'])} | "
            f"{check} | {_load_cell(r)} |")
    if doc.get("trained"):
        lines += ["", f"`trained`: {doc['trained']}"]
    if doc.get("runtime_rows"):
        lines += ["", _runtimes_markdown(doc)]
    profiled = [r for r in doc["rows"] if r.get("profile")]
    if profiled:
        lines += ["", "### Where the sparse engine's time goes", ""]
        for r in profiled:
            title = f"{r['model']} {r['image']} px, batch {r['batch']}, halting {r['halting']}" + (
                f" (F / F vanilla {_f(r['flop_ratio_vs_vanilla'])})")
            lines += [profile_markdown(r["profile"], title)]
    return "\n".join(lines) + "\n"


_SHORT = {"torch": "PyTorch", "onnxruntime": "ORT", "openvino": "OpenVINO"}


def _runtimes_markdown(doc: dict) -> str:
    """The table against the runtimes (one line per sparse row) and the per-unit comparisons."""
    env = doc["env"]
    versions = ", ".join(f"{k} {v}" for k, v in env.get("runtimes", {}).items())
    lines = [
        "### Against the runtimes a deployer uses (each contender in its own process)",
        "",
        f"Per model, side and batch: the plain network (the same weights) in PyTorch eager (channels-last) and "
        f"exported to ONNX in {versions}, beside the engine at each halting level, every contender in its own "
        f"worker process; {doc['settings']['reps']} interleaved rounds, each round the median of k calls "
        "(k per contender: calls, after warm-up). `best` = the plain contender with the lowest median. "
        "ratio = t_sparse / t_best per round: median [IQR] (min-max); E = (1 - t/t_best) / (1 - F); GFLOP/s of the "
        "FLOPs each contender executes (plain: the whole network; sparse: its counted FLOPs). outputs: the "
        f"runtimes' logits against PyTorch's, max |diff| / max |logit| (ok <= {OUTPUT_RTOL:g}).",
        "",
        "| model | px | batch | halting | F | ms plain (PyTorch / runtimes) | ms sparse | sparse / best | E vs best "
        "| GFLOP/s plain | GFLOP/s sparse | outputs | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in doc["runtime_rows"]:
        c = g["contenders"]
        plain = [n for n, v in c.items() if v["kind"] != "sparse"]
        ms_plain = " / ".join(f"{_SHORT.get(n, n)} {_f(c[n]['ms']['median'], '.2f')}" for n in plain)
        gf_plain = " / ".join(_f(c[n]["gflops"], ".0f") for n in plain)
        checks = ", ".join(f"{_SHORT.get(k, k)} {v['max_rel_diff']:.0e}" + ("" if v["ok"] else " **DIFFER**")
                           for k, v in g["output_checks"].items())
        for s in g["sparse"]:
            name = s["name"]
            lines.append(
                f"| {g['model']} | {g['image']} | {g['batch']} | {_label(s)} | {_f(s['flop_ratio'])} | "
                f"{ms_plain} | {_f(c[name]['ms']['median'], '.2f')} | {_ratio_cell(s['vs_best'])} vs "
                f"{_SHORT.get(g['best'], g['best'])} | {_e_cell(s['vs_best'])} | {gf_plain} | "
                f"{_f(c[name]['gflops'], '.0f')} | {checks or '-'} | {_load_cell(g)} |")
    for g in doc["runtime_rows"]:
        if not g.get("units"):
            continue
        labels = [_label(s) for s in g["sparse"]]
        lines += ["", f"#### Per unit: the engine against OpenVINO, {g['model']} {g['image']} px, batch {g['batch']}",
                  "", "Medians over the profiled calls, ms. Engine: unit + halting branch + accumulation "
                  "(`N loop`: the stage loop's bookkeeping; unit 0 includes the executor's setup), in parentheses "
                  "the active fraction. OpenVINO: the sum of its layers' times (`PERF_COUNT`) whose ONNX nodes "
                  "come from the unit's modules; `other`: layers it added itself.", "",
                  "| unit | OpenVINO ms (kernels) | " + " | ".join(f"engine {lb}" for lb in labels)
                  + f" | engine {labels[0]} / OpenVINO | engine kernel |",
                  "|---|---|" + "---|" * len(labels) + "---|---|"]
        for u in g["units"]:
            eng = u["engine"]
            cells = []
            for lb in labels:
                e = eng.get(lb)
                cells.append("-" if e is None else f"{e['ms']:.2f}" + (
                    "" if e["active"] is None else f" ({e['active']:.2f})"))
            first = eng.get(labels[0])
            ratio = "-" if first is None or not u["openvino_ms"] else f"{first['ms'] / u['openvino_ms']:.2f}"
            ov = "-" if u["openvino_ms"] is None else f"{u['openvino_ms']:.2f} ({', '.join(u['openvino_exec'])})"
            kernel = next((e["kernel"] for e in eng.values() if e.get("kernel")), "")
            lines.append(f"| {u['unit']} | {ov} | " + " | ".join(cells) + f" | {ratio} | {kernel} |")
    return "\n".join(lines)


def _break_even_markdown(doc: dict) -> str:
    lines = _header(doc) + [
        f"Sparse path / dense path time of one row kernel on the same buffer "
        f"({'wall-clock' if doc['settings'].get('clock', 'cpu') == 'wall' else 'process CPU'} time, median of "
        f"{doc['settings']['reps']} repeats, {doc['settings']['threads']} thread(s), centred disc active sets); "
        "break-even = the active fraction where the ratio crosses 1 (1.0: the sparse path always wins).",
        "",
        "| unit | kernel | batch | active fraction: sparse/dense time | break-even |",
        "|---|---|---|---|---|",
    ]
    for b in doc["break_even"]:
        pts = ", ".join(f"{f:.2f}: {r:.2f}" for f, r in b["points"])
        lines.append(f"| {b['unit']} | {b['kernel']} | {b['batch']} | {pts} | {_f(b['break_even'])} |")
    return "\n".join(lines) + "\n"


def _check_free(options: BenchOptions) -> None:
    """Refuse to replace result files this run did not create (unless ``overwrite``)."""
    existing = [str(p) for p in options.paths if p.exists()]
    if existing and not options.overwrite:
        raise BenchError(f"{', '.join(existing)} already exist(s); pass --tag NAME for new files or --overwrite "
                         "to replace them")


def _write(doc: dict, options: BenchOptions) -> None:
    json_path, md_path = options.paths
    atomic_write_bytes(json_path, dumps_json(doc, indent=1).encode())
    atomic_write_bytes(md_path, markdown(doc).encode())


def _summary_line(r: dict) -> str:
    e = r["vs_vanilla"]["e"]
    base = "CL" if r["baseline"] == "vanilla_cl" else "NCHW"
    return (f"{r['model']:>15s} {r['image']:>3d}px b{r['batch']:<2d} {r['halting']:>7s}: F/F_van "
            f"{r['flop_ratio_vs_vanilla']:.2f}, t/t_van({base}) {_ratio_cell(r['vs_vanilla'])}, E "
            f"{_f(e['median'] if e else None)}; t/t_dense {r['vs_dense_sact']['ratio']['median']:.2f}; "
            f"sparse {r['ms']['sparse']['median']:.1f} ms; {'ok' if r['checks']['ok'] else 'CHECKS FAILED'} "
            f"(max |dlogit| {r['checks']['logits_max_abs_diff']:.1e})")


def _runtimes_summary(g: dict) -> str:
    c = g["contenders"]
    plain = ", ".join(f"{n} {c[n]['ms']['median']:.2f} ms" for n in c if c[n]["kind"] != "sparse")
    sparse = ", ".join(f"{_label(s)} {c[s['name']]['ms']['median']:.2f} ms ({s['vs_best']['ratio']['median']:.2f}x)"
                       for s in g["sparse"])
    bad = [k for k, v in g["output_checks"].items() if not v["ok"]]
    return (f"{g['model']:>15s} {g['image']:>3d}px b{g['batch']:<2d} vs runtimes: {plain}; sparse {sparse}; best "
            f"{g['best']}" + (f"; OUTPUTS DIFFER: {', '.join(bad)}" if bad else ""))


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------


def run_benchmark(workloads: Sequence[Workload], *, options: BenchOptions, trained: TrainedModel | None = None) -> dict:
    """Measure ``workloads`` and write the results after every row.

    Args:
        workloads: the rows (see :func:`select_workloads`).
        options: how to run and where to write.
        trained: the checkpoint of the ``"trained"`` rows.

    Returns:
        The results document (what the JSON file holds).

    Raises:
        BenchError: a result file exists and ``options.overwrite`` is false, or no rows.
    """
    if not workloads:
        raise BenchError("no rows selected (check --models and --batch)")
    if any(w.model == TRAINED for w in workloads) and trained is None:
        raise BenchError("trained rows need a checkpoint (--checkpoint)")
    _check_free(options)
    from tqdm import tqdm

    threads = torch.get_num_threads()
    torch.set_num_threads(options.threads)
    tmp = temporary_folder() if options.runtimes else None
    try:
        doc = {
            "format": FORMAT,
            "version": 1,
            "command": options.command,
            "env": environment(options.threads),
            "settings": {"reps": options.reps, "warmup": options.warmup, "threads": options.threads,
                         "seed": options.seed, "profile": options.profile},
            "trained": None if trained is None else f"{trained.source}: {trained.description}",
            "rows": [],
        }
        if options.runtimes:
            doc["env"]["runtimes"] = runtime_versions(options.runtimes)
            doc["runtime_rows"] = []
        if options.progress:
            print(_header(doc)[2], file=sys.stderr)  # the environment, before anything is measured
        cache = _ModelCache(trained)
        exports: dict[tuple, Path] = {}
        bar = tqdm(total=len(workloads), desc="sparse benchmark", file=sys.stderr, disable=not options.progress)
        # rows come grouped by model, side and batch; the runtimes are timed once per group
        for key, rows in itertools.groupby(workloads, key=lambda w: (w.model, w.model_kwargs, w.image_size, w.batch)):
            group = []
            for wl in rows:
                bar.set_postfix_str(f"{wl.model} b{wl.batch} {wl.halting} {wl.flop_target or ''}".strip())
                v = cache.get(wl)[wl.halting]
                x, radius = _inputs(wl, v, trained, options.seed)
                row = measure_row(wl, v, x, options=options)
                row["radius"] = radius
                doc["rows"].append(row)
                group.append((v, x, row))
                doc["env"]["loadavg_end"] = _loadavg()
                _write(doc, options)  # an interrupted run keeps what it measured
                bar.update()
                if options.progress:
                    tqdm.write(_summary_line(row), file=sys.stderr)
            if options.runtimes:
                if key[:3] not in exports:  # one export per model and side: the batch is dynamic
                    exports[key[:3]] = export_plain(group[0][0].vanilla, Path(tmp.name), group[0][1])
                g = measure_runtimes(group, exports[key[:3]], options=options)
                doc["runtime_rows"].append(g)
                doc["env"]["loadavg_end"] = _loadavg()
                _write(doc, options)
                if options.progress:
                    tqdm.write(_runtimes_summary(g), file=sys.stderr)
        bar.close()
    finally:
        torch.set_num_threads(threads)
        if tmp is not None:
            tmp.cleanup()
    return doc


def run_break_even(*, options: BenchOptions, batches: Sequence[int] = (1, 8)) -> dict:
    """Measure the break-even active fraction of every unit kernel (:mod:`sact.tools.bench.break_even`):
    wall-clock time at the benchmark's thread count (the configuration the defaults are for).

    Writes ``options.paths`` after every unit, like :func:`run_benchmark`.
    """
    from tqdm import tqdm

    from .break_even import UNIT_CASES, break_even

    _check_free(options)
    previous = torch.get_num_threads()
    torch.set_num_threads(options.threads)
    try:
        doc = {"format": FORMAT, "version": 1, "command": options.command, "env": environment(options.threads),
               "settings": {"reps": options.reps, "threads": options.threads, "clock": "wall"}, "break_even": []}
        todo = [(name, build, side, b) for name, build, side in UNIT_CASES for b in batches]
        for name, build, side, b in tqdm(todo, desc="break-even", file=sys.stderr, disable=not options.progress):
            res = break_even(build(), side, batch=b, reps=options.reps)
            if res is None:
                continue  # no sparse/dense pair for this unit (dense masked fallback)
            doc["break_even"].append({"unit": name, **res})
            doc["env"]["loadavg_end"] = _loadavg()
            _write(doc, options)
    finally:
        torch.set_num_threads(previous)
    return doc


def run_bench(settings: BenchSettings) -> dict:
    """Run what ``settings`` asks for (``sact bench``): the rows, or the break-even fractions.

    Writes the result files (see :class:`BenchOptions`), prints the results as markdown on
    stdout and the files written on stderr.

    Returns:
        The results document (what the JSON file holds).

    Raises:
        BenchError, WorkloadError: bad settings or inputs, or a result file exists (nothing written).
        RunFailure: the run failed (the rows measured so far stay in the files), or a row's
            sparse FLOPs or halting maps differ from the dense model's.
    """
    options = settings.options()
    try:
        _check_free(options)  # before any warning or work
        if settings.break_even:
            doc = run_break_even(options=options, batches=tuple(settings.batch or (1, 8)))
        else:
            trained = None
            if settings.checkpoint and (settings.models is None or TRAINED in settings.models):
                trained = load_trained(settings.checkpoint, num_images=max(settings.batch or TRAINED_BATCHES),
                                       data_dir=settings.data_dir)
            workloads = select_workloads(quick=settings.quick, models=settings.models, batches=settings.batch,
                                         trained_size=None if trained is None else trained.images.shape[-1])
            for line in resolve_runtimes(settings.runtimes)[1]:  # after the inputs are checked: a bad one is one line
                warnings.warn(line, stacklevel=2)
            missing = [k for k in MALLOC_VARS if k not in os.environ]
            if missing:
                warnings.warn(f"{', '.join(missing)} unset; glibc may unmap large buffers and slow the dense models "
                              "(export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296)",
                              stacklevel=2)
            doc = run_benchmark(workloads, options=options, trained=trained)
    except SactError:
        raise
    except RuntimeError as e:  # a failure while measuring: the rows measured so far are in the files
        raise RunFailure(f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    print(markdown(doc))
    print(f"wrote {options.paths[0]} and {options.paths[1]}", file=sys.stderr)
    raise_failed_checks(doc)
    return doc


def raise_failed_checks(doc: dict) -> None:
    """Raise :class:`RunFailure` if a row's sparse FLOPs or halting maps differ from the dense model's, or a
    runtime's outputs from PyTorch's."""
    failed = [r for r in doc.get("rows", []) if not r["checks"]["ok"]]
    if failed:
        raise RunFailure(f"{len(failed)} row(s) where the sparse FLOPs or halting maps differ from the dense model's")
    differ = [f"{g['model']} b{g['batch']} {rt} ({c['max_rel_diff']:.1e})" for g in doc.get("runtime_rows", [])
              for rt, c in g["output_checks"].items() if not c["ok"]]
    if differ:
        raise RunFailure(f"the exported plain network's outputs differ from PyTorch's (max relative difference above "
                         f"{OUTPUT_RTOL:g}): {', '.join(differ)}")
