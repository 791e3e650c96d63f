"""What an *exported* SACT model costs in the runtimes a deployer uses, against the exported plain network.

The exported SACT graph is the dense masked model (docs/export.md): every unit runs at every
position, plus the halting branches and the halting arithmetic. This script measures how much
that costs against the exported vanilla network of the same architecture, in ONNX Runtime and
(if installed: ``pip install -e '.[bench]'``) OpenVINO, with each runtime's own thread pool.

Fair timing: every (model file, runtime) pair runs in its own worker process, started once and
kept for all rounds (:func:`sact.tools.bench.runtimes.time_workers`, the workers of
``sact bench --runtimes``); the rounds are interleaved (vanilla, sact, sact, vanilla ...), and
each round's timing is the median of k calls after warm-up (k per worker, a round about 0.3 s). Reported: per-round medians,
and the ratio SACT / vanilla of each round (same runtime, same round), as median and range.
The halting decisions do not matter here (the dense graph computes everything), so random
weights are measured.

    python benchmarks/export_runtime.py --threads 2 --out benchmarks/results --tag 2threads

writes ``export_runtime_<tag>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

# (model, image side, batch)
ROWS = [("resnet50", 224, 1), ("resnet50_v2", 224, 1), ("resnet32_cifar", 32, 1), ("resnet32_cifar", 32, 16)]
MODES = ("vanilla", "sact")


def _export(model_name: str, mode: str, side: int, folder: Path) -> Path:
    import torch

    import sact
    from sact.export import export_model

    torch.manual_seed(0)
    model = sact.create_model(model_name, mode=mode).eval()
    path = folder / f"{model_name}_{mode}_{side}.onnx"
    export_model(model, path, image_size=side)
    return path


def _summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=5, help="untimed calls in each worker first")
    p.add_argument("--rows", default="all", help="'all' or comma-separated indices into ROWS")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--tag", default="2threads")
    args = p.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    import numpy as np

    from sact.tools.bench.bench import environment
    from sact.tools.bench.runtimes import Contender, resolve_runtimes, runtime_versions, time_workers

    rows = ROWS if args.rows == "all" else [ROWS[int(i)] for i in args.rows.split(",")]
    runtimes, skipped = resolve_runtimes(["auto"])
    for line in skipped:
        warnings.warn(line, stacklevel=1)
    if not runtimes:
        print("no runtime installed: nothing to measure", file=sys.stderr)
        return 1
    env = environment(args.threads)
    env["runtimes"] = runtime_versions(runtimes)
    print(json.dumps(env, indent=1), file=sys.stderr)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for model_name, side, batch in rows:
            files = {mode: _export(model_name, mode, side, Path(tmp)) for mode in MODES}
            x = np.random.default_rng(0).standard_normal((batch, 3, side, side)).astype(np.float32)
            for runtime in runtimes:
                workers = time_workers([Contender(mode, runtime, x, path=str(files[mode])) for mode in MODES],
                                       threads=args.threads, rounds=args.rounds, warmup=args.warmup)
                times = {w.contender.name: w.seconds for w in workers}
                ratios = [s / v for s, v in zip(times["sact"], times["vanilla"])]
                row = {"model": model_name, "image_size": side, "batch": batch, "runtime": runtime,
                       "ms": {m: _summary([t * 1e3 for t in times[m]]) for m in MODES},
                       "sact_over_vanilla": _summary(ratios)}
                results.append(row)
                print(f"{model_name} @{side} b{batch} {runtime}: vanilla {row['ms']['vanilla']['median']:.2f} ms, "
                      f"sact {row['ms']['sact']['median']:.2f} ms, ratio {row['sact_over_vanilla']['median']:.2f} "
                      f"({row['sact_over_vanilla']['min']:.2f}-{row['sact_over_vanilla']['max']:.2f})", file=sys.stderr)
    from sact.tools.bench.bench import _loadavg

    env["loadavg_end"] = _loadavg()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"environment": env, "settings": vars(args), "rows": results}
    (out / f"export_runtime_{args.tag}.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = [f"# Exported SACT (dense masked) vs exported vanilla, {args.threads} threads",
             "", "`python benchmarks/export_runtime.py " + " ".join(argv or sys.argv[1:]) + "`", "",
             "| model | batch | runtime | vanilla ms | SACT ms | SACT / vanilla (median, range) |", "|---|---|---|---|---|---|"]
    for r in results:
        s = r["sact_over_vanilla"]
        lines.append(f"| {r['model']} @{r['image_size']} | {r['batch']} | {r['runtime']} | {r['ms']['vanilla']['median']:.2f} | "
                     f"{r['ms']['sact']['median']:.2f} | {s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f}) |")
    (out / f"export_runtime_{args.tag}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / f'export_runtime_{args.tag}.json'} and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
