"""Accuracy vs FLOPs on Cluttered Fashion-MNIST: shallower vanilla ResNets vs ACT / SACT.

The paper's central comparison at CPU scale. Models (CIFAR-style pre-activation ResNets,
``in_chans=1``, 64x64 canvases):

* vanilla ResNets with n = 1, 2, 3 units per stage (ResNet-8 / -14 / -20), trained from
  scratch for ``--steps`` steps;
* SACT (several tau) and ACT models with n = 3, warm-started from the vanilla n = 3 model
  at step ``--pretrain-steps`` (halting branches fresh; the paper's fine-tuning) and
  trained ``--steps - --pretrain-steps`` more steps, so every model takes ``--steps`` steps.

Everything is evaluated on the same test canvases; FLOPs are counted per image from the
real masks. Results (written after every model, so a crash keeps what was done):
``<out>.json``, ``<out>.md`` (table), ``<out>.png`` (plot).

Run (the committed results)::

    python benchmarks/accuracy_vs_flops.py --out benchmarks/results/accuracy_vs_flops
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

import sact
from sact.checkpoint import atomic_write_bytes, save_checkpoint
from sact.engine.config import TrainConfig
from sact.engine.demo import _Cached, _maps, ponder_box_stats
from sact.engine.train import main as train_main


def _register_shallow() -> None:
    """ResNet-8 / -14 (n = 1 / 2) for this benchmark only (not in the public registry)."""
    from sact.models import CifarResNet

    for depth, n in ((8, 1), (14, 2)):
        name = f"resnet{depth}_cifar"
        if name in sact.list_models():
            continue

        def build(*, mode="sact", num_classes=10, in_chans=3, base_channels=16, eps=0.01, _n=n):
            return CifarResNet(layers=(_n, _n, _n), mode=mode, num_classes=num_classes, in_chans=in_chans,
                               base_channels=base_channels, eps=eps)

        sact.register_model(name, build)


def _config(args, *, model: str, mode: str, tau: float, steps: int, init: str | None, out: Path) -> TrainConfig:
    return TrainConfig(
        model=model, mode=mode, model_kwargs={"base_channels": args.base_channels}, tau=tau, dataset="cluttered",
        train_samples=args.train_samples, eval_samples=args.eval_samples, clutter={"canvas_size": args.canvas_size},
        batch_size=args.batch_size, eval_batch_size=200, steps=steps, lr=args.lr, schedule="piecewise", init=init,
        out_dir=str(out), tensorboard=False, progress=False, amp="none", device="cpu", threads=args.threads,
        seed=args.seed, log_every=10**9, image_every=0, halting_lr_mult=args.halting_lr_mult if mode != "vanilla" else 1.0,
    )


def _write(out: Path, results: dict) -> None:
    atomic_write_bytes(out.with_suffix(".json"), json.dumps(results, indent=2).encode())
    rows = results["rows"]
    if not rows:
        return
    base = next((r["flops_mean"] for r in rows if r["mode"] == "vanilla" and r["units_per_stage"] == 3), rows[0]["flops_mean"])
    lines = [
        "| model | units/stage | tau | top-1 (%) | MFLOPs mean | MFLOPs std | FLOPs vs ResNet-20 | ponder in/out box | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r["flops_mean"]):
        lines.append(
            f"| {r['mode']} {r['model']} | {r['units_per_stage']} | {r['tau']:g} | {100 * r['top1']:.2f} | "
            f"{r['flops_mean'] / 1e6:.2f} | {r['flops_std'] / 1e6:.2f} | {100 * r['flops_mean'] / base:.1f}% | "
            f"{r['box_ponder_ratio']:.3f} | {r['train_time_s']:.0f} |"
        )
    env = results["environment"]
    lines += ["", f"Command: `{results['command']}`  "]
    if "reused_vanilla_from" in results:
        lines += [f"Vanilla rows (and the ResNet-20 snapshot at step {results['settings']['pretrain_steps']} that ACT / SACT "
                  f"start from) reused from: `{results['reused_vanilla_from']}`  "]
    lines += [ f"Settings: {json.dumps(results['settings'])}  ",
              f"Environment: torch {env['torch']}, {env['jobs']} jobs x {env['threads_per_job']} threads, {env['cpu']}, load average at start "
              f"{env['load_start']}, at end {env.get('load_end', 'n/a')}; total {results.get('total_time_s', 0) / 60:.1f} min."]
    atomic_write_bytes(out.with_suffix(".md"), ("\n".join(lines) + "\n").encode())
    _plot(out.with_suffix(".png"), rows)


def _plot(path: Path, rows: list[dict]) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    van = sorted((r for r in rows if r["mode"] == "vanilla"), key=lambda r: r["flops_mean"])
    sa = sorted((r for r in rows if r["mode"] == "sact"), key=lambda r: r["flops_mean"])
    ac = [r for r in rows if r["mode"] == "act"]
    if van:
        ax.plot([r["flops_mean"] / 1e6 for r in van], [100 * r["top1"] for r in van], "s-", color="tab:gray",
                label="vanilla n=1,2,3")
        for r in van:
            ax.annotate(f"n={r['units_per_stage']}", (r["flops_mean"] / 1e6, 100 * r["top1"]), fontsize=7,
                        xytext=(4, -10), textcoords="offset points")
    if sa:
        ax.plot([r["flops_mean"] / 1e6 for r in sa], [100 * r["top1"] for r in sa], "o-", color="tab:orange",
                label="SACT n=3")
        for r in sa:
            ax.annotate(f"tau={r['tau']:g}", (r["flops_mean"] / 1e6, 100 * r["top1"]), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
    for r in ac:
        ax.plot(r["flops_mean"] / 1e6, 100 * r["top1"], "^", color="tab:blue", ms=8, label=f"ACT n=3 tau={r['tau']:g}")
    ax.set_xlabel("MFLOPs per image (mean)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("Cluttered Fashion-MNIST 64x64: accuracy vs FLOPs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    plt.close(fig)


_DATA = None  # (args, train, test, init path, work dir), set before the pool forks


def _run_job(job) -> dict:
    args, train, test, init, work = _DATA
    mode, model, n, tau, steps, src = job
    torch.set_num_threads(args.threads or 1)
    t = time.perf_counter()
    cfg = _config(args, model=model, mode=mode, tau=tau, steps=steps, init=src, out=work / f"{mode}_n{n}_tau{tau:g}")

    def keep_init(step, net):
        if step == args.pretrain_steps:
            save_checkpoint(net, init, meta={"step": step})

    metrics = train_main(cfg, train_set=train, eval_set=test, step_callback=keep_init if (mode == "vanilla" and n == 3) else None)
    net = sact.load_checkpoint(Path(cfg.out_dir) / "model")
    ponder, units = _maps(net, test.images)
    box = ponder_box_stats(units, ponder, test.boxes, len(net.stages))
    return {"mode": mode, "model": model, "units_per_stage": n, "tau": tau, "top1": metrics["top1"],
            "loss": metrics["loss"], "flops_mean": metrics["flops_mean"], "flops_std": metrics["flops_std"],
            "ponder_cost": metrics["ponder_cost_mean"], "stages": metrics["stages"],
            **{f"box_{k}": v for k, v in box.items()}, "train_time_s": time.perf_counter() - t}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results/accuracy_vs_flops", help="results path without suffix")
    p.add_argument("--work", default="/tmp/sact_accuracy_vs_flops", help="folder for the runs' checkpoints")
    p.add_argument("--steps", type=int, default=400, help="optimisation steps of every model")
    p.add_argument("--pretrain-steps", type=int, default=250, help="vanilla n=3 steps before ACT/SACT branch off")
    p.add_argument("--taus", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.2])
    p.add_argument("--act-tau", type=float, default=0.05)
    p.add_argument("--depths", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--base-channels", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--train-samples", type=int, default=20000)
    p.add_argument("--eval-samples", type=int, default=1000)
    p.add_argument("--canvas-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads per job")
    p.add_argument("--jobs", type=int, default=3, help="models trained at the same time (processes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--halting-lr-mult", type=float, default=20.0, help="learning-rate multiplier of the halting branches")
    p.add_argument("--reuse-vanilla", action="store_true",
                   help="keep the vanilla rows of an earlier <out>.json and its ResNet-20 snapshot in --work; train ACT/SACT only")
    args = p.parse_args()
    if not 0 < args.pretrain_steps < args.steps:
        p.error(f"--pretrain-steps must be in (0, --steps), got {args.pretrain_steps}")
    _register_shallow()
    from sact import data as D

    start = time.perf_counter()
    out, work = Path(args.out), Path(args.work)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {
        "command": "python " + " ".join(sys.argv),
        "settings": vars(args),
        "environment": {"torch": torch.__version__, "threads_per_job": args.threads, "jobs": args.jobs,
                        "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                        "load_start": os.getloadavg()},
        "rows": [],
    }
    clutter = D.ClutterConfig(canvas_size=args.canvas_size)
    train = _Cached(D.ClutteredFashionMNIST(split="train", num_samples=args.train_samples, seed=args.seed, config=clutter).stack())
    test = _Cached(D.ClutteredFashionMNIST(split="test", num_samples=args.eval_samples, seed=args.seed + 1, config=clutter).stack())
    print(f"data ready in {time.perf_counter() - start:.0f} s", flush=True)
    init = work / "vanilla3_init" / "model"
    names = {1: "resnet8_cifar", 2: "resnet14_cifar", 3: "resnet20_cifar"}
    if 3 not in args.depths:
        p.error("--depths must include 3 (the ACT / SACT starting point)")
    finetune = args.steps - args.pretrain_steps
    phases = [
        [("vanilla", names[n], n, 0.0, args.steps, None) for n in sorted(args.depths, reverse=True)],
        [("act", names[3], 3, args.act_tau, finetune, str(init))]
        + [("sact", names[3], 3, tau, finetune, str(init)) for tau in args.taus],
    ]
    if args.reuse_vanilla:
        old = json.loads(out.with_suffix(".json").read_text())
        results["rows"] = [r for r in old["rows"] if r["mode"] == "vanilla"]
        results["reused_vanilla_from"] = old["command"]
        if not init.with_suffix(".safetensors").exists():
            p.error(f"--reuse-vanilla needs the snapshot {init}.safetensors")
        phases = phases[1:]
    global _DATA
    _DATA = (args, train, test, init, work)
    import multiprocessing as mp

    # fork: the workers share the canvases drawn above; every job is one process with
    # `--threads` threads, `--jobs` of them at a time
    with mp.get_context("fork").Pool(args.jobs) as pool:
        for jobs in phases:
            for row in pool.imap(_run_job, jobs):
                results["rows"].append(row)
                results["total_time_s"] = time.perf_counter() - start
                results["environment"]["load_end"] = os.getloadavg()
                _write(out, results)
                print(f"{row['mode']:>7} {row['model']} tau={row['tau']:g}: top-1 {100 * row['top1']:.2f}%  "
                      f"{row['flops_mean'] / 1e6:.2f} MFLOPs  ponder in/out {row['box_ponder_ratio']:.3f}  "
                      f"({row['train_time_s']:.0f} s)", flush=True)
    print(f"done in {(time.perf_counter() - start) / 60:.1f} min -> {out}.json/.md/.png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
