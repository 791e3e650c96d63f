"""Moved to :mod:`sact.tools.demo_report`; this alias keeps ``sact.engine.demo_report`` working for one release (it is the same module
object, so every name, private ones included, and monkeypatching behave as before)."""

import sys

import sact.tools.demo_report as _moved

sys.modules[__name__] = _moved
