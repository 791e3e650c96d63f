"""``sact demo``: train vanilla / ACT / SACT on Cluttered Fashion-MNIST and write a report."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="vanilla vs ACT vs SACT on Cluttered Fashion-MNIST -> report folder",
                       description="Train a vanilla, an ACT and an SACT ResNet of the same depth on Cluttered "
                       "Fashion-MNIST, evaluate them and write report.md + PNGs + checkpoints to --out. "
                       "A few minutes on 2 CPU cores (the measured time is in the report and in "
                       "docs/demo.md); --quick is shorter.")
    p.add_argument("--out", default="reports/demo", help="report folder (default reports/demo)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the files of an earlier demo in --out (only the demo's own files)")
    p.add_argument("--quick", action="store_true", help="the short preset (lower accuracy)")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: search; see docs/demo.md)")
    p.add_argument("--download", action="store_true", help="download Fashion-MNIST with torchvision if missing")
    p.add_argument("--steps", type=int, default=None, help="override: finetune steps (ACT/SACT; vanilla adds the pretrain steps)")
    p.add_argument("--pretrain-steps", type=int, default=None, help="override: vanilla steps before ACT/SACT branch off")
    p.add_argument("--tau", type=float, default=None, help="override: ponder weight of ACT and SACT")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import shlex
    import sys

    from ..tools.demo import PRESETS, run_demo

    settings = PRESETS["quick" if args.quick else "default"]
    changes = {"finetune_steps": args.steps, "pretrain_steps": args.pretrain_steps, "tau_act": args.tau,
               "tau_sact": args.tau, "threads": args.threads, "seed": args.seed}
    # a bad value raises ValueError in DemoSettings: the CLI reports it in one line, exit 2
    settings = dataclasses.replace(settings, **{k: v for k, v in changes.items() if v is not None})
    results = run_demo(settings, args.out, data_dir=args.data_dir, download=args.download,
                       progress=not args.no_progress, command="sact " + shlex.join(sys.argv[1:]),
                       overwrite=args.overwrite)
    for r in results["rows"]:
        print(f"{r['mode']:>8}: top-1 {100 * r['top1']:.2f}%  FLOPs {r['flops_mean'] / 1e6:.2f}M "
              f"({100 * r['relative_flops']:.0f}%)  ponder in/out box {r['box_ponder_ratio']:.2f}")
    print(f"report: {args.out}/report.md ({results['total_time_s'] / 60:.1f} min)")
    return 0
