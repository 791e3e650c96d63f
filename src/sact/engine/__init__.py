"""Training: the task-agnostic loop, its config, schedules, checkpoints, ``torchrun``.

Entry points: :func:`main` (train a :class:`TrainConfig`), :func:`warm_start`. The tasks
(:mod:`sact.classification`, :mod:`sact.detection`) register themselves with the loop;
:func:`evaluate` (metrics of a classifier over batches) moved to
:func:`sact.classification.evaluate.evaluate` and is re-exported here for one release.
"""

from .config import TrainConfig, load_config, parse_overrides
from .optim import build_optimizer, build_scheduler, lr_factor, param_groups
from .train import NonFiniteLossError, compute_loss, main, train_one_epoch
from .warm_start import warm_start

__all__ = [
    "TrainConfig",
    "load_config",
    "parse_overrides",
    "evaluate",
    "param_groups",
    "build_optimizer",
    "build_scheduler",
    "lr_factor",
    "NonFiniteLossError",
    "compute_loss",
    "main",
    "train_one_epoch",
    "warm_start",
]


def __getattr__(name: str):
    if name == "evaluate":  # moved to sact.classification; this re-export stays for one release
        from ..classification.evaluate import evaluate

        return evaluate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
