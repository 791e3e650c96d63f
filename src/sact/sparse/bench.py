"""Moved to :mod:`sact.tools.bench.bench`; this alias goes in the next release.

The flags moved to :mod:`sact.commands.bench`; ``python -m sact.sparse.bench`` still runs
``python -m sact.tools.bench``.
"""

import sys

from ..commands.bench import add_arguments, main, run_cli
from ..tools.bench.bench import (
    FULL_GRID,
    QUICK_GRID,
    TRAINED,
    BenchError,
    BenchOptions,
    Workload,
    efficiency,
    environment,
    markdown,
    ratio_summary,
    run_benchmark,
    run_break_even,
    select_workloads,
    spread,
    time_rounds,
)

__all__ = ["Workload", "BenchOptions", "BenchError", "FULL_GRID", "QUICK_GRID", "TRAINED", "select_workloads",
           "run_benchmark", "run_break_even", "spread", "efficiency", "ratio_summary", "time_rounds", "markdown",
           "environment", "add_arguments", "run_cli", "main"]

if __name__ == "__main__":
    sys.exit(main(prog="python -m sact.sparse.bench"))
