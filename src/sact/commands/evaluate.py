"""``sact eval``: accuracy, loss, FLOPs and ponder statistics of a checkpoint -> ``NAME.eval.json``
next to it (or ``--out``)."""

from __future__ import annotations

import argparse
from pathlib import Path

# What `sact eval` takes from the checkpoint's training config: the kind of dataset and
# how the built-in Cluttered Fashion-MNIST test canvases are generated. Never a folder:
# a checkpoint is someone else's file, and the data it names could be anything.
_FROM_CHECKPOINT = ("dataset", "eval_samples", "data_seed", "clutter", "image_size", "label_offset", "val_fraction")

#: Most images one evaluation takes (``--num-samples``, or the checkpoint's ``eval_samples``):
#: Cluttered Fashion-MNIST canvases are generated, so only this bounds their number.
MAX_EVAL_SAMPLES = 10_000_000
#: Largest input batch (``--batch-size`` images of the evaluation size, float32), refused before it is allocated.
MAX_BATCH_BYTES = 2**31


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint (top-1/top-5, loss, FLOPs, ponder cost) -> NAME.eval.json",
                       description="Evaluate a checkpoint and write its metrics (JSON) next to it: RUN/model.eval.json "
                       "for a run folder, NAME.eval.json for NAME.safetensors (or --out). The data is the one you name "
                       "(--dataset, --data-dir); without --data-dir, Cluttered Fashion-MNIST test canvases generated "
                       "from the system Fashion-MNIST as the checkpoint was trained (a data folder named inside a "
                       "checkpoint is never opened; see docs/trust.md).")
    p.add_argument("checkpoint", nargs="?", default=None,
                   help="checkpoint (NAME, NAME.safetensors or a run folder holding model.*); or --watch RUN_DIR")
    p.add_argument("--dataset", default=None, choices=("cluttered", "cifar10", "imagenet", "folder"),
                   help="default: the kind the checkpoint was trained on")
    p.add_argument("--data-dir", default=None,
                   help="dataset folder (needed for cifar10 / imagenet / folder; cluttered: the Fashion-MNIST folder, "
                   "default the system copy)")
    p.add_argument("--num-samples", "--eval-samples", type=int, default=None,
                   help="images evaluated (cluttered: canvases; others: a fixed subset; default: the checkpoint's "
                   f"setting, else 2000 canvases / all images; at most {MAX_EVAL_SAMPLES:,})")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="folder without val/: the held-out share (default: the checkpoint's, so the split is the "
                   "one training used)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--tau", type=float, default=None,
                   help="ponder weight of total_loss, finite and >= 0 (default: the checkpoint's)")
    p.add_argument("--out", default=None,
                   help="where to write the metrics (JSON; default next to the checkpoint: RUN/model.eval.json, "
                   "NAME.eval.json); with --watch a folder (default RUN_DIR/eval)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="none", help="auto | none | bf16 | fp16")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--strict", action="store_true",
                   help="image folders: stop at the first unreadable image (default: skip it with a warning)")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="image folders: images above this many pixels are unreadable (default 40000000)")
    p.add_argument("--sparse", action="store_true",
                   help="run the model through the sparse engine (sact.to_sparse: halted positions are skipped; "
                   "the same metrics up to float rounding, docs/sparse.md)")
    p.add_argument("--no-progress", action="store_true")
    # continuous evaluation (docs/training.md)
    p.add_argument("--watch", default=None, metavar="RUN_DIR",
                   help="evaluate each new checkpoint of a training run folder as it appears, one "
                   "metrics_step<STEP>.json per checkpoint in --out (never overwritten); Ctrl-C stops")
    p.add_argument("--poll", type=float, default=30.0, metavar="SECONDS", help="--watch: seconds between looks (default 30)")
    p.add_argument("--watch-timeout", type=float, default=None, metavar="SECONDS",
                   help="--watch: stop when no new checkpoint appeared for this long (default: run until Ctrl-C)")
    p.set_defaults(func=run)


