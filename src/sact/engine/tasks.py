"""What a task plugs into the one training loop (:mod:`sact.engine.train`).

The loop is written once: data order and exact resume, the forward under autocast, the
loss checked for NaN / inf on every rank before the update, the weights after it,
logging, evaluation, checkpoints (:func:`sact.save_checkpoint` +
``train_state.safetensors``), ``torchrun``. A :class:`Task` says only what differs
between image classification and detection:

* :meth:`~Task.data` -- the datasets (a :class:`~sact.engine.datasets.DataSpec`) and
  :attr:`~Task.collate`, how their items become batches;
* :meth:`~Task.model` -- the network that is trained and saved (built from the config,
  warm-started with :func:`sact.engine.warm_start`);
* :meth:`~Task.step` -- forward and loss of one batch;
* :meth:`~Task.train_logs`, :meth:`~Task.images` -- the scalars the loop averages and reports
  (progress bar, log lines, TensorBoard) and TensorBoard pictures;
* :meth:`~Task.evaluate` -- the metrics of the evaluation set;
* :meth:`~Task.meta` -- what the checkpoint records besides the common entries.

:class:`sact.classification.ClassificationTask` and :class:`sact.detection.task.DetectionTask`
are the two tasks; each package registers its task on import (:func:`register_task`: the engine
imports no task), and ``import sact`` imports both. :func:`get_task` picks by ``config.task``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from ..output import compute_loss  # noqa: F401  (the loss of the paper; its home is sact.output)

__all__ = ["Task", "Step", "get_task", "register_task", "registered_tasks", "compute_loss"]


@dataclass
class Step:
    """One training batch after the forward pass.

    Attributes:
        loss: 0-dim float32, what is back-propagated.
        out: the model's output (:class:`~sact.output.ModelOutput` or a detector's).
        inputs: the batch on the device (``(images, labels)`` or ``(images, targets)``).
        terms: other 0-dim tensors worth logging (loss terms), detached.
    """

    loss: Tensor
    out: Any
    inputs: tuple
    terms: dict[str, Tensor] = field(default_factory=dict)


class Task(Protocol):
    """The task-specific parts of a training run (see the module docstring)."""

    name: str
    collate: Callable

    def data(self, config, *, train: bool = True, train_set=None, eval_set=None):
        """The run's :class:`~sact.engine.datasets.DataSpec` (given sets replace the config's)."""

    def model(self, config, data, *, warm_start: bool) -> nn.Module:
        """The network, warm-started from ``config.init`` when ``warm_start``."""

    def step(self, model: nn.Module, batch, config, *, device: torch.device, amp: torch.dtype | None) -> Step:
        """Forward and loss of one training batch."""

    def train_logs(self, step: Step) -> dict[str, Tensor]:
        """Scalars of a training step as 0-dim tensors, left on the device (called every
        step; the loop sums them and reads their means every ``log_every`` steps)."""

    def images(self, step: Step) -> dict[str, np.ndarray]:
        """TensorBoard pictures ``name -> [H, W, 3]`` uint8 of a training step."""

    def evaluate(self, model: nn.Module, loader, *, config, data, device, amp, info, progress: bool) -> dict:
        """Metrics of the evaluation set (this rank's shard; summed over ranks)."""

    def meta(self, data) -> dict:
        """Task-specific checkpoint meta."""


#: the tasks the loop can train, by ``config.task``: name -> a factory of the task
_TASKS: dict[str, Callable[[], Task]] = {}


def register_task(name: str, factory: Callable[[], Task]) -> None:
    """Makes ``config.task == name`` train with ``factory()``. The engine imports no task:
    each task package registers itself (``sact.detection`` does on import)."""
    _TASKS[name] = factory


def registered_tasks() -> list[str]:
    """The names :func:`get_task` knows now."""
    return sorted(_TASKS)


def get_task(name: str) -> Task:
    """The task of ``config.task`` (``import sact`` registers ``"classification"`` and ``"detection"``).

    Raises:
        ValueError: a name no package registered.
    """
    if name not in _TASKS:
        raise ValueError(f"task {name!r} is not registered; registered: {', '.join(registered_tasks())}")
    return _TASKS[name]()


