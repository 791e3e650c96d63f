"""Speed of the sparse engine against the dense models, side by side in one process.

For each model / batch size / halting setting it times (interleaved, after warm-up,
medians of repeated runs): the vanilla dense model, the SACT model in dense masked mode
(``model(x)``) and the sparse engine (``sact.to_sparse(model)(x)``), and reports the FLOP
ratio ``F_sparse / F_dense``, the time ratio ``t_sparse / t_dense`` and the efficiency
``E = (1 - t_sparse/t_dense) / (1 - F_sparse/F_dense)`` (1 = time falls exactly as FLOPs do),
with ``F_dense`` / ``t_dense`` those of the SACT model in dense masked mode (it executes
every unit everywhere, i.e. the FLOPs of a SACT model where nothing halts).

Halting is imposed through the halting branches' weights on object-like inputs: the input
is zero except for a textured disc per image (the "object"); the local halting conv is set
to ``-alpha * mean of features`` with a large positive bias, so background positions
(zero features) halt after unit 0 and object positions run every unit. The disc radius
sets the FLOP ratio. ``--checkpoint`` adds the demo's trained SACT model on its own test
images.

Run ``python benchmarks/sparse_speed.py`` (or ``sact bench``); ``--quick`` for a short run.
Set ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296`` (the Makefile does).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import sact
from sact.sparse import to_sparse

MALLOC_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
DEFAULT_OUT = Path(__file__).resolve().parent / "results"

# (model, image size, batch sizes, object radii as a fraction of the image side; None = nothing halts)
FULL_GRID = [
    ("resnet50", 224, (1,), (None, 0.45, 0.3, 0.15)),
    ("resnet110_cifar", 32, (1, 8), (None, 0.3)),
    ("resnet50", 224, (8,), (None, 0.3)),
    ("resnet101", 224, (1,), (None, 0.3)),
    ("resnet101", 224, (8,), (0.3,)),
]
QUICK_GRID = [
    ("resnet50", 224, (1,), (None, 0.33, 0.15)),
    ("resnet110_cifar", 32, (8,), (None, 0.33)),
]


def environment(threads: int) -> dict:
    """CPU model, threads, versions, allocator settings and load."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "malloc": {k: os.environ.get(k) for k in MALLOC_VARS},
        "loadavg_start": list(os.getloadavg()),
    }


