"""Moved to :mod:`sact.tools.ponder`; this alias keeps ``sact.ponder`` working for one release (it is the same module
object, so every name, private ones included, and monkeypatching behave as before)."""

import sys

import sact.tools.ponder as _moved

sys.modules[__name__] = _moved
