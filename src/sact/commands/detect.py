"""``sact detect``: Faster R-CNN with an adaptive ResNet backbone on COCO-format data.

Sub-commands:

* ``make-data`` -- write a multi-object Cluttered Fashion-MNIST set in COCO format;
* ``train`` -- ``sact train`` with ``task: detection`` (the one training loop: checkpoints,
  ``--resume``, ``torchrun``); settings: the detection defaults
  (:data:`sact.engine.config.DETECT_DEFAULTS`) < ``--config`` YAML < ``--set`` < flags;
* ``eval`` -- COCO box AP, backbone FLOPs and speed of a saved detector (or, with
  ``--watch RUN_DIR``, of each new checkpoint of a run), or the AP of a ready-made
  detections json (``--detections``).

Data layout (``--data DIR``): ``DIR/images/<split>/`` and
``DIR/annotations/instances_<split>.json`` (what ``make-data`` writes, COCO's own layout
with ``images/`` in front); ``--train-images/--train-ann`` etc. override it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path

from ..engine.config import DETECT_DEFAULTS
from ..errors import InputError
from .train import add_flags, flag_overrides, train_and_report

# flag -> (config key, type, help); every flag defaults to None: only given flags override; the help shows the
# default (DETECT_DEFAULTS, else TrainConfig's)
_TRAIN_FLAGS = {
    "--data": ("data_dir", str, "root with images/<split>/ and annotations/instances_<split>.json"),
    "--train-split": ("train_split", str, "training split name"),
    "--train-images": ("train_images", str, "training image folder (instead of --data)"),
    "--train-ann": ("train_ann", str, "training instances json (instead of --data)"),
    "--val-split": ("val_split", str, "evaluation split name"),
    "--val-images": ("val_images", str, "evaluation image folder"),
    "--val-ann": ("val_ann", str, "evaluation instances json"),
    "--model": ("model", str, "registered backbone (sact models)"),
    "--mode": ("mode", str, "vanilla | act | sact"),
    "--tau": ("tau", float, "ponder cost weight"),
    "--init": ("init", str, "torchvision .pth or sact checkpoint to warm-start the backbone from"),
    "--trainable-layers": ("trainable_layers", int, "trainable stages from the top (default: all)"),
    "--fpn-channels": ("fpn_channels", int, "FPN channels"),
    "--representation-size": ("representation_size", int, "box head width"),
    "--min-size": ("min_size", int, "transform resize (default: the image size)"),
    "--max-size": ("max_size", int, "cap on the longer side (default: --min-size)"),
    "--detections-per-img": ("detections_per_img", int, "detections kept per image"),
    "--box-batch-size": ("box_batch_size", int, "RoIs sampled per image for the box head"),
    "--hflip": ("hflip", float, "flip probability in training"),
    "--steps": ("steps", int, "optimisation steps (0: use --epochs)"),
    "--epochs": ("epochs", int, "epochs when --steps is 0"),
    "--batch-size": ("batch_size", int, "images per step and process"),
    "--eval-batch-size": ("eval_batch_size", int, "images per evaluation batch"),
    "--lr": ("lr", float, "base learning rate"),
    "--momentum": ("momentum", float, "SGD momentum"),
    "--weight-decay": ("weight_decay", float, "L2 on kernels"),
    "--schedule": ("schedule", str, "piecewise | staircase | cosine | constant"),
    "--warmup-steps": ("warmup_steps", int, "linear warm-up steps"),
    "--eval-every": ("eval_every", int, "also evaluate every N steps (0: at the end only)"),
    "--checkpoint-every": ("checkpoint_every", int, "also save every N steps (always at epoch ends)"),
    "--seed": ("seed", int, "seed"),
    "--out": ("out_dir", str, "run folder: model.*, train_state.safetensors, metrics.json, tb/"),
    "--device": ("device", str, "auto | cpu | cuda | cuda:N"),
    "--amp": ("amp", str, "auto | none | bf16 | fp16"),
    "--workers": ("workers", int, "DataLoader workers"),
    "--threads": ("threads", int, "torch threads, at most one per CPU core (0: torch's default)"),
}


def register(subparsers) -> None:
    p = subparsers.add_parser("detect", help="object detection (Faster R-CNN + FPN) with an SACT backbone",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="detect_command", metavar="{make-data,train,eval}")

    m = sub.add_parser("make-data", help="write multi-object Cluttered Fashion-MNIST in COCO format")
    m.add_argument("--out", required=True, type=Path, help="output folder")
    m.add_argument("--num-train", type=int, default=2000)
    m.add_argument("--num-val", type=int, default=500)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--canvas-size", type=int, default=None, help="canvas side (default: the data module's, 96)")
    m.add_argument("--data-dir", type=Path, default=None, help="Fashion-MNIST folder (default: auto)")
    m.add_argument("--overwrite", action="store_true", help="replace a data set already in --out")
    m.set_defaults(func=_make_data)

    t = sub.add_parser("train", help="train a detector (sact train with task: detection)",
                       description="Train Faster R-CNN + FPN over an adaptive backbone with the one training loop. "
                       "Settings: detection defaults < --config YAML < --set < flags (docs/detection.md).")
    t.add_argument("--config", default=None, help="YAML file of TrainConfig keys (task: detection)")
    add_flags(t, _TRAIN_FLAGS, base=DETECT_DEFAULTS)
    t.add_argument("--in-chans", type=int, default=None, help="image channels, 1 or 3 (default 1)")
    t.add_argument("--width", type=int, default=None, help="base_channels (cifar) / base_width (imagenet)")
    t.add_argument("--return-stages", nargs="+", default=None, help="stages feeding the FPN (default: stride >= 2)")
    t.add_argument("--frozen-bn", action=argparse.BooleanOptionalAction, default=None,
                   help="FrozenBatchNorm2d (default: on with --init, off from scratch)")
    t.add_argument("--anchor-sizes", type=int, nargs="+", default=None, help="one per FPN level (default 8*stride)")
    t.add_argument("--rpn-proposals", type=int, nargs=2, default=None, metavar=("TRAIN", "TEST"),
                   help="RPN proposals kept after NMS (default 600 300; torchvision: 2000 1000)")
    t.add_argument("--max-steps", type=int, default=None,
                   help="sact 0.1 flag: steps per epoch; now sets --steps to epochs * N")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, value parsed as YAML (repeatable)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out (train_state.safetensors)")
    t.add_argument("--overwrite", action="store_true", help="replace a previous run in --out (its files are removed)")
    t.add_argument("--no-tensorboard", action="store_true", help="do not write TensorBoard logs")
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="evaluate a detector (or a detections json) with pycocotools")
    e.add_argument("--data", type=Path, default=None, help="root with images/<split>/ and annotations/")
    e.add_argument("--val-split", default="test")
    e.add_argument("--val-images", type=Path, default=None)
    e.add_argument("--val-ann", type=Path, default=None)
    e.add_argument("--device", default="auto")
    e.add_argument("--amp", default="none", help="auto | none | bf16 | fp16")
    e.add_argument("--workers", type=int, default=0)
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--in-chans", type=int, default=None, choices=(1, 3), help="default: the checkpoint's")
    e.add_argument("--checkpoint", type=Path, default=None, help="detector saved by `sact detect train` (run folder)")
    e.add_argument("--detections", type=Path, default=None, help="COCO results json to score instead of a model")
    e.add_argument("--use-sparse", action="store_true", help="run the backbone through sact.sparse")
    e.add_argument("--max-batches", type=int, default=None)
    e.add_argument("--out", type=Path, default=None,
                   help="folder for metrics.json and detections.json (with --watch: default RUN_DIR/eval)")
    e.add_argument("--overwrite", action="store_true", help="replace metrics.json / detections.json in --out")
    e.add_argument("--watch", type=Path, default=None, metavar="RUN_DIR",
                   help="evaluate each new checkpoint of a run folder as it appears (metrics_step<STEP>.json)")
    e.add_argument("--poll", type=float, default=30.0, metavar="SECONDS", help="--watch: seconds between looks")
    e.add_argument("--watch-timeout", type=float, default=None, metavar="SECONDS",
                   help="--watch: stop when no new checkpoint appeared for this long (default: until Ctrl-C)")
    e.set_defaults(func=_eval)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _make_data(args) -> int:
    from ..data import write_coco
    from ..fileio import prepare_outputs

    for split, n in (("train", args.num_train), ("test", args.num_val)):
        if n < 1:
            raise InputError(f"--num-{'train' if split == 'train' else 'val'} must be >= 1, got {n}")
    names = ("annotations/instances_train.json", "annotations/instances_test.json")
    with prepare_outputs(args.out, files=names, overwrite=args.overwrite):
        for split, n in (("train", args.num_train), ("test", args.num_val)):
            path = write_coco(args.out, split=split, num_images=n, seed=args.seed, canvas_size=args.canvas_size,
                              data_dir=args.data_dir)
            print(f"{split}: {n} images -> {path}")
    return 0


def train_config(args):
    """The :class:`~sact.engine.TrainConfig` of ``sact detect train``'s arguments.

    Raises:
        ConfigError: invalid values (all listed; exit 2).
    """
    from ..engine.config import load_config, parse_overrides

    overrides = {**parse_overrides(args.set), **flag_overrides(args, _TRAIN_FLAGS)}
    for key in ("return_stages", "frozen_bn", "anchor_sizes", "rpn_proposals"):
        if getattr(args, key) is not None:
            overrides[key] = list(getattr(args, key)) if isinstance(getattr(args, key), (list, tuple)) else getattr(args, key)
    for flag, key in (("resume", "resume"), ("overwrite", "overwrite")):
        if getattr(args, flag):
            overrides[key] = True
    if args.no_tensorboard:
        overrides["tensorboard"] = False
    config = load_config(args.config, overrides, base=DETECT_DEFAULTS)
    kwargs = dict(config.model_kwargs)
    if args.in_chans is not None:
        kwargs["in_chans"] = args.in_chans
    if args.width is not None:
        kwargs["base_channels" if config.model.endswith("_cifar") else "base_width"] = args.width
    changes = {"model_kwargs": kwargs}
    if args.max_steps is not None:
        if args.max_steps < 1:
            raise InputError(f"--max-steps must be >= 1, got {args.max_steps}")
        changes["steps"] = config.epochs * args.max_steps
    return config.replace(**changes)


def _train(args) -> int:
    return train_and_report(train_config(args), print_config=args.print_config)


def _eval(args) -> int:
    from ..detection import load_detector
    from ..detection.evaluate import evaluate_detector, score_detections
    from ..engine.amp import amp_dtype
    from ..engine.distributed import cleanup_distributed, resolve_device, setup_distributed
    from ..fileio import atomic_write_bytes, dumps_json, prepare_outputs

    sources = [x for x in (args.checkpoint, args.detections, args.watch) if x is not None]
    if len(sources) != 1:
        raise InputError("give exactly one of --checkpoint, --detections and --watch RUN_DIR")
    if args.batch_size < 1 or args.workers < 0 or (args.max_batches is not None and args.max_batches < 1):
        raise InputError(f"--batch-size and --max-batches must be >= 1 and --workers >= 0, got {args.batch_size}, "
                         f"{args.max_batches}, {args.workers}")
    if not args.poll > 0 or (args.watch_timeout is not None and not args.watch_timeout > 0):
        raise InputError(f"--poll and --watch-timeout must be > 0 seconds, got {args.poll}, {args.watch_timeout}")
    if args.watch is None and args.watch_timeout is not None:
        raise InputError("--watch-timeout needs --watch")
    val_images, val_ann = args.val_images, args.val_ann
    if args.data is not None:
        val_images = val_images or args.data / "images" / args.val_split
        val_ann = val_ann or args.data / "annotations" / f"instances_{args.val_split}.json"
    if val_images is None or val_ann is None:
        raise InputError("give --data or both --val-images and --val-ann")
    names = ("metrics.json", "detections.json") if args.checkpoint is not None else ("metrics.json",)
    writes = args.out is not None and args.watch is None and int(os.environ.get("RANK", "0")) == 0
    outputs = prepare_outputs(args.out, files=names, overwrite=args.overwrite) if writes else contextlib.nullcontext()
    with outputs:  # checked before any work
        if args.detections is not None:
            metrics = score_detections(args.detections, val_images, val_ann)
            out = {"metrics": metrics, "detections": str(args.detections), "annotations": str(val_ann)}
            print(dumps_json(metrics, indent=2))
            if args.out is not None:
                atomic_write_bytes(args.out / "metrics.json", dumps_json(out, indent=2).encode())
            return 0
        device = resolve_device(args.device, int(os.environ.get("LOCAL_RANK", "0")))
        amp = amp_dtype(args.amp, device)
        options = dict(device=device, batch_size=args.batch_size, workers=args.workers, in_chans=args.in_chans,
                       use_sparse=args.use_sparse, max_batches=args.max_batches, amp_dtype=amp)
        if args.watch is not None:
            from ..engine.watch import watch_checkpoints

            def one(path):
                detector = load_detector(path, map_location=device)
                metrics, _ = evaluate_detector(detector, val_images, val_ann, progress=False, **options)
                return {"metrics": metrics, "checkpoint": str(path), "annotations": str(val_ann),
                        "use_sparse": bool(args.use_sparse)}, detector.checkpoint_meta

            watch_checkpoints(args.watch, one, out_dir=args.out or args.watch / "eval", poll_s=args.poll,
                              timeout_s=args.watch_timeout)
            return 0
        info = setup_distributed(device)
        try:
            detector = load_detector(args.checkpoint, map_location=device)
            metrics, results = evaluate_detector(detector, val_images, val_ann, rank=info.rank, world_size=info.world_size,
                                                 progress=info.is_main, **options)
            if info.is_main:
                print(dumps_json(metrics, indent=2))
                if args.out is not None:
                    out = {"metrics": metrics, "checkpoint": str(args.checkpoint), "annotations": str(val_ann),
                           "use_sparse": bool(args.use_sparse), "world_size": info.world_size}
                    atomic_write_bytes(args.out / "metrics.json", dumps_json(out, indent=2).encode())
                    atomic_write_bytes(args.out / "detections.json", dumps_json(results).encode())
        finally:
            cleanup_distributed(info)
        return 0
