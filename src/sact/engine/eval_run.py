"""Moved to :mod:`sact.classification.eval_run`; this alias keeps ``sact.engine.eval_run`` working for one release (it is
the same module object, so every name, private ones included, and monkeypatching behave as before)."""

import sys

import sact.classification.eval_run as _moved

sys.modules[__name__] = _moved
