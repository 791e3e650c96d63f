"""The sparse engine of two source trees side by side: did a change make it slower?

    git worktree add /tmp/base <rev>
    python benchmarks/engine_ab.py --base /tmp/base/src --out benchmarks/results --tag refactor_2threads

Each (tree, row) measurement runs in a fresh process (``PYTHONPATH`` = that tree's ``src``), the
rounds alternate the order of the two trees, and each process reports the median of
``--iters`` forward passes of ``sact.to_sparse(model)`` on the benchmark's imposed-halting
workload (random weights seeded the same in both trees, so both run the same network on the
same images; the FLOPs are checked equal). Reported per row: each tree's median over rounds
and the ratio new / base per round (median and range). Writes ``engine_ab_<tag>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# (model, image side, batch, disc radius as a fraction of the side)
ROWS = [("resnet50", 224, 1, 0.25), ("resnet50_v2", 224, 1, 0.25), ("resnet32_cifar", 32, 16, 0.3)]

_ONE = r'''
import json, statistics, sys, time
import torch
torch.set_num_threads(int(sys.argv[6]))
import sact
try:
    from sact.tools.bench.workloads import object_inputs, object_model
except ImportError:  # trees before the harness moved to sact.tools
    from sact.sparse.workloads import object_inputs, object_model
name, size, batch, radius, iters = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
torch.manual_seed(0)
model, _ = object_model(name, image_size=size)
x = object_inputs(batch, size, radius)[0]
sparse = sact.to_sparse(model)
with torch.no_grad():
    flops = int(sparse(x).flops.sum())
    for _ in range(3):
        sparse(x)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        sparse(x)
        times.append(time.perf_counter() - t0)
print(json.dumps({"ms": 1e3 * statistics.median(times), "flops": flops}))
'''


def _run(src: str, row, iters: int, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": src, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", _ONE, *map(str, row), str(iters), str(threads)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="the base tree's src folder")
    p.add_argument("--new", default=str(ROOT / "src"), help="the new tree's src folder (default: this checkout)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--iters", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", default="all", help="'all' or comma-separated indices into ROWS")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--tag", default="2threads")
    args = p.parse_args(argv)

    trees = {"base": args.base, "new": args.new}
    results = []
    rows = ROWS if args.rows == "all" else [ROWS[int(i)] for i in args.rows.split(",")]
    for row in rows:
        ms = {k: [] for k in trees}
        flops = {}
        for rnd in range(args.rounds):
            for k in (("base", "new") if rnd % 2 == 0 else ("new", "base")):
                r = _run(trees[k], row, args.iters, args.threads)
                ms[k].append(r["ms"])
                flops.setdefault(k, r["flops"])
        if flops["base"] != flops["new"]:
            raise SystemExit(f"{row}: FLOPs differ between the trees ({flops}): not the same computation")
        ratios = [n / b for n, b in zip(ms["new"], ms["base"])]
        entry = {"model": row[0], "image_size": row[1], "batch": row[2], "radius": row[3], "flops": flops["new"],
                 "base_ms": statistics.median(ms["base"]), "new_ms": statistics.median(ms["new"]),
                 "ratio": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
                 "rounds": {"base": ms["base"], "new": ms["new"]}}
        results.append(entry)
        print(f"{row[0]} @{row[1]} b{row[2]} r{row[3]}: base {entry['base_ms']:.2f} ms, new {entry['new_ms']:.2f} ms, "
              f"new/base {entry['ratio']['median']:.3f} ({entry['ratio']['min']:.3f}-{entry['ratio']['max']:.3f})",
              file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"engine_ab_{args.tag}.json"
    path.write_text(json.dumps({"settings": vars(args), "rows": results}, indent=1) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
