"""Speed and per-unit profile of the native CIFAR stage executor (``sact.sparse.native_stage``).

For CIFAR ResNets with imposed halting (and optionally the demo's trained SACT model on its
own Cluttered Fashion-MNIST test canvases) it times, interleaved in one process (A B C D A B C
D ...), after warm-up:

* ``vanilla``: the plain network (NCHW), ``vanilla_cl``: the same channels-last,
* ``dense``: the SACT model's own dense masked forward (``model(x)``),
* ``engine``: the current sparse engine (``sact.to_sparse(model)``),
* ``native``: stem + one :class:`~sact.sparse.native_stage.NativeBasicStage` call per stage
  + head (what ``to_sparse`` will run for these stages).

and reports medians with the 25-75% spread over the repeats, and the efficiency
``E = (1 - t_native / t_vanilla) / (1 - F_native / F_vanilla)`` against the faster of the
two vanilla variants, computed per round (the variants of one round ran back to back) and
summarised by its median and quartiles. Then it profiles the native stages: per stage, the
stem / stage / head wall time, and per unit the time of each phase (bookkeeping, pre-activation,
conv1, conv2 + residual, halting + recurrence + weighted sum, barrier waits) at the unit's mean
active fraction, as seen by OpenMP thread 0.

Halting is imposed as in ``benchmarks/sparse_speed.py``: zero images with a textured disc
per image; background positions halt after unit 0, the disc runs every unit; the disc radius
sets the FLOP ratio (``None`` = nothing halts).

Run ``python benchmarks/native_stage_profile.py`` (about 5-10 minutes on an idle 2-core
machine); ``--quick`` for a short run. Set ``MALLOC_MMAP_THRESHOLD_=33554432
MALLOC_TRIM_THRESHOLD_=4294967296`` as for the other benchmarks.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from sact.output import ModelOutput
from sact.sparse import native, to_sparse
from sact.sparse.native_stage import NativeBasicStage

from sact.tools.bench.bench import environment
from sact.tools.bench.workloads import load_trained, object_inputs, object_model, vanilla_twin

# (model, image size, batch sizes, disc radii as a fraction of the side; None = nothing halts)
GRID = [
    ("resnet32_cifar", 32, (1, 16), (None, 0.3, 0.2, 0.08)),
    ("resnet110_cifar", 32, (1, 16), (None, 0.3, 0.2, 0.08)),
]
QUICK_GRID = [
    ("resnet32_cifar", 32, (1, 16), (None, 0.2)),
    ("resnet110_cifar", 32, (1,), (None, 0.2)),
]


class NativeModel:
    """Stem + native stages + head, the forward of ``SparseModel`` with the native stages."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.stages = [NativeBasicStage(s) for s in model.stages]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> ModelOutput:
        m = self.model
        x, flops = m.forward_stem(x.contiguous(memory_format=torch.channels_last))
        outs = []
        for s in self.stages:
            x, o = s(x)
            outs.append(o)
            flops = flops + o.flops
        logits = m.forward_head(x)
        if isinstance(logits, tuple):  # (logits, FLOPs); newer models: logits, FLOPs from head_flops()
            logits, head_flops = logits
        else:
            head_flops = m.head_flops()
        return ModelOutput(logits=logits, ponder_cost=sum(o.ponder_cost for o in outs), flops=flops + head_flops,
                           stages=outs)


def quartiles(v: list[float]) -> tuple[float, float, float]:
    """(25%, median, 75%) of ``v``."""
    q = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else [v[0]] * 3
    return q[0], statistics.median(v), q[2]


def interleaved(fns: dict, x: torch.Tensor, *, warmup: int, reps: int, clock=time.perf_counter) -> dict[str, list[float]]:
    """Seconds (of ``clock``) of each callable per round, rounds interleaved (rotating start)."""
    names = list(fns)
    with torch.no_grad():
        for _ in range(warmup):
            for f in fns.values():
                f(x)
        times = {k: [] for k in names}
        for r in range(reps):
            order = names[r % len(names):] + names[: r % len(names)]
            for k in order:
                t0 = clock()
                fns[k](x)
                times[k].append(clock() - t0)
    return times


