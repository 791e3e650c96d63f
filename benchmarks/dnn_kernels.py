"""Plain against packed oneDNN weights, for the convolutions and row products of ResNet-50's units.

    python benchmarks/dnn_kernels.py --threads 2 --rounds 7 --tag 2threads

Per shape, interleaved rounds (the order rotating), each round the median of ``--iters``
calls: ``F.conv2d`` on channels-last features (what the engine ran before
:mod:`sact.sparse.dnn`) against :class:`sact.sparse.dnn.PackedConv` with the ReLU fused, and
``mkldnn._linear_pointwise`` with a plain ``(out, in)`` weight against the packed one
(:func:`sact.sparse.dnn.packed_linear_weight`). Reports each median, the per-round ratio
packed / plain (median and min-max) and GFLOP/s; prints the environment and writes
``dnn_kernels_<tag>.{json,md}`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sact.sparse import dnn
from sact.tools.bench.bench import environment

# (kind, batch, in, out, map side or rows, kernel, stride); rows: "linear" products (M, K) x (K, N)
CONVS = [(1, 64, 64, 56, 3, 1), (1, 128, 128, 56, 3, 2), (1, 128, 128, 28, 3, 1), (1, 256, 256, 14, 3, 1),
         (1, 512, 512, 7, 3, 1), (1, 256, 64, 56, 1, 1), (1, 1024, 256, 14, 1, 1), (1, 512, 2048, 7, 1, 1),
         (8, 64, 64, 56, 3, 1), (8, 256, 256, 14, 3, 1), (8, 512, 512, 7, 3, 1), (8, 1024, 256, 14, 1, 1)]
LINEARS = [(8, 4608, 512), (40, 4608, 512), (49, 2048, 512), (64, 576, 64), (600, 576, 64), (392, 4608, 512)]


def _median_ms(f, iters: int) -> float:
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def _compare(name: str, gflop: float, plain, packed, rounds: int, iters: int) -> dict:
    for f in (plain, packed, plain, packed):  # warm-up (packing, primitive caches)
        f()
    times = {"plain": [], "packed": []}
    for r in range(rounds):
        order = [("plain", plain), ("packed", packed)]
        for key, f in order if r % 2 == 0 else order[::-1]:
            times[key].append(_median_ms(f, iters))
    ratios = [b / a for a, b in zip(times["plain"], times["packed"])]
    row = {"name": name, "gflop": gflop, **{f"{k}_ms": statistics.median(v) for k, v in times.items()},
           "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}
    print(f"{name}: plain {row['plain_ms']:.3f} ms, packed {row['packed_ms']:.3f} ms, packed/plain "
          f"{row['ratio']:.2f} ({row['ratio_min']:.2f}-{row['ratio_max']:.2f})", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--tag", default="2threads")
    args = p.parse_args(argv)
    if not dnn.available():
        raise SystemExit("this torch has no oneDNN fused convolution ops: nothing to compare")
    torch.set_num_threads(args.threads)
    env = environment(args.threads)
    print(env)
    torch.manual_seed(0)
    rows = []
    for b, cin, cout, side, k, s in CONVS:
        x = torch.randn(b, cin, side, side).contiguous(memory_format=torch.channels_last)
        w, bias = torch.randn(cout, cin, k, k) * 0.05, torch.randn(cout)
        wcl, pc = w.contiguous(memory_format=torch.channels_last), dnn.PackedConv(w, bias, stride=s, padding=k // 2)
        out = (side + 2 * (k // 2) - k) // s + 1
        gflop = 2 * b * cout * cin * k * k * out * out / 1e9
        rows.append(_compare(f"conv b{b} {cin}->{cout} {side}x{side} k{k} s{s}", gflop,
                             lambda: F.conv2d(x, wcl, bias, stride=s, padding=k // 2).relu_(),
                             lambda: pc(x, relu=True), args.rounds, args.iters))
    for m, kk, n in LINEARS:
        x, wt, bias = torch.randn(m, kk), torch.randn(n, kk) * 0.05, torch.randn(n)
        packed = dnn.packed_linear_weight(wt)
        rows.append(_compare(f"linear ({m} x {kk}) @ ({kk} x {n})", 2 * m * kk * n / 1e9,
                             lambda: torch.ops.mkldnn._linear_pointwise(x, wt, bias, "relu", [], ""),
                             lambda: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "relu", [], ""),
                             args.rounds, args.iters))
    command = "python benchmarks/dnn_kernels.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    base = args.out / f"dnn_kernels_{args.tag}"
    base.with_suffix(".json").write_text(json.dumps({"command": command, "environment": env, "rows": rows}, indent=2) + "\n")
    lines = [f"Command: `{command}`", "", f"Environment: {env}", "",
             "| op | GFLOP | plain ms | packed ms | packed / plain (min-max) | GFLOP/s plain | packed |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['gflop']:.3f} | {r['plain_ms']:.3f} | {r['packed_ms']:.3f} | {r['ratio']:.2f} "
                     f"({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) | {r['gflop'] / r['plain_ms'] * 1e3:.0f} | "
                     f"{r['gflop'] / r['packed_ms'] * 1e3:.0f} |")
    base.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {base}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
