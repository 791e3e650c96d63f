"""Image classification, the paper's main task: its datasets (:mod:`~sact.classification.data`),
evaluation (:mod:`~sact.classification.evaluate`: top-1/top-5, loss, FLOPs and ponder statistics;
:mod:`~sact.classification.eval_run`: ``sact eval``) and its plug-in for the training loop
(:class:`ClassificationTask`, registered with the engine on import as ``task: classification``)."""

from ..engine.tasks import register_task
from .task import ClassificationTask

__all__ = ["ClassificationTask"]

register_task("classification", ClassificationTask)