def bench_row(label: str, model, vanilla, x: torch.Tensor, *, warmup: int, reps: int, engine: bool,
              clock=time.perf_counter) -> dict:
    """Times the variants on ``x`` and checks the native output against the dense model."""
    nat = NativeModel(model)
    vanilla_cl = copy.deepcopy(vanilla).to(memory_format=torch.channels_last)
    fns = {
        "vanilla": vanilla,
        "vanilla_cl": lambda inp: vanilla_cl(inp.contiguous(memory_format=torch.channels_last)),
        "dense": model,
        "native": nat,
    }
    if engine:
        fns["engine"] = to_sparse(model)
    with torch.no_grad():
        ref = model(x)
        got = nat(x)
        f_van = vanilla(x).flops.double().sum().item()
    if not torch.equal(ref.flops, got.flops):
        raise RuntimeError(f"{label}: native FLOPs differ from the dense model's")
    err = (ref.logits - got.logits).abs().max().item()
    agree = (ref.logits.argmax(1) == got.logits.argmax(1)).float().mean().item()
    times = interleaved(fns, x, warmup=warmup, reps=reps, clock=clock)
    flop_ratio = got.flops.double().sum().item() / f_van
    fast = [min(a, b) for a, b in zip(times["vanilla"], times["vanilla_cl"])]
    ratio = [n / v for n, v in zip(times["native"], fast)]
    row = {
        "label": label,
        "batch": x.shape[0],
        "flop_ratio": flop_ratio,
        "ms": {k: tuple(1e3 * t for t in quartiles(v)) for k, v in times.items()},
        "time_ratio": quartiles(ratio),
        "logit_err": err,
        "top1_agree": agree,
        "load": os.getloadavg()[0],
    }
    if flop_ratio < 0.995:
        row["E"] = quartiles([(1 - r) / (1 - flop_ratio) for r in ratio])
    return row, nat


def profile_native(nat: NativeModel, x: torch.Tensor, *, calls: int) -> tuple[list[dict], dict]:
    """Per part (stem, stages, head): median wall ms; per stage and unit: the median over calls of
    thread 0's seconds per phase (per image it ran)."""
    m = nat.model
    parts = {"stem": [], "head": []} | {f"stage{i + 1}": [] for i in range(len(nat.stages))}
    per_call = [[] for _ in nat.stages]
    with torch.no_grad():
        for _ in range(calls):
            t0 = time.perf_counter()
            y, _ = m.forward_stem(x.contiguous(memory_format=torch.channels_last))
            parts["stem"].append(time.perf_counter() - t0)
            for i, s in enumerate(nat.stages):
                s.profile = s.new_profile()
                t0 = time.perf_counter()
                y, _ = s(y)
                parts[f"stage{i + 1}"].append(time.perf_counter() - t0)
                per_call[i].append(s.profile / s.profile[-1, 0].clamp(min=1.0))
                s.profile = None
            t0 = time.perf_counter()
            m.forward_head(y)
            parts["head"].append(time.perf_counter() - t0)
    out = []
    for i, calls_i in enumerate(per_call):
        med = torch.stack(calls_i).median(dim=0).values
        units = [{c: med[n, j].item() for j, c in enumerate(NativeBasicStage.PROFILE_COLUMNS)}
                 for n in range(med.shape[0] - 1)]
        out.append({"stage": i + 1, "units": units})
    return out, {k: 1e3 * statistics.median(v) for k, v in parts.items()}


def print_row(row: dict) -> None:
    ms = row["ms"]

    def q(v, fmt=".2f"):
        return f"{v[1]:{fmt}} [{v[0]:{fmt}}-{v[2]:{fmt}}]"

    e = q(row["E"]) if "E" in row else "-"
    eng = q(ms["engine"]) if "engine" in ms else "-"
    print(
        f"| {row['label']} | {row['batch']} | {row['flop_ratio']:.2f} | {q(ms['vanilla'])} | {q(ms['vanilla_cl'])} | "
        f"{q(ms['dense'])} | {eng} | {q(ms['native'])} | {q(row['time_ratio'])} | {e} | {row['load']:.1f} |",
        flush=True,
    )


