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

:class:`ClassificationTask` is below; :class:`sact.detection.task.DetectionTask` is
the detection one, registered when ``sact.detection`` is imported (:func:`register_task`: the
engine imports no task). :func:`get_task` picks by ``config.task``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..output import ModelOutput, ponder_loss
from .amp import autocast, training_memory_format

__all__ = ["Task", "Step", "ClassificationTask", "get_task", "register_task", "registered_tasks", "compute_loss"]


def compute_loss(out: ModelOutput, labels: Tensor, *, tau: float, mode: str, label_smoothing: float = 0.0):
    """``(total, cross_entropy)``: ``CE + tau * ponder_cost`` (no ponder term for vanilla).

    Args:
        out: model output (logits ``[B, K]``, ponder cost ``[B]``).
        labels: ``[B]`` int64.
    """
    ce = F.cross_entropy(out.logits.float(), labels, label_smoothing=label_smoothing)
    if mode == "vanilla":
        return ce, ce
    return ce + ponder_loss(out, tau), ce


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


class ClassificationTask:
    """Image classification: ``CE + tau * ponder_cost`` on ``(images, labels)`` batches."""

    name = "classification"

    def __init__(self) -> None:
        from .datasets import collate

        self.collate = collate

    def data(self, config, *, train: bool = True, train_set=None, eval_set=None):
        from .datasets import build_datasets, spec_from_sets

        if train_set is not None and eval_set is not None:
            return spec_from_sets(train_set, eval_set, config)
        data = build_datasets(config, train=train and train_set is None)
        data.train = train_set if train_set is not None else data.train
        data.eval = eval_set if eval_set is not None else data.eval
        return data

    def model(self, config, data, *, warm_start: bool) -> nn.Module:
        from ..models import create_model
        from .warm_start import warm_start as load

        kwargs = {"num_classes": data.num_classes, "in_chans": data.in_chans, **config.model_kwargs}
        model = create_model(config.model, mode=config.mode, **kwargs)
        if warm_start and config.init:
            load(model, config.init)
        return model

    def step(self, model, batch, config, *, device, amp) -> Step:
        fmt = training_memory_format(config.memory_format, device, self.name)
        images = batch[0].to(device, non_blocking=True).contiguous(memory_format=fmt)
        labels = batch[1].to(device, non_blocking=True)
        with autocast(device, amp):
            out = model(images)
        loss, ce = compute_loss(out, labels, tau=config.tau, mode=config.mode, label_smoothing=config.label_smoothing)
        return Step(loss, out, (images, labels), {"loss": loss.detach(), "cross_entropy": ce.detach()})

    def train_logs(self, step: Step) -> dict[str, Tensor]:
        out, labels = step.out, step.inputs[1]
        return {**step.terms, "accuracy": (out.logits.argmax(1) == labels).float().mean(),
                "ponder_cost": out.ponder_cost.detach().float().mean(), "flops": out.flops.float().mean()}

    def images(self, step: Step) -> dict[str, np.ndarray]:
        from ..viz import ponder_overlay_grid

        images = step.inputs[0].float()
        return {"ponder_maps": ponder_overlay_grid(images, step.out.stages),
                "num_units_maps": ponder_overlay_grid(images, step.out.stages, field="num_units")}

    def evaluate(self, model, loader, *, config, data, device, amp, info, progress: bool) -> dict:
        from .evaluate import evaluate

        return evaluate(model, loader, device=device, tau=config.tau, amp_dtype=amp, info=info, progress=progress)

    def meta(self, data) -> dict:
        return {}


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
    """The task of ``config.task`` (``"classification"``; ``"detection"`` once ``sact.detection`` is imported).

    Raises:
        ValueError: a name no package registered.
    """
    if name not in _TASKS:
        hint = " (import sact.detection first: it registers the detection task)" if name == "detection" else ""
        raise ValueError(f"task {name!r} is not registered{hint}; registered: {', '.join(registered_tasks())}")
    return _TASKS[name]()


register_task("classification", ClassificationTask)
