"""Moved to :mod:`sact.tools.bench.break_even`; this alias goes in the next release."""

from ..tools.bench.break_even import UNIT_CASES, break_even

__all__ = ["UNIT_CASES", "break_even"]