def eval_config(meta: dict, args: argparse.Namespace):
    """The evaluation data config: generation settings from the checkpoint, folders from the user only.

    Raises:
        CheckpointError: the checkpoint's config values are malformed.
        InputError: the dataset needs a folder and none was given.
    """
    from ..checkpoint import CheckpointError
    from ..engine.config import ConfigError, TrainConfig
    from ..errors import InputError

    saved = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    taken = {k: saved[k] for k in _FROM_CHECKPOINT if k in saved}
    if "label_offset" in meta:  # converted 1001-class reference models: index 0 is background
        taken["label_offset"] = meta["label_offset"]
    try:
        config = TrainConfig.from_dict(taken)
    except ConfigError as e:
        raise CheckpointError(f"{args.checkpoint}: its training config is malformed: {e}") from e
    changes = {"dataset": args.dataset, "eval_samples": args.num_samples, "strict_data": args.strict or None,
               "max_pixels": args.max_pixels, "val_fraction": args.val_fraction, "tau": args.tau}
    config = config.replace(data_dir=args.data_dir, **{k: v for k, v in changes.items() if v is not None})
    _check_eval_samples(config.eval_samples, args)
    if config.dataset != "cluttered" and args.data_dir is None:
        raise InputError(f"the checkpoint was trained on {config.dataset}: pass --data-dir with that dataset's folder "
                         "(a folder named inside a checkpoint is never opened)")
    return config


def _check_eval_samples(n: int | None, args: argparse.Namespace) -> None:
    from ..errors import InputError

    if n is not None and n > MAX_EVAL_SAMPLES:
        what = f"--num-samples {n}" if args.num_samples is not None else \
            f"{args.checkpoint}: its eval_samples {n} (pass --num-samples)"
        raise InputError(f"{what}: at most {MAX_EVAL_SAMPLES:,} images are evaluated")


def check_args(args: argparse.Namespace) -> None:
    """The flags alone, before any work (exit 2): ``CHECKPOINT`` xor ``--watch``; ``--poll`` /
    ``--watch-timeout`` positive; ``--tau``, ``--num-samples``, ``--max-pixels`` as ``sact train``
    checks them, and ``--num-samples`` at most :data:`MAX_EVAL_SAMPLES`."""
    from ..engine.config import TrainConfig
    from ..errors import InputError

    flags = {"tau": args.tau, "eval_samples": args.num_samples, "max_pixels": args.max_pixels}
    TrainConfig().replace(**{k: v for k, v in flags.items() if v is not None})  # the checks of sact train's config
    _check_eval_samples(args.num_samples, args)
    if (args.checkpoint is None) == (args.watch is None):
        raise InputError("give a checkpoint or --watch RUN_DIR (exactly one)")
    if args.watch is None and (args.watch_timeout is not None):
        raise InputError("--watch-timeout needs --watch")
    if not args.poll > 0 or (args.watch_timeout is not None and not args.watch_timeout > 0):
        raise InputError(f"--poll and --watch-timeout must be > 0 seconds, got {args.poll}, {args.watch_timeout}")


def default_out(checkpoint: str | Path) -> Path:
    """Where ``sact eval CHECKPOINT`` writes without ``--out``: next to the checkpoint,
    ``NAME.eval.json`` (``RUN/model.eval.json`` for a run folder)."""
    from ..checkpoint import checkpoint_paths

    weights, _ = checkpoint_paths(checkpoint)
    return weights.with_suffix(".eval.json")


