"""``sact plot``: accuracy-vs-FLOPs and per-stage num_units plots from ``metrics.json`` files
(the plots and the input contract: :mod:`sact.tools.plots`)."""

from __future__ import annotations

import argparse
import sys

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plot",
        help="accuracy-vs-FLOPs and num_units histograms from metrics.json files of sact eval",
        description="Writes accuracy_vs_flops.png (one curve per (model, mode), points labelled with tau) and "
        "num_units_<model>_<mode>_tau<tau>.png per file. Exit status 2 if a file lacks a required key.",
    )
    p.add_argument("metrics", nargs="+", metavar="METRICS.json", help="metrics files written by sact eval")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace plots already in --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..tools.plots import write_plots

    written, warnings = write_plots(args.metrics, args.out, overwrite=args.overwrite)
    for w in warnings:
        print(f"sact plot: warning: {w}", file=sys.stderr)
    for p in written:
        print(p)
    return 0
