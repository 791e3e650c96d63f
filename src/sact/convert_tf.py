"""Moved to :mod:`sact.tools.convert_tf`; this alias keeps ``sact.convert_tf`` working for one release (it is the same module
object, so every name, private ones included, and monkeypatching behave as before)."""

import sys

import sact.tools.convert_tf as _moved

sys.modules[__name__] = _moved
