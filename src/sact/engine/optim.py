"""Optimiser and learning-rate schedules of the reference recipes.

Weight decay: the reference adds ``wd * sum(w^2) / 2`` for every slim ``conv2d``
kernel only (biases and BatchNorm parameters are not decayed). Its classifier is a
1x1 convolution, so our ``nn.Linear`` classifier kernel is decayed as well; in SGD
terms this is ``weight_decay=wd`` on those tensors and 0 on all others.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["param_groups", "build_optimizer", "lr_factor", "build_scheduler"]


def param_groups(model: nn.Module, weight_decay: float, *, lr: float | None = None,
                 halting_lr_mult: float = 1.0) -> list[dict]:
    """SGD groups: kernels (decayed) and everything else (not decayed), each split
    into backbone and halting-branch parameters when ``halting_lr_mult != 1``.

    Args:
        model: the network (a DDP wrapper works too).
        weight_decay: decay of the convolution / classifier kernels.
        lr: base learning rate (needed with ``halting_lr_mult``).
        halting_lr_mult: learning-rate multiplier of the halting branches (``*.halting.*``).

    Returns:
        Groups ``{"params", "weight_decay"[, "lr"]}``, empty ones left out; every
        trainable parameter appears exactly once. With the default multiplier:
        ``[kernels (wd), rest (0)]``.
    """
    if halting_lr_mult != 1.0 and lr is None:
        raise ValueError("param_groups: halting_lr_mult needs lr")
    kernel_ids = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    halting_ids = set()
    if halting_lr_mult != 1.0:
        halting_ids = {id(p) for n, p in model.named_parameters() if ".halting." in f".{n}"}
    groups: dict[tuple[bool, bool], list] = {(k, h): [] for k in (True, False) for h in (False, True)}
    for p in model.parameters():
        if p.requires_grad:
            groups[(id(p) in kernel_ids, id(p) in halting_ids)].append(p)
    out = []
    for (kernel, halting), params in groups.items():
        if not params and (halting or halting_lr_mult != 1.0):
            continue
        g = {"params": params, "weight_decay": weight_decay if kernel else 0.0}
        if lr is not None:
            g["lr"] = lr * (halting_lr_mult if halting else 1.0)
        out.append(g)
    return out


def build_optimizer(model: nn.Module, config) -> torch.optim.SGD:
    """SGD with momentum over :func:`param_groups` (``config``: a :class:`TrainConfig`)."""
    groups = param_groups(model, config.weight_decay, lr=config.lr, halting_lr_mult=config.halting_lr_mult)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)


def lr_factor(step: int, *, total_steps: int, steps_per_epoch: int, config) -> float:
    """Multiplier of the base learning rate at optimisation step ``step`` (0-based).

    * ``piecewise``: ``decay_rate ** k`` where ``k`` counts the boundaries
      ``round(b * total_steps)`` already reached (reference CIFAR: 0.1 / 0.01 / 0.001 /
      0.0001 at 60k / 75k / 90k of 100k steps, i.e. boundaries 0.6 / 0.75 / 0.9);
    * ``staircase``: ``decay_rate ** floor(step / (decay_epochs * steps_per_epoch))``
      (reference ImageNet: x0.1 every 30 epochs);
    * ``cosine``: half cosine from 1 to 0 over the steps after the warm-up (as
      torchvision's references: linear warm-up, then cosine annealing); ``constant``: 1.

    A linear warm-up over ``warmup_steps`` multiplies the result (for ``cosine``, whose
    decay starts after it, the warm-up factor alone applies during the warm-up).
    """
    if config.schedule == "piecewise":
        k = sum(step >= round(b * total_steps) for b in config.boundaries)
        f = config.decay_rate**k
    elif config.schedule == "staircase":
        period = max(1, round(config.decay_epochs * steps_per_epoch))
        f = config.decay_rate ** (step // period)
    elif config.schedule == "cosine":
        warm = min(config.warmup_steps, total_steps)
        done = min(max(step - warm, 0), total_steps - warm)
        f = 0.5 * (1.0 + math.cos(math.pi * done / max(1, total_steps - warm)))
    else:
        f = 1.0
    if config.warmup_steps and step < config.warmup_steps:
        f *= (step + 1) / config.warmup_steps
    return f


def build_scheduler(optimizer: torch.optim.Optimizer, *, total_steps: int, steps_per_epoch: int, config):
    """A ``LambdaLR`` stepped once per optimisation step with :func:`lr_factor`."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps=total_steps, steps_per_epoch=steps_per_epoch, config=config)
    )
