"""What an *exported* SACT model costs in the runtimes a deployer uses, against the exported plain network.

The exported SACT graph is the dense masked model (docs/export.md): every unit runs at every
position, plus the halting branches and the halting arithmetic. This script measures how much
that costs against the exported vanilla network of the same architecture, in ONNX Runtime and
(if installed: ``pip install -e '.[bench]'``) OpenVINO, with each runtime's own thread pool.

Fair timing: every (model file, runtime) pair runs in its own worker process, started once and
kept for all rounds; the rounds are interleaved (vanilla, sact, vanilla, sact ...), and each
round's timing is the median of ``--iters`` calls after warm-up. Reported: per-round medians,
and the ratio SACT / vanilla of each round (same runtime, same round), as median and range.
The halting decisions do not matter here (the dense graph computes everything), so random
weights are measured.

    python benchmarks/export_runtime.py --threads 2 --out benchmarks/results --tag 2threads

writes ``export_runtime_<tag>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

# (model, image side, batch)
ROWS = [("resnet50", 224, 1), ("resnet50_v2", 224, 1), ("resnet32_cifar", 32, 1), ("resnet32_cifar", 32, 16)]
MODES = ("vanilla", "sact")


def _runtimes() -> list[str]:
    found = []
    for name, module in (("onnxruntime", "onnxruntime"), ("openvino", "openvino")):
        try:
            __import__(module)
            found.append(name)
        except ImportError:
            print(f"{name} is not installed: skipped (pip install -e '.[bench]')", file=sys.stderr)
    return found


def _worker(conn, runtime: str, path: str, shape: tuple[int, ...], threads: int, iters: int, warmup: int) -> None:
    """Loads one ONNX file in one runtime and answers 'time' requests with the median call time (s)."""
    import numpy as np

    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    if runtime == "onnxruntime":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        call = lambda: sess.run(None, {name: x})  # noqa: E731
    else:
        import openvino as ov

        core = ov.Core()
        compiled = core.compile_model(path, "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                                                    "INFERENCE_PRECISION_HINT": "f32"})
        request = compiled.create_infer_request()
        call = lambda: request.infer({0: x})  # noqa: E731
    for _ in range(warmup):
        call()
    conn.send("ready")
    while conn.recv() == "time":
        samples = []
        for _ in range(iters):
            t0 = time.perf_counter()
            call()
            samples.append(time.perf_counter() - t0)
        conn.send(statistics.median(samples))
    conn.close()


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
    p.add_argument("--iters", type=int, default=20, help="timed calls per round (median)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rows", default="all", help="'all' or comma-separated indices into ROWS")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--tag", default="2threads")
    args = p.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    from sact.tools.bench.bench import environment

    rows = ROWS if args.rows == "all" else [ROWS[int(i)] for i in args.rows.split(",")]
    runtimes = _runtimes()
    if not runtimes:
        print("no runtime installed: nothing to measure", file=sys.stderr)
        return 1
    env = environment(args.threads)
    env["runtimes"] = {}
    for r in runtimes:
        env["runtimes"][r] = __import__(r).__version__
    print(json.dumps(env, indent=1), file=sys.stderr)
    ctx = mp.get_context("spawn")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for model_name, side, batch in rows:
            files = {mode: _export(model_name, mode, side, Path(tmp)) for mode in MODES}
            for runtime in runtimes:
                workers = {}
                for mode in MODES:
                    parent, child = ctx.Pipe()
                    proc = ctx.Process(target=_worker, args=(child, runtime, str(files[mode]), (batch, 3, side, side),
                                                             args.threads, args.iters, args.warmup))
                    proc.start()
                    workers[mode] = (proc, parent)
                    assert parent.recv() == "ready"  # one at a time: the other worker idles in recv()
                times = {mode: [] for mode in MODES}
                for rnd in range(args.rounds):
                    order = MODES if rnd % 2 == 0 else MODES[::-1]
                    for mode in order:
                        workers[mode][1].send("time")
                        times[mode].append(workers[mode][1].recv())
                for proc, conn in workers.values():
                    conn.send("stop")
                    proc.join()
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
