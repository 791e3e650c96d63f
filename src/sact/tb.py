"""TensorBoard writer that never imports TensorFlow.

``torch.utils.tensorboard`` goes through ``tensorboard.compat``, which imports
TensorFlow when it is installed (it is, for the optional TF-checkpoint converter). With
TensorFlow 2.21 loaded first, a later import of triton (``torch._dynamo``,
``torch.compile``, ``torchvision.ops``) crashes the process. TensorBoard has its own
switch for TF-free builds, the module ``tensorboard.compat.notf``; registering an empty
module under that name makes it use its bundled stub, which is all SummaryWriter needs.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

__all__ = ["summary_writer"]


def summary_writer(log_dir: str | Path):
    """``torch.utils.tensorboard.SummaryWriter(log_dir)`` without loading TensorFlow."""
    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(log_dir))
