"""Moved to :mod:`sact.tools.export`; this alias keeps ``sact.export`` working for one release (it is the same module
object, so every name, private ones included, and monkeypatching behave as before)."""

import sys

import sact.tools.export as _moved

sys.modules[__name__] = _moved
