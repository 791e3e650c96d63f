"""mAP and backbone FLOPs of Faster R-CNN on multi-object Cluttered Fashion-MNIST: vanilla vs SACT at several tau.

Runs ``sact detect make-data`` once, then one ``sact detect train`` per configuration (in
parallel processes, one thread each), collects each run's ``metrics.json`` and writes
``benchmarks/results/detection_tau_seed<SEED>.{json,md}`` plus a ponder-map figure of one detection
example (``docs/images/detection_ponder.png``) from the SACT run with the middle tau.

Usage (about 30-60 min on 2 shared CPU cores with the defaults)::

    python benchmarks/detection_tau.py --work /tmp/detbench
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/detbench"))
    p.add_argument("--num-train", type=int, default=1000)
    p.add_argument("--num-val", type=int, default=300)
    p.add_argument("--canvas-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--model", default="resnet20_cifar")
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--taus", type=float, nargs="+", default=[0.01, 0.05, 0.2])
    p.add_argument("--parallel", type=int, default=4)
    p.add_argument("--seed", type=int, default=0, help="training seed (the data stay the same)")
    args = p.parse_args()

    data = args.work / f"data_{args.num_train}_{args.num_val}_{args.canvas_size}"
    sact = [sys.executable, "-m", "sact.cli"]
    if not (data / "annotations" / "instances_test.json").exists():
        subprocess.run(sact + ["detect", "make-data", "--out", str(data), "--num-train", str(args.num_train),
                               "--num-val", str(args.num_val), "--canvas-size", str(args.canvas_size)], check=True)
    runs = [("vanilla", 0.0)] + [("sact", t) for t in args.taus]
    common = ["detect", "train", "--data", str(data), "--model", args.model, "--width", str(args.width),
              "--epochs", str(args.epochs), "--batch-size", "8", "--device", "cpu",
              "--fpn-channels", "32", "--representation-size", "128", "--box-batch-size", "64", "--lr", "0.01",
              "--seed", str(args.seed)]
    tag = "" if args.seed == 0 else f"_s{args.seed}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.time()
    procs, results = [], []
    pending = list(runs)
    while pending or procs:
        while pending and len(procs) < args.parallel:
            mode, tau = pending.pop(0)
            out = args.work / f"run_{mode}_tau{tau:g}{tag}"
            log = open(args.work / f"run_{mode}_tau{tau:g}{tag}.log", "w")
            cmd = sact + common + ["--mode", mode, "--tau", str(tau), "--out", str(out)]
            print("$", " ".join(cmd), flush=True)
            procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), mode, tau, out, log))
        time.sleep(5)
        for item in list(procs):
            proc, mode, tau, out, log = item
            if proc.poll() is not None:
                procs.remove(item)
                log.close()
                if proc.returncode != 0:
                    print(f"run {mode} tau={tau} failed ({proc.returncode}); see its log", flush=True)
                    continue
                m = json.loads((out / "metrics.json").read_text())
                results.append({"mode": mode, "tau": tau, "run": str(out), **{k: m[k] for k in (
                    "AP", "AP50", "AP75", "APs", "APm", "APl", "backbone_gflops_mean", "backbone_gflops_std",
                    "ponder_cost_mean", "images_per_s")}})
                print(f"done {mode} tau={tau}: AP {m['AP']:.3f} AP50 {m['AP50']:.3f} GFLOPs "
                      f"{m['backbone_gflops_mean']:.4f} ({time.time() - t0:.0f}s)", flush=True)
    results.sort(key=lambda r: (r["mode"] != "vanilla", r["tau"]))
    env_info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
                "torch": __import__("torch").__version__, "wall_s": round(time.time() - t0, 1),
                "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "train_command": " ".join(["sact"] + common[:]) + " --mode MODE --tau TAU --out DIR"}
    res_dir = ROOT / "benchmarks" / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    (res_dir / f"detection_tau_seed{args.seed}.json").write_text(json.dumps({"environment": env_info, "results": results}, indent=2))
    lines = ["| backbone | tau | AP | AP50 | AP75 | backbone GFLOPs/img (mean +- std) | ponder cost | eval img/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {args.model} w{args.width} {r['mode']} | {r['tau']:g} | {r['AP']:.3f} | {r['AP50']:.3f} | "
                     f"{r['AP75']:.3f} | {r['backbone_gflops_mean']:.4f} +- {r['backbone_gflops_std']:.4f} | "
                     f"{r['ponder_cost_mean']:.2f} | {r['images_per_s']:.1f} |")
    (res_dir / f"detection_tau_seed{args.seed}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    sact_runs = [r for r in results if r["mode"] == "sact"]
    if sact_runs and args.seed == 0:
        mid = sact_runs[len(sact_runs) // 2]  # the middle tau: halting neither saturated nor absent
        render(Path(mid["run"]), data, ROOT / "docs" / "images" / "detection_ponder.png")
    return 0


def render(checkpoint: Path, data: Path, out: Path, *, num: int = 3, min_score: float = 0.5) -> None:
    """Figure: per example, [image + detections | summed ponder map | overlay]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from sact.detection import CocoDetection, load_detector
    from sact.viz import colorize, overlay, summed_map, to_display

    det = load_detector(checkpoint)
    ds = CocoDetection(data / "images" / "test", data / "annotations" / "instances_test.json", in_chans=1)
    images = [ds[i][0] for i in range(num)]
    with torch.no_grad():
        o = det(images)
    h, w = images[0].shape[-2:]
    maps = summed_map(o.stages, (h, w)).numpy()  # [num, H, W], stages nearest-resized and summed
    vmin, vmax = float(maps.min()), float(maps.max())
    fig, axes = plt.subplots(num, 3, figsize=(7.5, 2.6 * num))
    for i in range(num):
        ax = axes[i]
        ax[0].imshow(to_display(images[i]))
        d = o.detections[i]
        for box, s, lab in zip(d["boxes"].tolist(), d["scores"].tolist(), d["labels"].tolist()):
            if s >= min_score:
                ax[0].add_patch(plt.Rectangle((box[0], box[1]), box[2] - box[0], box[3] - box[1], fill=False,
                                              color="red", lw=1))
                ax[0].text(box[0], box[1] - 1, f"{ds.class_names[lab - 1]} {s:.2f}", color="red", fontsize=6)
        ax[1].imshow(colorize(maps[i], vmin=vmin, vmax=vmax))
        ax[2].imshow(overlay(images[i], maps[i], vmin=vmin, vmax=vmax))
        for a, t in zip(ax, ("detections (score >= %.1f)" % min_score, f"ponder cost ({vmin:.1f}-{vmax:.1f})",
                             "overlay")):
            a.set_title(t, fontsize=8)
            a.axis("off")
    fig.suptitle(f"SACT Faster R-CNN, tau={det.checkpoint_meta.get('tau')}", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