def object_inputs(batch: int, size: int, radius: float | None, *, in_chans: int = 3, seed: int = 0) -> torch.Tensor:
    """Zero images with one textured disc each (radius = fraction of the side; random centres)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, in_chans, size, size, generator=g)
    if radius is None:
        return x
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    masks = []
    for _ in range(batch):
        cy, cx = (0.3 + 0.4 * torch.rand(2, generator=g)) * size
        masks.append(((yy - cy) ** 2 + (xx - cx) ** 2) <= (radius * size) ** 2)
    return x * torch.stack(masks).unsqueeze(1)


def impose_object_halting(model: torch.nn.Module, *, halt_background: bool, alpha: float = 50.0) -> None:
    """Halting branches that stop zero-feature (background) positions after unit 0.

    ``local logit = 8 - alpha * mean_c(features)``: about sigmoid(8) = 0.9997 where the
    features are zero, about 0 on the object. ``halt_background=False`` makes nothing halt.
    """
    with torch.no_grad():
        for stage in model.stages:
            for branch in stage.halting or []:
                if hasattr(branch, "local_conv"):
                    c = branch.local_conv.in_channels
                    branch.local_conv.weight.zero_()
                    branch.local_conv.weight[0, :, 1, 1] = -alpha / c
                    branch.local_conv.bias.fill_(8.0 if halt_background else -30.0)
                    branch.global_conv.weight.zero_()
                else:
                    branch.global_conv.weight.zero_()
                    branch.global_conv.bias.fill_(-30.0)


def _time(fn, x) -> tuple[float, float]:
    w0, c0 = time.perf_counter(), time.process_time()
    fn(x)
    return time.perf_counter() - w0, time.process_time() - c0


def time_side_by_side(fns: dict, x: torch.Tensor, *, warmup: int, reps: int) -> dict:
    """Median wall and process-CPU seconds of each callable, runs interleaved (A B C A B C ...).

    Returns ``{name: (wall, cpu)}``. CPU time is less sensitive to other processes on a
    shared machine (it still includes their effect on caches and memory bandwidth).
    """
    with torch.no_grad():
        for _ in range(warmup):
            for fn in fns.values():
                fn(x)
        times = {k: [] for k in fns}
        for _ in range(reps):
            for k, fn in fns.items():
                times[k].append(_time(fn, x))
    return {k: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v)) for k, v in times.items()}


def bench_row(name: str, size: int, batch: int, radius, *, warmup: int, reps: int, checkpoint_model=None,
              inputs=None) -> dict:
    """One table row: build the models, check the sparse output, time the three variants."""
    if checkpoint_model is None:
        model = sact.create_model(name, mode="sact").eval()
        impose_object_halting(model, halt_background=radius is not None)
        x = object_inputs(batch, size, radius, in_chans=model.in_chans)
        cfg = dict(model.sact_config["kwargs"])
        cfg.pop("mode", None)
        vanilla = sact.create_model(name, mode="vanilla", **cfg).eval()
        full = sact.create_model(name, mode="sact", **cfg).eval()  # nothing halts: F_dense
        impose_object_halting(full, halt_background=False)
    else:
        model, x = checkpoint_model, inputs
        cfg = dict(model.sact_config["kwargs"])
        cfg.pop("mode", None)
        vanilla = sact.create_model(model.sact_config["name"], mode="vanilla", **cfg).eval()
        full = None
    sparse = to_sparse(model)
    # The stronger dense baseline on CPUs: the vanilla model and its input channels-last
    # (the conversion of the input is part of the timed call, as it is in the engine).
    vanilla_cl = copy.deepcopy(vanilla).to(memory_format=torch.channels_last)

    def vanilla_channels_last(inp):
        return vanilla_cl(inp.contiguous(memory_format=torch.channels_last))

    with torch.no_grad():
        dense_out = model(x)
        sparse_out = sparse(x)
        f_max = (full(x).flops if full is not None else _max_flops(model, x)).double().sum().item()
        f_vanilla = vanilla(x).flops.double().sum().item()
    if not torch.equal(dense_out.flops, sparse_out.flops):
        raise RuntimeError(f"{name}: sparse FLOPs differ from dense FLOPs")
    agree = (dense_out.logits.argmax(1) == sparse_out.logits.argmax(1)).float().mean().item()
    logit_err = (dense_out.logits - sparse_out.logits).abs().max().item()
    t = time_side_by_side({"vanilla": vanilla, "vanilla_cl": vanilla_channels_last, "dense": model, "sparse": sparse},
                          x, warmup=warmup, reps=reps)
    f_sparse = sparse_out.flops.double().sum().item()
    flop_ratio = f_sparse / f_max
    time_ratio = t["sparse"][0] / t["dense"][0]
    cpu_ratio = t["sparse"][1] / t["dense"][1]

    def eff(ratio):
        return (1 - ratio) / (1 - flop_ratio) if flop_ratio < 0.995 else float("nan")

    return {
        "model": name,
        "image": size,
        "batch": batch,
        "radius": radius,
        "flop_ratio": flop_ratio,
        "flop_ratio_vs_vanilla": f_sparse / f_vanilla,
        "t_vanilla_ms": 1e3 * t["vanilla"][0],
        "t_dense_ms": 1e3 * t["dense"][0],
        "t_sparse_ms": 1e3 * t["sparse"][0],
        "cpu_vanilla_ms": 1e3 * t["vanilla"][1],
        "cpu_dense_ms": 1e3 * t["dense"][1],
        "cpu_sparse_ms": 1e3 * t["sparse"][1],
        "time_ratio": time_ratio,
        "cpu_ratio": cpu_ratio,
        "efficiency": eff(time_ratio),
        "efficiency_cpu": eff(cpu_ratio),
        "time_ratio_vs_vanilla": t["sparse"][0] / t["vanilla"][0],
        "cpu_ratio_vs_vanilla": t["sparse"][1] / t["vanilla"][1],
        "efficiency_vs_vanilla": (1 - t["sparse"][0] / t["vanilla"][0]) / (1 - f_sparse / f_vanilla)
        if f_sparse / f_vanilla < 0.995 else float("nan"),
        "efficiency_cpu_vs_vanilla": (1 - t["sparse"][1] / t["vanilla"][1]) / (1 - f_sparse / f_vanilla)
        if f_sparse / f_vanilla < 0.995 else float("nan"),
        "t_vanilla_cl_ms": 1e3 * t["vanilla_cl"][0],
        "time_ratio_vs_vanilla_cl": t["sparse"][0] / t["vanilla_cl"][0],
        "efficiency_vs_vanilla_cl": (1 - t["sparse"][0] / t["vanilla_cl"][0]) / (1 - f_sparse / f_vanilla)
        if f_sparse / f_vanilla < 0.995 else float("nan"),
        "logit_max_abs_diff": logit_err,
        "top1_agreement": agree,
        "loadavg": os.getloadavg()[0],
    }


def _max_flops(model, x) -> torch.Tensor:
    """FLOPs of ``model`` when nothing halts (a copy with the halting biases at -30)."""
    import copy

    full = copy.deepcopy(model)
    impose_object_halting(full, halt_background=False)
    return full(x).flops


def _f(v: float, fmt: str = ".2f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def markdown(rows: list[dict], env: dict, command: str, break_even: list[dict] | None = None) -> str:
    lines = [
        f"Command: `{command}`",
        "",
        f"CPU: {env['cpu']} ({env['cpu_count']} cores, shared), threads: {env['threads']}, torch {env['torch']}, "
        f"MALLOC: {env['malloc']}, load average at start {env['loadavg_start'][0]:.2f}",
        "",
        "Ratios are sparse / dense SACT (masked) unless marked 'vs vanilla' (the NCHW vanilla model) or "
        "'vs vanilla CL' (the vanilla model and input channels-last, the faster dense baseline on CPUs); wall = median wall-clock, "
        "CPU = median process CPU time (with more than one thread it includes OpenMP spin-waiting, which "
        "penalises the engine's many small ops: read the wall columns then).",
        "",
        "| model | image | batch | FLOP ratio | time ratio (wall) | E (wall) | FLOP ratio vs vanilla "
        "| time ratio vs vanilla (wall) | E vs vanilla (wall) | time ratio (CPU) | E (CPU) "
        "| time ratio vs vanilla CL (wall) | E vs vanilla CL (wall) "
        "| ms vanilla / vanilla CL / dense SACT / sparse (wall) | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['image']} | {r['batch']} | {_f(r['flop_ratio'])} | {_f(r['time_ratio'])} | "
            f"{_f(r['efficiency'])} | {_f(r['flop_ratio_vs_vanilla'])} | {_f(r['time_ratio_vs_vanilla'])} | "
            f"{_f(r['efficiency_vs_vanilla'])} | {_f(r['cpu_ratio'])} | {_f(r['efficiency_cpu'])} | "
            f"{_f(r.get('time_ratio_vs_vanilla_cl'))} | {_f(r.get('efficiency_vs_vanilla_cl'))} | "
            f"{r['t_vanilla_ms']:.0f} / {_f(r.get('t_vanilla_cl_ms'), '.0f')} / {r['t_dense_ms']:.0f} / "
            f"{r['t_sparse_ms']:.0f} | {r['loadavg']:.1f} |"
        )
    if break_even:
        lines += ["", "Break-even of one unit (sparse path / dense path of the engine; 1 thread, process CPU time, "
                  "disc masks):", "",
                  "| unit | shape | batch | active fraction: sparse/dense time | break-even |", "|---|---|---|---|---|"]
        for b in break_even:
            pts = ", ".join(f"{f:.2f}: {r:.2f}" for f, r in b["points"])
            lines.append(f"| {b['unit']} | {b['shape']} | {b['batch']} | {pts} | {_f(b['break_even'])} |")
    return "\n".join(lines) + "\n"


def break_even_rows(*, batches=(1, 8), reps: int = 5) -> list[dict]:
    """Time one unit's sparse path against its dense path over disc masks of growing area."""
    from sact.sparse.kernels import Geometry, RowSet, SparseBottleneck, SparsePreActBasic
    from sact.sparse.rows import image_index, neighbour_table
    from sact.units import Bottleneck, PreActBasicUnit

    cases = [
        ("Bottleneck", lambda: Bottleneck(256, 64), 56, SparseBottleneck),
        ("Bottleneck", lambda: Bottleneck(512, 128), 28, SparseBottleneck),
        ("Bottleneck", lambda: Bottleneck(1024, 256), 14, SparseBottleneck),
        ("PreActBasicUnit", lambda: PreActBasicUnit(16, 16), 32, SparsePreActBasic),
    ]
    out = []
    for unit_name, build, side, cls in cases:
        for b in batches:
            unit = build().eval()
            kernel = cls(unit, dense_above=1.0)
            c = unit.out_channels
            geo = Geometry(b, side, side, c, neighbour_table(b, side, side, "cpu"), image_index(b, side, side, "cpu"))
            x0 = torch.zeros(geo.n + 1, c)
            x0[: geo.n] = torch.rand(geo.n, c)
            yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
            points = []
            for frac in (0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 1.0):
                radius = math.sqrt(frac * side * side / math.pi)
                disc = ((yy - side / 2 + 0.5) ** 2 + (xx - side / 2 + 0.5) ** 2) <= radius**2
                active = disc.flatten().repeat(b) if frac < 1.0 else torch.ones(geo.n, dtype=torch.bool)
                idx = active.nonzero().view(-1)
                real = idx.numel() / geo.n
                times = {"sparse": [], "dense": []}
                with torch.no_grad():
                    for rep in range(reps + 1):
                        for path in ("sparse", "dense"):
                            X, S = x0.clone(), torch.zeros(b, c)
                            rows = RowSet(idx, geo, False)  # mask bookkeeping is part of the timed work
                            t0 = time.process_time()
                            (kernel.run_sparse if path == "sparse" else kernel.run_dense)(X, S, rows)
                            if rep:
                                times[path].append(time.process_time() - t0)
                points.append((real, statistics.median(times["sparse"]) / statistics.median(times["dense"])))
            be = next((f0 + (1 - r0) * (f1 - f0) / (r1 - r0) for (f0, r0), (f1, r1) in zip(points, points[1:])
                       if r0 < 1 <= r1 and r1 > r0), None)
            if be is None and all(r < 1 for _, r in points):
                be = 1.0
            out.append({"unit": unit_name, "shape": f"{c}x{side}x{side}", "batch": b, "points": points, "break_even": be})
            tqdm_write(f"break-even {unit_name} {c}x{side}x{side} b{b}: {be} {points}")
    return out