def run(args: argparse.Namespace) -> int:
    from ..fileio import atomic_write_bytes, dumps_json, prepare_outputs

    check_args(args)
    if args.watch is not None:
        from ..engine.watch import watch_checkpoints

        device, amp = _device(args)
        datasets = {}  # evaluation sets by config, built once
        watch_checkpoints(args.watch, lambda path: _evaluate(args, path, device, amp, datasets),
                          out_dir=args.out or Path(args.watch) / "eval", poll_s=args.poll, timeout_s=args.watch_timeout)
        return 0
    out = Path(args.out or default_out(args.checkpoint))
    with prepare_outputs(None, files=[out], overwrite=args.overwrite, what="--out"):  # before any work
        device, amp = _device(args)
        metrics, _ = _evaluate(args, args.checkpoint, device, amp, {})
        atomic_write_bytes(out, dumps_json(metrics, indent=2).encode())
    top5 = f", top-5 {metrics['top5']:.2%}" if "top5" in metrics else ""
    print(f"top-1 {metrics['top1']:.2%}{top5}, loss {metrics['loss']:.4f}, FLOPs {metrics['flops_mean'] / 1e6:.2f}M "
          f"+- {metrics['flops_std'] / 1e6:.2f}M, {metrics['images_per_s']:.1f} images/s -> {out}")
    return 0


def _device(args: argparse.Namespace):
    """``(device, AMP dtype)`` of the flags, after the loader flags are checked (exit 2)."""
    from ..engine.amp import amp_dtype
    from ..engine.distributed import resolve_device
    from ..errors import InputError

    if args.batch_size < 1 or args.workers < 0:
        raise InputError(f"--batch-size must be >= 1 and --workers >= 0, got {args.batch_size}, {args.workers}")
    device = resolve_device(args.device)
    return device, amp_dtype(args.amp, device)


def _evaluate(args: argparse.Namespace, path, device, amp, datasets: dict) -> tuple[dict, dict]:
    """``(metrics, checkpoint meta)`` of one checkpoint (``datasets``: a cache by data config)."""
    import json
    import math

    from ..checkpoint import CheckpointError, load_checkpoint
    from ..engine.datasets import build_datasets, eval_loader
    from ..engine.evaluate import evaluate
    from ..errors import InputError

    model = load_checkpoint(path, map_location=device)
    meta = model.checkpoint_meta
    config = eval_config(meta, args)
    pre = meta.get("preprocess") if isinstance(meta.get("preprocess"), dict) else None
    if pre is None and model.in_chans in (1, 3):  # image folders: as many channels as the model takes
        config = config.replace(model_kwargs={"in_chans": model.in_chans})
    key = json.dumps([config.to_dict(), pre], sort_keys=True)
    if key not in datasets:
        datasets[key] = build_datasets(config, train=False, eval_preprocess=pre)  # the preprocessing training used
    data = datasets[key]
    outputs = model.sact_config["kwargs"].get("num_classes")
    if isinstance(outputs, int) and data.num_classes > outputs:
        raise InputError(f"the data has {len(data.classes)} classes (labels up to {data.num_classes - 1}) but the "
                         f"model {path} has {outputs} outputs: is --data-dir the dataset it was trained on?")
    tau = args.tau if args.tau is not None else meta.get("tau", config.tau)
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (math.isfinite(tau) and tau >= 0):
        raise CheckpointError(f"{path}: tau={tau!r} in the checkpoint is not a finite number >= 0; pass --tau")
    batch_bytes = min(args.batch_size, len(data.eval)) * math.prod(data.input_size or (0,)) * 4
    if batch_bytes > MAX_BATCH_BYTES:
        c, h, w = data.input_size
        raise InputError(f"--batch-size {args.batch_size}: a batch of {c}x{h}x{w} images takes "
                         f"{batch_bytes / 2**30:.1f} GiB before the model runs (at most "
                         f"{MAX_BATCH_BYTES / 2**30:.0f}); pass a smaller one")
    loader = eval_loader(data.eval, args.batch_size, workers=args.workers)
    runner = model
    if args.sparse:
        if amp is not None:
            raise InputError("--sparse runs in the model's float precision: drop --amp (or pass --amp none)")
        from ..sparse import to_sparse

        runner = to_sparse(model)
    metrics = evaluate(runner, loader, device=device, tau=float(tau), amp_dtype=amp, progress=not args.no_progress)
    metrics = {"checkpoint": str(path), "model": model.sact_config["name"], "mode": model.mode,
               "model_config": model.sact_config, "dataset": config.dataset, "tau": float(tau), "device": str(device),
               "engine": "sparse" if args.sparse else "dense", **metrics}
    return metrics, meta
