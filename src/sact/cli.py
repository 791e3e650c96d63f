"""The ``sact`` command line.

Each sub-command lives in ``sact/commands/<name>.py`` and defines
``register(subparsers) -> None``, adding its parser with ``set_defaults(func=run)``
where ``run(args) -> int`` returns the exit status. Modules are imported lazily, so a
command's optional dependencies are only needed when it is used.

Errors are reported here, once for every command: a :class:`sact.errors.SactError`
(and the library's ``ValueError`` / missing-file errors, which mean bad input) prints
one line ``sact <command>: <message>`` on stderr and exits with 2 (bad input or usage)
or 1 (runtime failure); anything else is an internal error (one line, exit 1; set
``SACT_DEBUG=1`` for the traceback). An unknown flag prints the sub-command's usage
(exit 2) with a hint: the closest flags, or how to give a config key or a model builder
argument that has no flag of its own (``--set``). The table is in ``docs/trust.md``.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import os
import sys
import warnings
from typing import Callable

from .errors import EXIT_FAILURE, EXIT_INPUT, SactError

# module name under sact.commands, in the order shown by --help
COMMAND_MODULES = (
    "demo",
    "train",
    "evaluate",
    "predict",
    "ponder_map",
    "plot",
    "bench",
    "detect",
    "saliency",
    "export",
    "convert_tf",
    "models",
)

#: Environment variable that makes the CLI re-raise errors with their traceback.
DEBUG_ENV = "SACT_DEBUG"

# OS errors that mean "the path the user gave is wrong" (exit 2); other OS errors
# (disk full, permissions while writing) are runtime failures (exit 1).
_PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError)


class _Parser(argparse.ArgumentParser):
    """Remembers the deepest parser that parsed the command line, so that an unknown
    flag is reported with that sub-command's usage rather than the top level's."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if not hasattr(namespace, "_leaf_parser"):
            namespace._leaf_parser = self
        return namespace, extras


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sact",
        description="Spatially Adaptive Computation Time for residual networks (train, evaluate, "
        "run sparse inference and inspect ponder-cost maps). Exit status: 0 success, 1 runtime "
        "failure, 2 bad usage or input (docs/trust.md).",
    )
    from ._version import __version__

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


def unknown_flag_hint(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    """What to type instead of the first unknown flag in ``extras`` (empty if nothing fits).

    For a command that takes ``--set KEY=VALUE``, a :class:`~sact.engine.config.TrainConfig`
    key or an argument of a registered model builder (``--base-channels 8`` ->
    ``--set model_kwargs='{base_channels: 8}'``) says how to give it; otherwise the
    closest flags of ``parser``.
    """
    i, flag = next(((i, x) for i, x in enumerate(extras) if x.startswith("--")), (0, ""))
    name, eq, value = flag[2:].partition("=")
    if not name:
        return ""
    if not eq:
        value = extras[i + 1] if i + 1 < len(extras) and not extras[i + 1].startswith("-") else "VALUE"
    flags = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    if "--set" in flags:
        from .engine.config import TrainConfig
        from .models import _REGISTRY

        key = name.replace("-", "_")
        if key in TrainConfig.__dataclass_fields__:
            return f"config key {key}: --set {key}={value}"
        if any(key in inspect.signature(fn).parameters for fn in _REGISTRY.values()) and key != "mode":
            return f"{key} is an argument of the model builder: --set model_kwargs='{{{key}: {value}}}'"
    close = difflib.get_close_matches(f"--{name}", flags, n=3, cutoff=0.6)
    return f"did you mean {' or '.join(close)}?" if close else ""


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line.

    An exception re-raised from a DataLoader worker carries the worker's traceback in
    its message; only its last line (the original message) is kept.
    """
    text = str(error)
    if "\nOriginal Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        head, sep, tail = last.partition(": ")
        text = tail if sep and "." in head and " " not in head else last
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        text = f"{error.strerror}: {error.filename}"
    return " ".join(text.split()) or type(error).__name__


def _missing_dependency(error: BaseException) -> bool:
    """An optional third-party package is not installed (not a bug in sact itself)."""
    return isinstance(error, ImportError) and not (getattr(error, "name", None) or "sact").startswith("sact")


def _out_of_memory(error: BaseException) -> bool:
    return isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError"  # torch's, a RuntimeError


def exit_code(error: BaseException) -> int:
    """The documented exit status for ``error`` (see the module docstring)."""
    if isinstance(error, SactError):
        return error.exit_code
    if isinstance(error, (ValueError, *_PATH_ERRORS)) or _missing_dependency(error):
        return EXIT_INPUT
    return EXIT_FAILURE


def is_reported_error(error: BaseException) -> bool:
    """True for errors with a message meant for the user; False for internal errors (bugs)."""
    return (isinstance(error, (SactError, ValueError, OSError)) or _missing_dependency(error)
            or _out_of_memory(error))


def _show_warning(message, category, filename, lineno, file=None, line=None, *, prog: str) -> None:
    stream = file if file is not None else sys.stderr
    try:
        stream.write(f"{prog}: warning: {' '.join(str(message).split())}\n")
    except OSError:  # stderr gone
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    leaf = vars(args).pop("_leaf_parser", parser)  # not an argument: keep it out of configs built from args
    if extras:
        hint = unknown_flag_hint(leaf, extras)
        leaf.error(f"unrecognized arguments: {' '.join(extras)}" + (f" ({hint})" if hint else ""))  # usage, exit 2
    if not getattr(args, "func", None):
        leaf.print_help()
        return EXIT_INPUT
    return run_reported(lambda: args.func(args), prog=leaf.prog)


def run_reported(func: Callable[[], int | None], *, prog: str) -> int:
    """Call ``func()`` and return its exit status (``None``: 0); an error becomes one line
    ``prog: message`` on stderr and its exit code, a warning ``prog: warning: message``
    (see the module docstring). :func:`main` runs every command through this."""
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    previous = warnings.showwarning
    warnings.showwarning = lambda *a, **k: _show_warning(*a, **k, prog=prog)
    try:
        return int(func() or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # every error ends here: one line, documented exit code
        if debug:
            raise
        code = exit_code(e)
        if is_reported_error(e):
            print(f"{prog}: {one_line(e)}", file=sys.stderr)
        else:
            print(f"{prog}: internal error ({type(e).__name__}: {one_line(e)}); run again with {DEBUG_ENV}=1 "
                  "for the traceback and report it", file=sys.stderr)
        return code
    finally:
        warnings.showwarning = previous


if __name__ == "__main__":
    sys.exit(main())
