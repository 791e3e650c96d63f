"""Moved to :mod:`sact.tools.demo`; this alias keeps ``sact.engine.demo`` working for one release (it is the same module
object, so every name, private ones included, and monkeypatching behave as before)."""

import sys

import sact.tools.demo as _moved

sys.modules[__name__] = _moved
