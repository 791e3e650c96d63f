"""Object detection with an adaptive (vanilla / ACT / SACT) ResNet backbone.

* :mod:`~sact.detection.backbone` -- :class:`SACTBackbone`: a registered model + FPN as a
  torchvision detection backbone, returning named maps, ponder maps and FLOPs;
* :mod:`~sact.detection.detector` -- :class:`SACTFasterRCNN` (forward returns losses or
  detections plus ponder cost and backbone FLOPs), :func:`build_detector`, checkpoints;
* :mod:`~sact.detection.coco` -- validated COCO-format dataset, pycocotools evaluation;
* :mod:`~sact.detection.evaluate` -- detections, backbone FLOPs and COCO AP over a loader;
* :mod:`~sact.detection.task` -- detection as a task of the one training loop
  (``sact train`` with ``task: detection``; ``sact detect train``);
* :mod:`~sact.detection.sparse` -- the backbone through the sparse engine at inference.
"""

import importlib

from ..engine.tasks import register_task

# name -> submodule: imported on first use, so that ``import sact.detection`` (which the
# command line does to register the task) does not load torchvision's detection models
_EXPORTS = {
    "BackboneOutput": "backbone",
    "SACTBackbone": "backbone",
    "freeze_batchnorm": "backbone",
    "load_backbone_weights": "backbone",
    "AP_NAMES": "coco",
    "CocoDetection": "coco",
    "CocoFormatError": "coco",
    "coco_evaluate": "coco",
    "collate": "coco",
    "load_coco_json": "coco",
    "to_coco_results": "coco",
    "DetectorOutput": "detector",
    "SACTFasterRCNN": "detector",
    "build_detector": "detector",
    "detection_loss": "detector",
    "load_detector": "detector",
    "loss_terms": "detector",
    "save_detector": "detector",
    "evaluate": "evaluate",
    "predict": "evaluate",
    "SparseDetector": "sparse",
    "sparse_detector": "sparse",
    "unfreeze_batchnorm": "sparse",
    "DetectionTask": "task",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


def _detection_task():
    return importlib.import_module(".task", __name__).DetectionTask()


register_task("detection", _detection_task)  # task: detection trains with DetectionTask

__all__ = [
    "DetectionTask",
    "AP_NAMES",
    "BackboneOutput",
    "CocoDetection",
    "CocoFormatError",
    "DetectorOutput",
    "SACTBackbone",
    "SACTFasterRCNN",
    "build_detector",
    "coco_evaluate",
    "collate",
    "detection_loss",
    "evaluate",
    "freeze_batchnorm",
    "load_backbone_weights",
    "load_coco_json",
    "load_detector",
    "loss_terms",
    "predict",
    "save_detector",
    "SparseDetector",
    "sparse_detector",
    "to_coco_results",
    "unfreeze_batchnorm",
]
