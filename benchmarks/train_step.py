"""Cost of one training step: vanilla vs ACT vs SACT ResNets of the same depth.

One SGD step (forward, the reference loss ``CE + tau * ponder`` via
``sact.engine.train.compute_loss``, backward, update) of each variant, timed side by
side in one process and interleaved (vanilla, ACT, SACT, vanilla, ...) after warm-up;
the per-round ratios ACT/vanilla and SACT/vanilla are reported as medians with their
spread (interquartile range, min-max) over the rounds. ACT and SACT run with the fused
halting unit (:mod:`sact.halting_fused`, turned on here; on its native kernels where they
build, ``SACT_NATIVE=0`` for its torch ops) and, as
``act_ref`` / ``sact_ref`` in the same rounds, with the torch-op path (the default on NCHW
features; on channels-last ones the fused unit is the default; ``--no-reference`` leaves those out). ``--compile`` adds the same steps
with the models under ``torch.compile``. Prints the environment and writes
``train_step[_TAG].{json,md}`` to ``--out``; ``--ops`` prints torch.profiler's operator tables.

    python benchmarks/train_step.py --threads 2 --reps 15 --tag quiet

Set ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296`` (the Makefile does).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import sact
from sact import halting_fused, native
from sact.engine.train import compute_loss
from sact.tools.bench.bench import environment

ROWS = [("resnet50", 224, 8, 1000), ("resnet32_cifar", 32, 64, 10)]
MODES = ("vanilla", "act", "sact")
REFERENCE = ("act_ref", "sact_ref")  # the same models with the torch-op halting path


def make_step(name: str, variant: str, x: torch.Tensor, y: torch.Tensor, *, compile_model: bool,
              channels_last: bool, tau: float = 0.01):
    mode = variant.removesuffix("_ref")
    fused = not variant.endswith("_ref")
    torch.manual_seed(0)
    model = sact.create_model(name, mode=mode, num_classes=int(y.max()) + 1).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    fwd = torch.compile(model) if compile_model else model

    def step() -> None:
        with halting_fused.use(fused):
            out = fwd(x)
        loss, _ = compute_loss(out, y, tau=tau, mode=mode)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def quartiles(v: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(v, n=4) if len(v) > 1 else [v[0]] * 3
    return q[0], q[2]


def bench(name: str, size: int, batch: int, classes: int, *, reps: int, warmup: int, compile_model: bool,
          channels_last: bool, variants: tuple[str, ...]) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.randint(0, classes, (batch,), generator=g)
    steps = {m: make_step(name, m, x, y, compile_model=compile_model, channels_last=channels_last) for m in variants}
    for _ in range(warmup):
        for s in steps.values():
            s()
    times = {m: [] for m in variants}
    for _ in range(reps):
        for m, s in steps.items():
            t0 = time.perf_counter()
            s()
            times[m].append(time.perf_counter() - t0)
    row = {"model": name, "image": size, "batch": batch, "compile": compile_model, "channels_last": channels_last,
           "reps": reps,
           "ms": {m: 1e3 * statistics.median(v) for m, v in times.items()}}
    for m in variants[1:]:
        ratios = [a / b for a, b in zip(times[m], times["vanilla"])]
        row[f"{m}_ratio"] = statistics.median(ratios)
        row[f"{m}_ratio_iqr"] = quartiles(ratios)
        row[f"{m}_ratio_range"] = (min(ratios), max(ratios))
    row["loadavg"] = os.getloadavg()[0]
    return row


def markdown(rows: list[dict], env: dict, command: str) -> str:
    lines = [f"Command: `{command}`", "",
             f"CPU: {env['cpu']} ({env['cpu_count']} cores), threads {env['threads']}, torch {env['torch']}, "
             f"MALLOC {env['malloc']}, load average {env['loadavg_start'][0]:.2f} at start, "
             f"{env.get('loadavg_end', [float('nan')])[0]:.2f} at end", "",
             "One SGD step (forward + loss + backward + update); ratios are per-round (interleaved) medians, "
             "with the interquartile range and min-max over the rounds. ACT / SACT: the fused halting unit "
             f"(sact.halting_fused, native kernels: {native.use_for(torch.zeros(1))}); ref: the torch-op "
             "halting path, timed in the same rounds.", "",
             "| model | image | batch | layout | compile | ms vanilla / ACT / SACT (ref ACT / SACT) "
             "| ACT / vanilla (IQR; range) | SACT / vanilla (IQR; range) | ref ACT / vanilla | ref SACT / vanilla "
             "| load |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = r["ms"]

        def cell(m):
            lo, hi = r[f"{m}_ratio_iqr"]
            a, b = r[f"{m}_ratio_range"]
            return f"{r[f'{m}_ratio']:.2f} ({lo:.2f}-{hi:.2f}; {a:.2f}-{b:.2f})"

        def ref(m):
            return cell(m) if f"{m}_ratio" in r else "-"

        layout = "channels-last" if r.get("channels_last") else "NCHW"
        ref_ms = f" ({ms['act_ref']:.0f} / {ms['sact_ref']:.0f})" if "sact_ref" in ms else ""
        lines.append(f"| {r['model']} | {r['image']} | {r['batch']} | {layout} | {'yes' if r['compile'] else 'no'} | "
                     f"{ms['vanilla']:.0f} / {ms['act']:.0f} / {ms['sact']:.0f}{ref_ms} | {cell('act')} | "
                     f"{cell('sact')} | {ref('act_ref')} | {ref('sact_ref')} | {r['loadavg']:.1f} |")
    return "\n".join(lines) + "\n"


def operator_tables(args) -> int:
    """torch.profiler's self-CPU-time table of 3 steps (after 3 warm-up steps) per variant."""
    from torch.profiler import ProfilerActivity, profile

    for name, size, batch, classes in ROWS:
        if args.models and name not in args.models:
            continue
        x, y = torch.randn(batch, 3, size, size), torch.randint(0, classes, (batch,))
        for layout in args.layouts:
            for mode in MODES + (() if args.no_reference else REFERENCE):
                step = make_step(name, mode, x, y, compile_model=False, channels_last=layout == "channels-last")
                for _ in range(3):
                    step()
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(3):
                        step()
                print(f"\n## {name} b{batch} {layout} {mode}: 3 steps")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=10, help="timed rounds (each runs every variant once)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--models", nargs="*", default=None, help="restrict to these models")
    p.add_argument("--compile", action="store_true", help="also time the models under torch.compile")
    p.add_argument("--layouts", nargs="+", default=["nchw", "channels-last"], choices=["nchw", "channels-last"],
                   help="memory formats of model and input to time (default both)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--tag", default="")
    p.add_argument("--no-reference", action="store_true",
                   help="leave out the torch-op halting path (act_ref, sact_ref) next to the fused one")
    p.add_argument("--ops", action="store_true",
                   help="instead of timing: torch.profiler's per-operator table of 3 steps of each variant "
                        "(where the SACT step's extra time goes); printed, no files")
    args = p.parse_args(argv)
    if args.threads < 1 or args.reps < 1 or args.warmup < 0:
        p.error("--threads and --reps must be positive, --warmup non-negative")
    torch.set_num_threads(args.threads)
    env = environment(args.threads)  # sact.tools.bench's: CPU model, versions, MALLOC_*, load average
    print(json.dumps(env), file=sys.stderr)
    if args.ops:
        return operator_tables(args)
    from sact.checkpoint import atomic_write_bytes

    stem = args.out / ("train_step" + (f"_{args.tag}" if args.tag else ""))
    rows = []
    command = "python benchmarks/train_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for name, size, batch, classes in ROWS:
        if args.models and name not in args.models:
            continue
        for layout in args.layouts:
            for compiled in ((False, True) if args.compile else (False,)):
                row = bench(name, size, batch, classes, reps=args.reps, warmup=args.warmup, compile_model=compiled,
                            channels_last=layout == "channels-last",
                            variants=MODES + (() if args.no_reference else REFERENCE))
                rows.append(row)
                print(f"{name} b{batch} {layout} compile={compiled}: ms {row['ms']}, "
                      f"ACT/vanilla {row['act_ratio']:.2f}, SACT/vanilla {row['sact_ratio']:.2f}", file=sys.stderr)
                args.out.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(stem.with_suffix(".json"),
                                   json.dumps({"env": env, "command": command, "rows": rows}, indent=2).encode())
    env["loadavg_end"] = list(os.getloadavg())
    md = markdown(rows, env, command)
    atomic_write_bytes(stem.with_suffix(".json"), json.dumps({"env": env, "command": command, "rows": rows},
                                                              indent=2).encode())
    atomic_write_bytes(stem.with_suffix(".md"), md.encode())
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
