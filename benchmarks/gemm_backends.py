"""The row products of the sparse engine: ``torch.addmm`` (MKL in the official wheels) vs
oneDNN's linear (``sact.sparse.gemm.linear``), interleaved, median over rounds.

    python benchmarks/gemm_backends.py --threads 2 --shape 3136 256 64

This is the measurement behind ``sact.sparse.gemm`` (docs/sparse.md, "How it works").
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sact.tools.bench.bench import environment
from sact.sparse.gemm import linear, use_onednn


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shape", type=int, nargs=3, default=(3136, 256, 64), metavar=("M", "K", "N"))
    p.add_argument("--reps", type=int, default=200)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    m, k, n = args.shape
    x, wt, b = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
    if not use_onednn(x):
        raise SystemExit("oneDNN's linear is not available in this torch build")
    variants = {"addmm": lambda: torch.addmm(b, x, wt.t()), "onednn": lambda: linear(x, wt, b)}
    torch.testing.assert_close(variants["addmm"](), variants["onednn"](), rtol=1e-4, atol=1e-3)
    times = {name: [] for name in variants}
    for r in range(args.reps + 10):
        for name, f in variants.items():
            t0 = time.perf_counter()
            f()
            if r >= 10:  # warm-up rounds
                times[name].append(time.perf_counter() - t0)
    env = environment(args.threads)
    print(f"CPU {env['cpu']}, threads {args.threads}, torch {env['torch']}; ({m} x {k}) @ ({k} x {n}), "
          f"median over {args.reps} interleaved rounds")
    for name, ts in times.items():
        print(f"  {name:>6}: {1e3 * statistics.median(ts):.3f} ms [{1e3 * statistics.quantiles(ts, n=4)[0]:.3f}-"
              f"{1e3 * statistics.quantiles(ts, n=4)[2]:.3f}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
