"""Moved to :mod:`sact.tools.gallery`; this alias keeps ``sact.gallery`` working for one release (it is the same module
object, so every name, private ones included, and monkeypatching behave as before)."""

import sys

import sact.tools.gallery as _moved

sys.modules[__name__] = _moved
