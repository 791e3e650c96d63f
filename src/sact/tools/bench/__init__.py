"""The sparse engine's benchmark harness (``sact bench``, ``python -m sact.tools.bench``).

* :mod:`~sact.tools.bench.bench`: the rows, the interleaved timing and its statistics, the
  reports and result files; :func:`run_bench` runs what :class:`BenchSettings` asks for.
* :mod:`~sact.tools.bench.workloads`: models with imposed object halting, and a trained
  checkpoint on its own test canvases.
* :mod:`~sact.tools.bench.profile`: where the engine's time goes, per stage and unit.
* :mod:`~sact.tools.bench.break_even`: the active fraction where a row kernel's sparse path
  stops beating its dense path.
* :mod:`~sact.tools.bench.runtimes`: the plain network in ONNX Runtime and OpenVINO beside
  PyTorch and the engine, each contender in its own worker process.

See ``docs/sparse.md``.
"""

from .bench import (
    TRAINED,
    BenchError,
    BenchOptions,
    BenchSettings,
    Workload,
    environment,
    markdown,
    run_bench,
    run_benchmark,
    run_break_even,
    select_workloads,
)
from .workloads import WorkloadError

__all__ = ["run_bench", "BenchSettings", "BenchOptions", "BenchError", "WorkloadError", "Workload", "TRAINED",
           "select_workloads", "run_benchmark", "run_break_even", "markdown", "environment"]
