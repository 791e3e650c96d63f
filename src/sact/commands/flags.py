"""The command line's flag tables: the flags of ``sact train`` and ``sact detect train`` that set
a :class:`~sact.engine.TrainConfig` key, and how parsed arguments become a config
(defaults < ``--config`` YAML < ``--set`` < flags < switches)."""

from __future__ import annotations

import argparse

from ..engine.config import TrainConfig, load_config, parse_overrides

__all__ = ["TRAIN_FLAGS", "DETECT_FLAGS", "add_flags", "flag_overrides", "add_config_arguments", "add_run_switches",
           "add_watch_flags", "config_from_args"]

#: The flags of ``sact train`` that set a config key: flag -> (key, type, help[, argparse options]). Each
#: defaults to None, so that only the flags given override the YAML; the help shows the
#: key's default (:func:`add_flags`).
TRAIN_FLAGS = {
    "--model": ("model", str, "registered model name (sact models)"),
    "--mode": ("mode", str, "vanilla | act | sact"),
    "--tau": ("tau", float, "ponder cost weight"),
    "--dataset": ("dataset", str, "cluttered | cifar10 | imagenet | folder (your own class folders, docs/training.md)"),
    "--data-dir": ("data_dir", str, "dataset folder"),
    "--val-fraction": ("val_fraction", float, "folder without val/: hold out this share of every class (fixed split)"),
    "--image-size": ("image_size", int, "input side of image folders"),
    "--num-classes": ("num_classes", int, "classifier outputs (default: the classes found + --label-offset)"),
    "--label-offset": ("label_offset", int, "added to image-folder labels (1: the reference's 1001-class models)"),
    "--preprocess": ("preprocess", str, "image folders: auto (match --init) | dataset | inception | torchvision"),
    "--eval-samples": ("eval_samples", int, "images evaluated (cluttered: canvases, default 2000; others: a fixed "
                       "subset, default all)"),
    "--steps": ("steps", int, "optimisation steps (0: use --epochs)"),
    "--epochs": ("epochs", int, "epochs when --steps is 0"),
    "--batch-size": ("batch_size", int, "images per step and process"),
    "--lr": ("lr", float, "base learning rate"),
    "--halting-lr-mult": ("halting_lr_mult", float, "learning-rate multiplier of the halting branches (short "
                          "fine-tunes need 10-30, docs/training.md)"),
    "--weight-decay": ("weight_decay", float, "L2 on kernels"),
    "--label-smoothing": ("label_smoothing", float, "cross-entropy label smoothing"),
    "--schedule": ("schedule", str, "piecewise | staircase | cosine | constant"),
    "--init": ("init", str, "warm start: torchvision .pth or sact checkpoint"),
    "--out": ("out_dir", str, "run folder"),
    "--amp": ("amp", str, "auto | none | bf16 | fp16"),
    "--memory-format": ("memory_format", str, "auto (channels-last for classification on the CPU) | channels_last | "
                        "contiguous"),
    "--device": ("device", str, "auto | cpu | cuda | cuda:N"),
    "--workers": ("workers", int, "DataLoader worker processes (at most 64, or one per CPU core if more)"),
    "--threads": ("threads", int, "torch threads, at most one per CPU core (0: torch's default)"),
    "--seed": ("seed", int, "seed"),
    "--max-pixels": ("max_pixels", int, "image folders: images above this many pixels are unreadable"),
    "--log-every": ("log_every", int, "report the means of loss, top-1, ponder cost, FLOPs and lr every N steps "
                    "(progress bar, TensorBoard; a line on stderr without a bar)"),
}

#: The flags of ``sact detect train`` that set a config key, as :data:`TRAIN_FLAGS` (whose
#: entries it shares where the text is the same); the help shows the default of
#: :data:`sact.detection.config.DETECT_DEFAULTS`, else TrainConfig's.
DETECT_FLAGS = {
    "--data": ("data_dir", str, "root with images/<split>/ and annotations/instances_<split>.json"),
    "--train-split": ("train_split", str, "training split name"),
    "--train-images": ("train_images", str, "training image folder (instead of --data)"),
    "--train-ann": ("train_ann", str, "training instances json (instead of --data)"),
    "--val-split": ("val_split", str, "evaluation split name"),
    "--val-images": ("val_images", str, "evaluation image folder"),
    "--val-ann": ("val_ann", str, "evaluation instances json"),
    "--model": ("model", str, "registered backbone (sact models)"),
    "--mode": TRAIN_FLAGS["--mode"],
    "--tau": TRAIN_FLAGS["--tau"],
    "--init": ("init", str, "torchvision .pth or sact checkpoint to warm-start the backbone from"),
    "--trainable-layers": ("trainable_layers", int, "trainable stages from the top (default: all)"),
    "--fpn-channels": ("fpn_channels", int, "FPN channels"),
    "--representation-size": ("representation_size", int, "box head width"),
    "--min-size": ("min_size", int, "transform resize (default: the image size)"),
    "--max-size": ("max_size", int, "cap on the longer side (default: --min-size)"),
    "--detections-per-img": ("detections_per_img", int, "detections kept per image"),
    "--box-batch-size": ("box_batch_size", int, "RoIs sampled per image for the box head"),
    "--hflip": ("hflip", float, "flip probability in training"),
    "--steps": TRAIN_FLAGS["--steps"],
    "--epochs": TRAIN_FLAGS["--epochs"],
    "--batch-size": TRAIN_FLAGS["--batch-size"],
    "--eval-batch-size": ("eval_batch_size", int, "images per evaluation batch"),
    "--lr": TRAIN_FLAGS["--lr"],
    "--momentum": ("momentum", float, "SGD momentum"),
    "--weight-decay": TRAIN_FLAGS["--weight-decay"],
    "--schedule": TRAIN_FLAGS["--schedule"],
    "--warmup-steps": ("warmup_steps", int, "linear warm-up steps"),
    "--eval-every": ("eval_every", int, "also evaluate every N steps (0: at the end only)"),
    "--checkpoint-every": ("checkpoint_every", int, "also save every N steps (always at epoch ends)"),
    "--seed": TRAIN_FLAGS["--seed"],
    "--out": ("out_dir", str, "run folder: model.*, train_state.safetensors, metrics.json, tb/"),
    "--device": TRAIN_FLAGS["--device"],
    "--amp": TRAIN_FLAGS["--amp"],
    "--workers": ("workers", int, "DataLoader workers"),
    "--threads": TRAIN_FLAGS["--threads"],
    "--return-stages": ("return_stages", str, "stages feeding the FPN (default: stride >= 2)", {"nargs": "+"}),
    "--frozen-bn": ("frozen_bn", None, "FrozenBatchNorm2d (default: on with --init, off from scratch)",
                    {"action": argparse.BooleanOptionalAction}),
    "--anchor-sizes": ("anchor_sizes", int, "one per FPN level (default 8*stride)", {"nargs": "+"}),
    "--rpn-proposals": ("rpn_proposals", int, "RPN proposals kept after NMS (torchvision: 2000 1000)",
                        {"nargs": 2, "metavar": ("TRAIN", "TEST")}),
}


