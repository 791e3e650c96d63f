"""``sact train``: train a vanilla / ACT / SACT ResNet (single process or ``torchrun``)."""

from __future__ import annotations

import argparse

from .flags import add_config_arguments, add_run_switches, config_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a vanilla / ACT / SACT ResNet (works under torchrun)",
                       description="Train with CE + tau * ponder cost. Settings: defaults < --config YAML < --set < flags.")
    add_config_arguments(p)
    add_run_switches(p, resume_help="continue the run in --out (its train_state.safetensors must exist; settings "
                     "that change training must match it, see docs/trust.md)")
    p.add_argument("--strict", action="store_true",
                   help="image folders: stop at the first unreadable image (default: skip it with a warning)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars: a line on stderr every --log-every steps instead")
    p.add_argument("--download", action="store_true", help="download Fashion-MNIST with torchvision if missing")
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
