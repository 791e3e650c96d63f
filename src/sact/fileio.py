"""Moved to :mod:`sact.io.files`; this alias keeps ``sact.fileio`` working for one release (it is the same module
object, so every name, private ones included, and monkeypatching behave as before)."""

import sys

import sact.io.files as _moved

sys.modules[__name__] = _moved
