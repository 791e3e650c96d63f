"""Moved to :mod:`sact.tools.plots`; this alias keeps ``sact.plots`` working for one release (it is the same module
object, so every name, private ones included, and monkeypatching behave as before)."""

import sys

import sact.tools.plots as _moved

sys.modules[__name__] = _moved
