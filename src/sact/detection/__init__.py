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

from .backbone import BackboneOutput, SACTBackbone, freeze_batchnorm, load_backbone_weights
from .coco import AP_NAMES, CocoDetection, CocoFormatError, coco_evaluate, collate, load_coco_json, to_coco_results
from .detector import (DetectorOutput, SACTFasterRCNN, build_detector, detection_loss, load_detector, loss_terms,
                       save_detector)
from .evaluate import evaluate, predict
from .sparse import SparseDetector, sparse_detector, unfreeze_batchnorm
from .task import DetectionTask  # registers the detection task with the engine (task: detection)

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