def tqdm_write(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return p.parse_args(argv)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared with ``sact bench``."""
    p.add_argument("--quick", action="store_true", help="a short run (two models, few rows, few repeats)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--reps", type=int, default=None, help="timed repeats per variant (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs per variant")
    p.add_argument("--models", nargs="*", default=None, help="restrict to these models")
    p.add_argument("--batch", type=int, nargs="*", default=None, help="restrict to these batch sizes")
    p.add_argument("--checkpoint", type=str, default=None,
                   help="a trained SACT checkpoint (default: reports/demo/sact/model.safetensors if present)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for sparse_speed*.json / .md")
    p.add_argument("--tag", type=str, default="", help="suffix of the result file names")
    p.add_argument("--no-break-even", action="store_true", help="skip the per-unit break-even measurement")


def _find_checkpoint(arg: str | None) -> Path | None:
    if arg:
        return Path(arg)
    demo = Path(__file__).resolve().parent.parent / "reports" / "demo" / "sact" / "model.safetensors"
    return demo if demo.is_file() else None


def _checkpoint_rows(path: Path, args) -> list[dict]:
    model = sact.load_checkpoint(path).eval()
    if model.mode != "sact":
        return []
    size = int(model.checkpoint_meta.get("preprocess", {}).get("image_size") or 64)
    rows = []
    try:
        from sact.data import ClutteredFashionMNIST

        data = ClutteredFashionMNIST(split="test", num_samples=16, seed=0)
        images = torch.stack([data[i]["image"] for i in range(16)])
    except Exception as e:  # noqa: BLE001 - data may be missing; fall back to noise
        print(f"checkpoint rows: no test data ({e}); using noise images", file=sys.stderr)
        images = torch.rand(16, model.in_chans, size, size)
    for b in args.batch or (1, 8):
        rows.append(bench_row(f"{path.stem} (trained)", images.shape[-1], b, "data", warmup=args.warmup,
                              reps=args.reps, checkpoint_model=model, inputs=images[:b].contiguous()))
    return rows


def main(argv=None, *, command: str | None = None) -> int:
    args = parse_args(argv) if not isinstance(argv, argparse.Namespace) else argv
    missing = [k for k in MALLOC_VARS if k not in os.environ]
    if missing:
        print(f"warning: {missing} unset; glibc may unmap large buffers and slow the dense baseline "
              "(export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296)", file=sys.stderr)
    torch.set_num_threads(args.threads)
    if args.reps is None:
        args.reps = 3
    env = environment(args.threads)
    grid = QUICK_GRID if args.quick else FULL_GRID
    from tqdm import tqdm

    todo = [
        (name, size, b, r)
        for name, size, batches, radii in grid
        if not args.models or name in args.models
        for b in batches
        if not args.batch or b in args.batch
        for r in radii
    ]
    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "sparse_speed" + (f"_{args.tag}" if args.tag else ("_quick" if args.quick else ""))
    from sact.checkpoint import atomic_write_bytes

    def save(be=()):
        atomic_write_bytes(args.out / f"{stem}.json", json.dumps({"env": env, "rows": rows, "break_even": list(be)},
                                                                   indent=2).encode())

    for name, size, b, r in tqdm(todo, desc="sparse benchmark", file=sys.stderr):
        row = bench_row(name, size, b, r, warmup=args.warmup, reps=args.reps)
        rows.append(row)
        save()  # partial results survive an interrupted run
        tqdm.write(
            f"{name:16s} b{b} FLOPs {row['flop_ratio']:.2f} time {row['time_ratio']:.2f} (CPU {row['cpu_ratio']:.2f}) "
            f"E {row['efficiency']:.2f} (CPU {row['efficiency_cpu']:.2f}); vs vanilla: FLOPs "
            f"{row['flop_ratio_vs_vanilla']:.2f} CPU {row['cpu_ratio_vs_vanilla']:.2f} "
            f"(vanilla {row['t_vanilla_ms']:.1f} ms, dense {row['t_dense_ms']:.1f} ms, sparse {row['t_sparse_ms']:.1f} ms, "
            f"load {row['loadavg']:.1f})",
            file=sys.stderr,
        )
    ckpt = _find_checkpoint(args.checkpoint)
    if ckpt is not None and not args.quick:
        rows += _checkpoint_rows(ckpt, args)
    be = []
    if not (args.quick or args.no_break_even):
        # One thread and process CPU time: with more threads, CPU time counts OpenMP spin-waits
        # and wall time is too noisy on a shared machine for a per-unit crossover.
        torch.set_num_threads(1)
        be = break_even_rows(reps=args.reps)
        torch.set_num_threads(args.threads)
    env["loadavg_end"] = list(os.getloadavg())
    command = command or "python benchmarks/sparse_speed.py " + " ".join(sys.argv[1:])
    md = markdown(rows, env, command.strip(), be)
    print(md)
    save(be)
    atomic_write_bytes(args.out / f"{stem}.md", md.encode())
    print(f"wrote {args.out / stem}.json and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