def print_profile(prof: list[dict], parts: dict, *, per_unit: bool = False) -> None:
    """Per stage: unit 0, the mean of the later units with a halting branch, the last unit
    (every unit with ``per_unit``); microseconds per image on thread 0."""
    cols = ("bookkeeping", "preact", "conv1", "conv2", "halting", "wait")
    print("    wall ms (median): " + ", ".join(f"{k} {v:.3f}" for k, v in parts.items()))
    print("    us per image, thread 0 | active / dilated fraction | " + " | ".join(cols) + " | sum")
    for st in prof:
        units = st["units"]
        rows = [(f"{st['stage']}.{n}", [units[n]]) for n in range(len(units))] if per_unit else (
            [(f"{st['stage']}.0", [units[0]])]
            + ([(f"{st['stage']}.1-{len(units) - 2}", units[1:-1])] if len(units) > 2 else [])
            + ([(f"{st['stage']}.{len(units) - 1}", [units[-1]])] if len(units) > 1 else [])
        )
        for label, us in rows:
            t = [1e6 * statistics.mean(u[c] for u in us) for c in cols]
            act = 1.0 if label.endswith(".0") else statistics.mean(u["active"] for u in us)
            dil = 1.0 if label.endswith(".0") else statistics.mean(u["dilated"] for u in us)
            print(f"    unit {label:>7} | {act:.2f} / {dil:.2f} | " + " | ".join(f"{v:6.1f}" for v in t)
                  + f" | {sum(t):6.1f}")


def demo_rows(path: Path, args) -> list[tuple]:
    """(label, model, vanilla, images) for a trained checkpoint on its own test canvases."""
    trained = load_trained(path, num_images=max(args.demo_batches))  # the bench's trained rows' canvases
    model = trained.model
    if model.mode != "sact" or not all(NativeBasicStage.supports(s) for s in model.stages):
        print(f"{path}: not a CIFAR-style SACT model; skipped", file=sys.stderr)
        return []
    vanilla = vanilla_twin(model)
    return [(f"demo {path.parent.name} (trained) @{trained.images.shape[-1]}", model, vanilla,
             trained.images[:b].contiguous()) for b in args.demo_batches]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=30, help="interleaved rounds per row")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--profile-calls", type=int, default=20)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-engine", action="store_true", help="do not time the current sparse engine")
    p.add_argument("--per-unit", action="store_true", help="print the profile of every unit")
    p.add_argument("--demo", type=Path, default=None, help="a trained SACT checkpoint (.safetensors) to add")
    p.add_argument("--demo-batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--models", nargs="+", default=None)
    p.add_argument("--clock", choices=("wall", "thread"), default="wall",
                   help="wall clock, or the calling thread's CPU time (with --threads 1 only: a proxy that other "
                        "processes on a shared machine disturb less)")
    args = p.parse_args(argv)
    if args.clock == "thread" and args.threads != 1:
        p.error("--clock thread needs --threads 1")
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    torch.set_num_threads(args.threads)
    if not native.available():
        print(f"native kernels unavailable: {native.load_error()}", file=sys.stderr)
        return 1
    env = environment(args.threads)
    print(f"# {env['cpu']}, threads {args.threads}, torch {env['torch']}, malloc {env['malloc']}, "
          f"load at start {env['loadavg_start'][0]:.2f}")
    print(f"# command: python {' '.join(sys.argv)}")
    print(f"Milliseconds ({args.clock} clock): median [25%-75%] over interleaved rounds; time ratio = native / faster "
          "vanilla per round; E = (1 - time ratio) / (1 - FLOP ratio).\n")
    print("| model | batch | FLOP ratio | vanilla ms | vanilla CL ms | dense SACT ms | engine ms | native ms | "
          "native / faster vanilla | E | load |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    jobs = []
    grid = QUICK_GRID if args.quick else GRID
    for name, size, batches, radii in grid:
        if args.models and name not in args.models:
            continue
        for b in batches:
            obj, full = object_model(name, image_size=size)
            vanilla = vanilla_twin(full)
            for radius in radii:  # the disc's radius as a fraction of the side (sact.tools.bench.workloads)
                model = obj if radius is not None else full
                jobs.append((f"{name} @{size} r={radius}", model, vanilla, object_inputs(b, size, radius)[0]))
    if args.demo is not None:
        jobs += demo_rows(args.demo, args)
    profiles = []
    for label, model, vanilla, x in jobs:
        row, nat = bench_row(label, model, vanilla, x, warmup=args.warmup, reps=args.reps, engine=not args.no_engine,
                             clock=clock)
        print_row(row)
        profiles.append((row, profile_native(nat, x, calls=args.profile_calls)))
    print("\nProfile of the native stages (OpenMP thread 0; batches of at least `threads` images run one image per "
          "thread, batch 1 splits each image's rows across the threads)")
    for row, (prof, parts) in profiles:
        print(f"\n  {row['label']} batch {row['batch']} FLOP ratio {row['flop_ratio']:.2f}")
        print_profile(prof, parts, per_unit=args.per_unit)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
