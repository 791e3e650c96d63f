"""``sact eval``: accuracy, loss, FLOPs and ponder statistics of a checkpoint -> ``NAME.eval.json``
next to it (or ``--out``); the work is :mod:`sact.classification.eval_run`'s."""

from __future__ import annotations

import argparse

from .flags import add_watch_flags


def register(sub: argparse._SubParsersAction) -> None:
    from ..classification.eval_run import MAX_EVAL_SAMPLES

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
    add_watch_flags(p)
    p.set_defaults(func=run)


def options(args: argparse.Namespace):
    """The :class:`~sact.classification.eval_run.EvalOptions` of the flags."""
    from ..classification.eval_run import EvalOptions

    return EvalOptions(dataset=args.dataset, data_dir=args.data_dir, num_samples=args.num_samples,
                       val_fraction=args.val_fraction, tau=args.tau, strict=args.strict, max_pixels=args.max_pixels,
                       batch_size=args.batch_size, workers=args.workers, device=args.device, amp=args.amp,
                       sparse=args.sparse, progress=not args.no_progress)


def check_args(args: argparse.Namespace) -> None:
    """The flags alone, before any work (exit 2): the options' checks
    (:func:`~sact.classification.eval_run.check_options`), ``CHECKPOINT`` xor ``--watch``, ``--poll`` /
    ``--watch-timeout`` positive."""
    from ..classification.eval_run import check_options
    from ..errors import InputError

    check_options(options(args))
    if (args.checkpoint is None) == (args.watch is None):
        raise InputError("give a checkpoint or --watch RUN_DIR (exactly one)")
    if args.watch is None and (args.watch_timeout is not None):
        raise InputError("--watch-timeout needs --watch")
    if not args.poll > 0 or (args.watch_timeout is not None and not args.watch_timeout > 0):
        raise InputError(f"--poll and --watch-timeout must be > 0 seconds, got {args.poll}, {args.watch_timeout}")


def run(args: argparse.Namespace) -> int:
    from ..classification.eval_run import evaluate_to_file, watch_run

    check_args(args)
    if args.watch is not None:
        watch_run(args.watch, options(args), out_dir=args.out, poll_s=args.poll, timeout_s=args.watch_timeout)
        return 0
    metrics, out = evaluate_to_file(args.checkpoint, options(args), out=args.out, overwrite=args.overwrite)
    top5 = f", top-5 {metrics['top5']:.2%}" if "top5" in metrics else ""
    print(f"top-1 {metrics['top1']:.2%}{top5}, loss {metrics['loss']:.4f}, FLOPs {metrics['flops_mean'] / 1e6:.2f}M "
          f"+- {metrics['flops_std'] / 1e6:.2f}M, {metrics['images_per_s']:.1f} images/s -> {out}")
    return 0
