"""``sact train``: train a vanilla / ACT / SACT ResNet (single process or ``torchrun``)."""

from __future__ import annotations

import argparse

from ..engine.config import TRAIN_FLAGS, TrainConfig, load_config, parse_overrides


def add_flags(p: argparse.ArgumentParser, flags: dict, base: dict | None = None) -> None:
    """Adds config ``flags`` (flag -> (key, type, help)) to ``p``.

    Each defaults to None, so that only the flags given override the YAML; its help
    shows the value the key takes otherwise: ``base`` (a command's own defaults) or
    :class:`~sact.engine.config.TrainConfig`'s.
    """
    defaults = {**TrainConfig.defaults(), **(base or {})}
    for flag, (key, typ, text) in flags.items():
        shown = "" if defaults[key] is None else f" (default: {defaults[key]})"
        p.add_argument(flag, type=typ, default=None, help=(text + shown).replace("%", "%%"))


def flag_overrides(args: argparse.Namespace, flags: dict) -> dict:
    """``{config key: value}`` of the ``flags`` given on the command line."""
    values = {key: getattr(args, flag[2:].replace("-", "_")) for flag, (key, _, _) in flags.items()}
    return {key: value for key, value in values.items() if value is not None}


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """``--config``, ``--set key=value`` and the common flags of :class:`TrainConfig`."""
    p.add_argument("--config", default=None, help="YAML file of TrainConfig keys (see configs/)")
    add_flags(p, TRAIN_FLAGS)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, value parsed as YAML (repeatable), e.g. --set model_kwargs='{base_channels: 8}'")


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


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a vanilla / ACT / SACT ResNet (works under torchrun)",
                       description="Train with CE + tau * ponder cost. Settings: defaults < --config YAML < --set < flags.")
    add_config_arguments(p)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out (its train_state.safetensors must exist; settings that change "
                   "training must match it, see docs/trust.md)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous run in --out (its files are removed)")
    p.add_argument("--strict", action="store_true",
                   help="image folders: stop at the first unreadable image (default: skip it with a warning)")
    p.add_argument("--no-tensorboard", action="store_true", help="do not write TensorBoard logs")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars: a line on stderr every --log-every steps instead")
    p.add_argument("--download", action="store_true", help="download Fashion-MNIST with torchvision if missing")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return train_and_report(config_from_args(args), print_config=args.print_config, skip=("stages",))


def train_and_report(config, *, print_config: bool = False, skip: tuple[str, ...] = ()) -> int:
    """``--print-config``, or train with the engine and print the metrics (JSON, stdout; without
    the ``skip`` keys) and the files written (stderr), once under ``torchrun``."""
    import yaml

    from ..engine import main
    from ..engine.distributed import is_rank_zero
    from ..io.files import dumps_json

    if print_config:
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    if config.task == "detection":
        from .. import detection  # noqa: F401  (registers the detection task with the engine)
    metrics = main(config)
    if is_rank_zero():  # one summary under torchrun
        print(dumps_json({k: v for k, v in metrics.items() if k not in skip}, indent=2))
        report_outputs(config)
    return 0


def report_outputs(config) -> None:
    """Where a finished run put its files, on stderr (stdout holds the metrics JSON)."""
    import sys
    from pathlib import Path

    from ..engine.state import STATE_FILE

    out = Path(config.out_dir)
    lines = [f"wrote {out / 'model.safetensors'} and model.json (the model)",
             f"wrote {out / 'metrics.json'} (the final evaluation)",
             f"wrote {out / STATE_FILE} and config.yaml (to continue the run: --resume)"]
    if config.tensorboard:
        lines.append(f"wrote {out / 'tb'} (tensorboard --logdir {out / 'tb'})")
    print("\n".join(lines), file=sys.stderr)
