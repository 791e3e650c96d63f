"""``sact detect``: Faster R-CNN with an adaptive ResNet backbone on COCO-format data.

Sub-commands:

* ``make-data`` -- write a multi-object Cluttered Fashion-MNIST set in COCO format;
* ``train`` -- ``sact train`` with ``task: detection`` (the one training loop: checkpoints,
  ``--resume``, ``torchrun``); settings: the detection defaults
  (:data:`sact.detection.config.DETECT_DEFAULTS`) < ``--config`` YAML < ``--set`` < flags;
* ``eval`` -- COCO box AP, backbone FLOPs and speed of a saved detector (or, with
  ``--watch RUN_DIR``, of each new checkpoint of a run), or the AP of a ready-made
  detections json (``--detections``).

Data layout (``--data DIR``): ``DIR/images/<split>/`` and
``DIR/annotations/instances_<split>.json`` (what ``make-data`` writes, COCO's own layout
with ``images/`` in front); ``--train-images/--train-ann`` etc. override it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..detection.config import DETECT_DEFAULTS
from ..errors import InputError
from .flags import DETECT_FLAGS, add_config_arguments, add_run_switches, add_watch_flags, config_from_args
from .train import train_and_report


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
    add_config_arguments(t, DETECT_FLAGS, base=DETECT_DEFAULTS, config_help="YAML file of TrainConfig keys (task: detection)")
    t.add_argument("--in-chans", type=int, default=None, help="image channels, 1 or 3 (default 1)")
    t.add_argument("--width", type=int, default=None, help="base_channels (cifar) / base_width (imagenet)")
    t.add_argument("--max-steps", type=int, default=None,
                   help="sact 0.1 flag: steps per epoch; now sets --steps to epochs * N")
    add_run_switches(t, resume_help="continue the run in --out (train_state.safetensors)")
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
    add_watch_flags(e)
    e.set_defaults(func=_eval)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _make_data(args) -> int:
    from ..detection.coco import write_coco_splits

    write_coco_splits(args.out, num_train=args.num_train, num_val=args.num_val, seed=args.seed,
                      canvas_size=args.canvas_size, data_dir=args.data_dir, overwrite=args.overwrite)
    return 0


def train_config(args):
    """The :class:`~sact.engine.TrainConfig` of ``sact detect train``'s arguments.

    Raises:
        ConfigError: invalid values (all listed; exit 2).
    """
    config = config_from_args(args, DETECT_FLAGS, base=DETECT_DEFAULTS)
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
    from ..detection.evaluate import run_evaluation
    from ..io.files import dumps_json

    metrics = run_evaluation(
        checkpoint=args.checkpoint, detections=args.detections, watch=args.watch, data_dir=args.data,
        val_split=args.val_split, val_images=args.val_images, val_ann=args.val_ann, device=args.device, amp=args.amp,
        batch_size=args.batch_size, workers=args.workers, in_chans=args.in_chans, use_sparse=args.use_sparse,
        max_batches=args.max_batches, out=args.out, overwrite=args.overwrite, poll_s=args.poll,
        watch_timeout_s=args.watch_timeout)
    if metrics is not None:
        print(dumps_json(metrics, indent=2))
    return 0
