"""``sact bench``: time the sparse engine against the vanilla and dense SACT models on this machine.

The benchmark is :mod:`sact.sparse.bench` (also ``python -m sact.sparse.bench``); results
go to ``./sact_bench/`` or ``--out``. See ``docs/sparse.md``.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from ..sparse.bench import add_arguments

    p = sub.add_parser("bench", help="time the sparse engine against the vanilla and dense models (-> ./sact_bench)",
                       description="Time the sparse engine (sact.to_sparse) against the vanilla network (NCHW and "
                       "channels-last) and the dense SACT model, interleaved, with medians and spread over rounds; "
                       "results in OUT/sparse_speed[_TAG].{json,md}.")
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..sparse.bench import run_cli

    return run_cli(args, prog="sact bench")
