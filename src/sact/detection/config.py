"""The detection task's settings: what ``sact detect train`` starts from.

The fields themselves are keys of the one run file (:class:`sact.engine.TrainConfig`, so a
``config.yaml`` or checkpoint of a detection run reads like any other); this module holds the
detection defaults, and the command's flags live with the other flag tables in
:mod:`sact.commands.flags`.
"""

from __future__ import annotations

__all__ = ["DETECT_DEFAULTS"]

#: The starting point of ``sact detect train`` (a TrainConfig subset; :mod:`sact.detection.task`):
#: small CIFAR-style backbone, greyscale images, SGD with warm-up and a cosine decay.
DETECT_DEFAULTS = {
    "task": "detection",
    "dataset": "coco",
    "model": "resnet20_cifar",
    "model_kwargs": {"in_chans": 1},
    "steps": 0,
    "epochs": 4,
    "batch_size": 8,
    "eval_batch_size": 8,
    "lr": 0.02,
    "weight_decay": 1e-4,
    "schedule": "cosine",
    "warmup_steps": 100,
}
