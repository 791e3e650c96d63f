"""The two kinds of error a user of the ``sact`` command sees, and their exit codes.

Library code raises these (or a subclass) when a failure is the user's to fix;
:func:`sact.cli.main` prints one line ``sact <command>: <message>`` on stderr and exits
with :attr:`SactError.exit_code`:

* :class:`InputError` (exit 2): a bad flag or value, a missing, corrupt, forged or
  untrusted input file, an output path that would replace something (without
  ``--overwrite``), a resume that does not fit. Nothing was written.
* :class:`RunFailure` (exit 1): the command started and then failed (the loss or the
  weights became non-finite, some inputs could not be processed).

Both keep the built-in base a caller may already catch: ``InputError`` is a
``ValueError``, ``RunFailure`` a ``RuntimeError``. The table of exit codes is in
``docs/trust.md``.
"""

from __future__ import annotations

__all__ = ["SactError", "InputError", "RunFailure", "DataError", "OutputExistsError", "EXIT_INPUT", "EXIT_FAILURE"]

EXIT_FAILURE = 1
EXIT_INPUT = 2


class SactError(Exception):
    """Base of the errors the CLI reports as one line (exit :attr:`exit_code`)."""

    exit_code = EXIT_FAILURE


class InputError(SactError, ValueError):
    """Bad usage or bad input (flags, config values, input files): exit 2."""

    exit_code = EXIT_INPUT


class RunFailure(SactError, RuntimeError):
    """The command started and failed while running: exit 1."""

    exit_code = EXIT_FAILURE


class DataError(InputError):
    """A dataset file or folder that cannot be used (the message names it)."""


class OutputExistsError(InputError):
    """An output path already holds something this command would replace or mix with."""
