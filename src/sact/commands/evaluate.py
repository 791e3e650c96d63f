"""``sact eval``: accuracy, loss, FLOPs and ponder statistics of a checkpoint -> metrics.json."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint (top-1/top-5, loss, FLOPs, ponder cost) -> metrics.json",
                       description="Evaluate a checkpoint on the evaluation split of its training dataset "
                       "(or the one given) and write metrics.json.")
    p.add_argument("checkpoint", help="checkpoint (NAME, NAME.safetensors or a run folder holding model.*)")
    p.add_argument("--dataset", default=None, help="cluttered | cifar10 | imagenet (default: the checkpoint's)")
    p.add_argument("--data-dir", default=None, help="dataset folder (default: the checkpoint's)")
    p.add_argument("--num-samples", type=int, default=None, help="cluttered: evaluation canvases (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--tau", type=float, default=None, help="ponder weight of total_loss (default: the checkpoint's)")
    p.add_argument("--out", default="metrics.json", help="where to write the metrics (JSON)")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="none", help="auto | none | bf16 | fp16")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    import sys
    from pathlib import Path

    from ..checkpoint import CheckpointError, atomic_write_bytes
    from ..engine.amp import amp_dtype
    from ..engine.config import TrainConfig
    from ..engine.datasets import build_datasets, eval_loader
    from ..engine.distributed import resolve_device
    from ..engine.evaluate import evaluate
    from ..checkpoint import load_checkpoint

    try:
        device = resolve_device(args.device)
        model = load_checkpoint(args.checkpoint, map_location=device)
        meta = model.checkpoint_meta
        saved = dict(meta.get("config") or {})
        known = set(TrainConfig().to_dict())
        config = TrainConfig.from_dict({k: v for k, v in saved.items() if k in known})
        changes = {"dataset": args.dataset, "data_dir": args.data_dir, "eval_samples": args.num_samples}
        if "label_offset" in meta:  # converted 1001-class reference models: index 0 is background
            changes["label_offset"] = int(meta["label_offset"])
        config = config.replace(**{k: v for k, v in changes.items() if v is not None})
        data = build_datasets(config, train=False)
        tau = args.tau if args.tau is not None else float(meta.get("tau", config.tau))
        loader = eval_loader(data.eval, args.batch_size, workers=args.workers)
        metrics = evaluate(model, loader, device=device, tau=tau, amp_dtype=amp_dtype(args.amp, device),
                           progress=not args.no_progress)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"sact eval: {e}", file=sys.stderr)
        return 1
    metrics = {"checkpoint": str(args.checkpoint), "model": model.sact_config["name"],
               "mode": model.mode, "model_config": model.sact_config, "dataset": config.dataset, "tau": tau, "device": str(device), **metrics}
    atomic_write_bytes(Path(args.out), json.dumps(metrics, indent=2).encode())
    top5 = f", top-5 {metrics['top5']:.2%}" if "top5" in metrics else ""
    print(f"top-1 {metrics['top1']:.2%}{top5}, loss {metrics['loss']:.4f}, FLOPs {metrics['flops_mean'] / 1e6:.2f}M "
          f"+- {metrics['flops_std'] / 1e6:.2f}M, {metrics['images_per_s']:.1f} images/s -> {args.out}")
    return 0
