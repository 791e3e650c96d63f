"""Dense vs sparse-engine inference of a trained SACT detector: backbone ms, detector ms, same detections.

Times, side by side in one process (warm-up, interleaved repeats, medians), the backbone's
stem + stages and the whole detector on fixed validation batches, dense and through
``sact.detection.sparse_detector``; checks the detections agree and writes
``benchmarks/results/detection_sparse.json``.

Usage::

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296 \\
    python benchmarks/detection_sparse.py --checkpoint /tmp/detbench/run_sact_tau0.2 \\
        --data /tmp/detbench/data_1000_300_64
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> int:
    from sact.detection import CocoDetection, load_detector, sparse_detector

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, action="append", required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "detection_sparse.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ds = CocoDetection(args.data / "images" / "test", args.data / "annotations" / "instances_test.json")
    batches = [[ds[i * args.batch_size + j][0] for j in range(args.batch_size)] for i in range(args.batches)]
    rows = []
    for ckpt in args.checkpoint:
        dense = load_detector(ckpt)
        sparse = sparse_detector(copy.deepcopy(dense))
        tensors = [dense.transform(b)[0].tensors for b in batches]  # normalised, padded [B, 1, H, W]

        def run_backbone(det):
            executors, det = (det.stage_executors(), det.detector) if hasattr(det, "stage_executors") else (None, det)
            with torch.no_grad():
                for t in tensors:
                    det.backbone.forward_with_ponder(t, executors=executors)

        def run_detector(det):
            with torch.no_grad():
                for b in batches:
                    det(b)

        for fn in (run_backbone, run_detector):  # warm-up
            fn(dense), fn(sparse)
        times = {"backbone_dense": [], "backbone_sparse": [], "detector_dense": [], "detector_sparse": []}
        for _ in range(args.repeats):  # interleaved so load changes hit both sides alike
            times["backbone_dense"] += _time(lambda: run_backbone(dense), 1)
            times["backbone_sparse"] += _time(lambda: run_backbone(sparse), 1)
            times["detector_dense"] += _time(lambda: run_detector(dense), 1)
            times["detector_sparse"] += _time(lambda: run_detector(sparse), 1)
        n = args.batches * args.batch_size
        med = {k: statistics.median(v) * 1000 / n for k, v in times.items()}  # ms per image
        with torch.no_grad():
            od, osp = dense(batches[0]), sparse(batches[0])
        max_box_diff = max((float((a["boxes"] - b["boxes"]).abs().max()) for a, b in zip(od.detections, osp.detections)
                            if len(a["boxes"]) and a["boxes"].shape == b["boxes"].shape), default=0.0)
        same_counts = all(len(a["boxes"]) == len(b["boxes"]) for a, b in zip(od.detections, osp.detections))
        active = float(torch.cat([s.num_units.float().flatten() for s in od.stages]).mean())
        rows.append({"checkpoint": str(ckpt), "tau": dense.checkpoint_meta.get("tau"), "ms_per_image": med,
                     "backbone_sparse_over_dense": med["backbone_sparse"] / med["backbone_dense"],
                     "detector_sparse_over_dense": med["detector_sparse"] / med["detector_dense"],
                     "backbone_gflops_mean": float(od.backbone_flops.float().mean() / 1e9),
                     "mean_units_per_position": active, "same_detection_counts": same_counts,
                     "max_box_abs_diff": max_box_diff})
        print(json.dumps(rows[-1], indent=2), flush=True)
    env = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
           "torch": torch.__version__, "threads": args.threads, "batch_size": args.batch_size,
           "images": args.batches * args.batch_size, "repeats": args.repeats,
           "malloc_env": {k: os.environ.get(k) for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")},
           "loadavg": os.getloadavg()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"environment": env, "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
