"""The ``sact`` command line.

Each sub-command lives in ``sact/commands/<name>.py`` and defines
``register(subparsers) -> None``, adding its parser with ``set_defaults(func=run)``
where ``run(args) -> int`` returns the exit status. Modules are imported lazily, so a
command's optional dependencies are only needed when it is used.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# module name under sact.commands, in the order shown by --help
COMMAND_MODULES = (
    "demo",
    "train",
    "evaluate",
    "ponder_map",
    "plot",
    "bench",
    "detect",
    "saliency",
    "export",
    "convert_tf",
    "models",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sact",
        description="Spatially Adaptive Computation Time for residual networks (train, evaluate, "
        "run sparse inference and inspect ponder-cost maps).",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"sact {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"sact.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"sact.commands.{name}":
                continue  # command not part of this build
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
