"""Moved to :mod:`sact.tools.inference`; this alias keeps ``sact.inference`` working for one release (it is the same module
object, so every name, private ones included, and monkeypatching behave as before)."""

import sys

import sact.tools.inference as _moved

sys.modules[__name__] = _moved
