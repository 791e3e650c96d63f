"""Training and evaluation: the loop, its config, schedules, checkpoints, ``torchrun``.

Entry points: :func:`main` (train a :class:`TrainConfig`), :func:`evaluate`
(metrics of a model over batches), :func:`warm_start`.
"""

from .config import TrainConfig, load_config, parse_overrides
from .evaluate import evaluate
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
