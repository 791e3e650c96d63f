"""``sact bench``: time the sparse engine against the vanilla and dense SACT models, and against the plain
network in ONNX Runtime and OpenVINO, on this machine.

This module parses the flags into :class:`sact.tools.bench.BenchSettings` and calls
:func:`sact.tools.bench.run_bench` (the harness, also ``python -m sact.tools.bench``);
results go to ``./sact_bench/`` or ``--out``. See ``docs/sparse.md``.
"""

from __future__ import annotations

import argparse
from typing import Sequence


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time the sparse engine against the vanilla and dense models (-> ./sact_bench)",
                       description="Time the sparse engine (sact.to_sparse) against the vanilla network (NCHW and "
                       "channels-last) and the dense SACT model, interleaved, with medians and spread over rounds, then against "
                       "the plain network in ONNX Runtime and OpenVINO, each contender in its own process (--runtimes); "
                       "results in OUT/sparse_speed[_TAG].{json,md}.")
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark's flags (shared by ``sact bench`` and ``python -m sact.tools.bench``)."""
    from ..tools.bench.bench import FULL_GRID, TRAINED

    names = sorted({g[0] for g in FULL_GRID}) + [TRAINED]
    p.add_argument("--quick", action="store_true", help="a short grid (two models, two rows each, 3 rounds)")
    p.add_argument("--models", nargs="+", choices=names, default=None, metavar="NAME",
                   help=f"only these models ({', '.join(names)}; '{TRAINED}': the --checkpoint rows)")
    p.add_argument("--batch", nargs="+", type=int, default=None, metavar="N", help="only these batch sizes")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--reps", type=int, default=None, help="timed rounds per row (default 10; --quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 2; --quick 1)")
    p.add_argument("--checkpoint", default=None,
                   help="add rows for a trained ACT/SACT checkpoint on its Cluttered Fashion-MNIST test canvases "
                        "(e.g. reports/demo/sact/model.safetensors)")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST folder for the --checkpoint rows")
    p.add_argument("--out", default="sact_bench", help="folder of the result files (default ./sact_bench)")
    p.add_argument("--tag", default=None, help="result files sparse_speed_TAG.{json,md} (default sparse_speed, "
                                               "sparse_speed_quick with --quick)")
    p.add_argument("--overwrite", action="store_true", help="replace result files of the same name")
    p.add_argument("--profile", action="store_true", help="add the per-stage, per-unit profile of the engine")
    p.add_argument("--break-even", action="store_true",
                   help="instead of the rows: the active fraction where each unit kernel's sparse path stops "
                        "beating its dense path (at --threads, wall clock; files break_even[_TAG])")
    p.add_argument("--runtimes", nargs="+", default=["auto"], metavar="NAME",
                   help="time the plain network (same weights, exported to ONNX) in these runtimes beside PyTorch and "
                        "the engine, each contender in its own process: auto (default: those installed), none, "
                        "onnxruntime, openvino (install them with pip install -e '.[bench]')")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic inputs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or per-row lines")


def _command_line(args: argparse.Namespace, prog: str) -> str:
    """``prog`` and the flags of ``args`` that differ from their defaults (recorded in the results)."""
    defaults = argparse.ArgumentParser()
    add_arguments(defaults)
    default = vars(defaults.parse_args([]))
    parts = [prog]
    for k, d in default.items():
        val = getattr(args, k, d)
        if val == d:
            continue
        flag = "--" + k.replace("_", "-")
        if isinstance(val, bool):
            parts.append(flag)
        elif isinstance(val, (list, tuple)):
            parts += [flag, *map(str, val)]
        else:
            parts += [flag, str(val)]
    return " ".join(parts)


def run(args: argparse.Namespace, *, prog: str = "sact bench") -> int:
    from ..tools.bench import BenchSettings, run_bench

    run_bench(BenchSettings(
        quick=args.quick, models=args.models, batch=args.batch, threads=args.threads, reps=args.reps,
        warmup=args.warmup, checkpoint=args.checkpoint, data_dir=args.data_dir, out=args.out, tag=args.tag,
        overwrite=args.overwrite, profile=args.profile, break_even=args.break_even, seed=args.seed,
        progress=not args.no_progress, command=_command_line(args, prog), runtimes=args.runtimes))
    return 0


def run_cli(args: argparse.Namespace, *, prog: str = "sact bench") -> int:
    """Run the benchmark from parsed arguments; returns the exit status.

    0: done and every check passed; 1: a check failed (sparse FLOPs or halting maps differ
    from the dense model's) or the run failed (the rows measured so far stay in the files);
    2: bad arguments or inputs, or a result file exists. Errors are reported by
    :func:`sact.cli.run_reported` (one line on stderr).
    """
    from ..cli import run_reported

    return run_reported(lambda: run(args, prog=prog), prog=prog)


def main(argv: Sequence[str] | None = None, *, prog: str = "python -m sact.tools.bench") -> int:
    """``python -m sact.tools.bench [options]``: the same command without the ``sact`` front end."""
    from ..tools.bench import bench

    p = argparse.ArgumentParser(prog=prog, description=bench.__doc__.split("\n\n")[0])
    add_arguments(p)
    return run_cli(p.parse_args(argv), prog=prog)
