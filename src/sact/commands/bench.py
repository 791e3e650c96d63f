"""``sact bench``: time the sparse engine against the dense models on this machine.

Wraps ``benchmarks/sparse_speed.py`` (the same options); see ``docs/sparse.md``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path


def _load_benchmark():
    # The benchmark script lives in the repository, next to the package's src/ folder.
    path = Path(__file__).resolve().parents[3] / "benchmarks" / "sparse_speed.py"
    if not path.is_file():
        raise FileNotFoundError(f"benchmark script not found at {path}; run from a source checkout")
    spec = importlib.util.spec_from_file_location("sact_sparse_speed", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time the sparse engine against the dense models (writes benchmarks/results)")
    try:
        _load_benchmark().add_arguments(p)
    except FileNotFoundError:
        p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        bench = _load_benchmark()
    except FileNotFoundError as e:
        print(f"sact bench: {e}", file=sys.stderr)
        return 2
    return bench.main(args, command="sact bench " + " ".join(sys.argv[2:]))
