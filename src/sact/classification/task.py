"""Image classification as a task of the one training loop (:mod:`sact.engine.train`):
``CE + tau * ponder_cost`` on ``(images, labels)`` batches of the datasets of
:mod:`sact.classification.data`, evaluated by :func:`sact.classification.evaluate.evaluate`."""

from __future__ import annotations

import numpy as np
from torch import Tensor, nn

from ..engine.amp import autocast, training_memory_format
from ..engine.datasets import collate
from ..engine.tasks import Step
from ..output import compute_loss

__all__ = ["ClassificationTask"]


class ClassificationTask:
    """Image classification: ``CE + tau * ponder_cost`` on ``(images, labels)`` batches."""

    name = "classification"

    collate = staticmethod(collate)

    def data(self, config, *, train: bool = True, train_set=None, eval_set=None):
        from .data import build_datasets, spec_from_sets

        if train_set is not None and eval_set is not None:
            return spec_from_sets(train_set, eval_set, config)
        data = build_datasets(config, train=train and train_set is None)
        data.train = train_set if train_set is not None else data.train
        data.eval = eval_set if eval_set is not None else data.eval
        return data

    def model(self, config, data, *, warm_start: bool) -> nn.Module:
        from ..models import create_model
        from ..engine.warm_start import warm_start as load

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