def add_flags(p: argparse.ArgumentParser, flags: dict, base: dict | None = None) -> None:
    """Adds config ``flags`` (flag -> (key, type, help[, argparse options])) to ``p``.

    Each defaults to None, so that only the flags given override the YAML; its help
    shows the value the key takes otherwise: ``base`` (a command's own defaults) or
    :class:`~sact.engine.config.TrainConfig`'s.
    """
    defaults = {**TrainConfig.defaults(), **(base or {})}
    for flag, (key, typ, text, *options) in flags.items():
        opts = dict(options[0]) if options else {}
        shown = "" if defaults[key] is None else f" (default: {defaults[key]})"
        if typ is not None:
            opts["type"] = typ
        p.add_argument(flag, default=None, help=(text + shown).replace("%", "%%"), **opts)


def flag_overrides(args: argparse.Namespace, flags: dict) -> dict:
    """``{config key: value}`` of the ``flags`` given on the command line."""
    values = {entry[0]: getattr(args, flag[2:].replace("-", "_")) for flag, entry in flags.items()}
    return {key: value for key, value in values.items() if value is not None}


def add_config_arguments(p: argparse.ArgumentParser, flags: dict = TRAIN_FLAGS, *, base: dict | None = None,
                         config_help: str = "YAML file of TrainConfig keys (see configs/)") -> None:
    """``--config``, the config ``flags`` and ``--set key=value``."""
    p.add_argument("--config", default=None, help=config_help)
    add_flags(p, flags, base)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, value parsed as YAML (repeatable), e.g. --set model_kwargs='{base_channels: 8}'")


def add_run_switches(p: argparse.ArgumentParser, *, resume_help: str) -> None:
    """The switches of a training run: ``--resume``, ``--overwrite``, ``--no-tensorboard``, ``--print-config``."""
    p.add_argument("--resume", action="store_true", help=resume_help)
    p.add_argument("--overwrite", action="store_true", help="replace a previous run in --out (its files are removed)")
    p.add_argument("--no-tensorboard", action="store_true", help="do not write TensorBoard logs")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def add_watch_flags(p: argparse.ArgumentParser) -> None:
    """``--watch RUN_DIR``, ``--poll`` and ``--watch-timeout``: continuous evaluation (docs/training.md)."""
    p.add_argument("--watch", default=None, metavar="RUN_DIR",
                   help="evaluate each new checkpoint of a training run folder as it appears, one "
                   "metrics_step<STEP>.json per checkpoint in --out (never overwritten); Ctrl-C stops")
    p.add_argument("--poll", type=float, default=30.0, metavar="SECONDS", help="--watch: seconds between looks (default 30)")
    p.add_argument("--watch-timeout", type=float, default=None, metavar="SECONDS",
                   help="--watch: stop when no new checkpoint appeared for this long (default: run until Ctrl-C)")


def config_from_args(args: argparse.Namespace, flags: dict = TRAIN_FLAGS, *, base: dict | None = None,
                     extra: dict | None = None):
    """defaults (``base`` over TrainConfig's) < ``--config`` YAML < ``--set`` < the ``flags`` given
    and the ``extra`` overrides < the switches (``--resume``, ``--no-tensorboard``, ...).

    Raises:
        ConfigError: invalid values (all listed; exit 2).
    """
    overrides = {**parse_overrides(args.set), **flag_overrides(args, flags), **(extra or {})}
    for flag in ("resume", "overwrite"):
        if getattr(args, flag, False):
            overrides[flag] = True
    if getattr(args, "strict", False):
        overrides["strict_data"] = True
    if getattr(args, "no_tensorboard", False):
        overrides["tensorboard"] = False
    if getattr(args, "no_progress", False):
        overrides["progress"] = False
    if getattr(args, "download", False):
        overrides["download"] = True
    return load_config(args.config, overrides, base=base)
