"""Faster R-CNN with an adaptive backbone whose forward returns the ponder cost and FLOPs.

:class:`SACTFasterRCNN` is torchvision's ``FasterRCNN`` whose ``forward`` follows
``GeneralizedRCNN.forward`` step by step, but calls the backbone's
``forward_with_ponder`` and returns a :class:`DetectorOutput` holding the detection
losses (training) or detections (eval) *and* the per-image ponder cost, backbone FLOPs
and stage outputs. The training loss is ``sum(losses) + tau * ponder_cost.mean()``
(:func:`detection_loss`), the reference's ponder term added to the detection losses.

:func:`build_detector` assembles one from a registered model with settings suited to
small images; :func:`save_detector` / :func:`load_detector` store it as safetensors
plus a JSON sidecar holding everything needed to rebuild it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor
from torchvision.models.detection import FasterRCNN

from ..checkpoint import CheckpointError, atomic_write_bytes, non_finite_tensors, validate_model_spec
from ..models.base import AdaptiveResNet
from ..stage import StageOutput
from .backbone import SACTBackbone

__all__ = [
    "DetectorOutput",
    "SACTFasterRCNN",
    "build_detector",
    "detection_loss",
    "save_detector",
    "load_detector",
    "DETECTOR_FORMAT",
]

DETECTOR_FORMAT = "sact-detector"
_VERSION = 1


@dataclass
class DetectorOutput:
    """What :meth:`SACTFasterRCNN.forward` returns.

    Attributes:
        losses: training: torchvision's ``loss_classifier, loss_box_reg, loss_objectness,
            loss_rpn_box_reg`` (scalars); eval: empty.
        detections: eval: per image ``{"boxes" [N, 4] (x0, y0, x1, y1) in input pixels,
            "scores" [N], "labels" [N]}``; training: empty.
        ponder_cost: ``[B]`` backbone ponder cost per image (differentiable).
        backbone_flops: ``[B]`` FLOPs of the backbone's stem and stages per image.
        stages: per stage :class:`StageOutput` (ponder maps at the padded input's resolution).
        image_sizes: per image ``(h, w)`` after the transform's resize (before padding).
    """

    losses: dict[str, Tensor] = field(default_factory=dict)
    detections: list[dict[str, Tensor]] = field(default_factory=list)
    ponder_cost: Tensor | None = None
    backbone_flops: Tensor | None = None
    stages: list[StageOutput] = field(default_factory=list)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)


def detection_loss(output: DetectorOutput, tau: float) -> tuple[Tensor, dict[str, float]]:
    """``sum(detection losses) + tau * mean(ponder_cost)``, and the terms for logging.

    Returns:
        ``(loss, {"loss", "loss_<name>"..., "ponder_cost", "ponder_loss"})`` (floats).
    """
    if tau < 0:
        raise ValueError(f"tau must be non-negative, got {tau}")
    if not output.losses:
        raise ValueError("the output holds no losses: call the detector in training mode with targets")
    det = sum(output.losses.values())
    ponder = output.ponder_cost.mean()
    loss = det + tau * ponder
    logs = {k: float(v.detach()) for k, v in output.losses.items()}
    logs.update(ponder_cost=float(ponder.detach()), ponder_loss=float(tau * ponder.detach()), loss=float(loss.detach()))
    return loss, logs


class SACTFasterRCNN(FasterRCNN):
    """torchvision Faster R-CNN over a :class:`SACTBackbone`, returning ponder cost and FLOPs.

    Constructed like ``FasterRCNN(backbone, num_classes=..., ...)``; ``backbone`` must
    be a :class:`SACTBackbone`. Keyword arguments pass to ``FasterRCNN``.
    """

    def __init__(self, backbone: SACTBackbone, **kwargs: Any) -> None:
        if not isinstance(backbone, SACTBackbone):
            raise ValueError(f"backbone must be an SACTBackbone, got {type(backbone).__name__}")
        super().__init__(backbone, **kwargs)

    def forward(
        self,
        images: list[Tensor],
        targets: list[dict[str, Tensor]] | None = None,
        *,
        executors: Sequence | None = None,
    ) -> DetectorOutput:
        """Detect (eval) or compute the losses (training).

        Args:
            images: ``B`` tensors ``[C_in, H_i, W_i]`` (values before normalisation;
                the transform normalises with ``image_mean`` / ``image_std``).
            targets: training: per image ``{"boxes" float [N, 4] (x0, y0, x1, y1),
                "labels" int64 [N]}`` (labels 1..K, 0 is background).
            executors: where the backbone's stages run (see :func:`sparse_detector`).

        Returns:
            :class:`DetectorOutput`.
        """
        if self.training and targets is None:
            raise ValueError("targets are required in training mode")
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        batch, targets = self.transform(images, targets)  # resize, normalise, pad
        if targets is not None:
            for i, t in enumerate(targets):
                bad = (t["boxes"][:, 2:] <= t["boxes"][:, :2]).any(1)
                if bad.any():
                    raise ValueError(f"target {i} has a degenerate box {t['boxes'][bad][0].tolist()}")
        out = self.backbone.forward_with_ponder(batch.tensors, executors=executors)  # [B, C, H, W] padded batch
        proposals, rpn_losses = self.rpn(batch, out.features, targets)
        detections, roi_losses = self.roi_heads(out.features, proposals, batch.image_sizes, targets)
        result = DetectorOutput(
            ponder_cost=out.ponder_cost,
            backbone_flops=out.flops,
            stages=out.stages,
            image_sizes=[tuple(s) for s in batch.image_sizes],
        )
        if self.training:
            result.losses = {**rpn_losses, **roi_losses}
        else:
            result.detections = self.transform.postprocess(detections, batch.image_sizes, original_sizes)
        return result


def build_detector(
    model: AdaptiveResNet,
    *,
    num_classes: int,
    return_stages: Sequence[str] | None = None,
    trainable_layers: int | None = None,
    frozen_bn: bool = True,
    frozen_stem: bool | None = None,
    train_halting: bool = True,
    out_channels: int = 256,
    anchor_sizes: Sequence[int] | None = None,
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    min_size: int = 800,
    max_size: int = 1333,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
    representation_size: int = 1024,
    **fasterrcnn_kwargs: Any,
) -> SACTFasterRCNN:
    """Build an :class:`SACTFasterRCNN` with an FPN over ``model``.

    Args:
        model: from :func:`sact.create_model` (taken over, see :class:`SACTBackbone`).
        num_classes: classes including background (COCO: 91; Fashion-MNIST: 11).
        return_stages, trainable_layers, frozen_bn, frozen_stem, train_halting,
            out_channels: see :class:`SACTBackbone`.
        anchor_sizes: one anchor size per FPN level; default ``8 * stride`` of each
            level (torchvision's 32..512 for ResNet-50 layer1..pool).
        aspect_ratios: anchor aspect ratios, shared by all levels.
        min_size, max_size: the transform's resize (shorter side, cap on the longer).
            For 64-128 px canvases set both to the canvas size (no resize).
        image_mean, image_std: normalisation, one value per input channel; default
            0 / 1 (images kept in [0, 1], as Cluttered Fashion-MNIST classifiers see them).
        representation_size: width of the two-layer box head.
        **fasterrcnn_kwargs: other ``FasterRCNN`` arguments (``box_batch_size_per_image``...).

    Returns:
        The detector; ``detector.detector_config`` holds the arguments above (without
        ``model``), for :func:`save_detector`.
    """
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign

    if num_classes < 2:
        raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}")
    if min_size < 1 or max_size < min_size:
        raise ValueError(f"need 1 <= min_size <= max_size, got min_size={min_size}, max_size={max_size}")
    config = {k: v for k, v in locals().items() if k not in ("model", "fasterrcnn_kwargs", "AnchorGenerator",
                                                              "TwoMLPHead", "MultiScaleRoIAlign")}
    config.update(fasterrcnn_kwargs)
    backbone = SACTBackbone(model, return_stages=return_stages, trainable_layers=trainable_layers, frozen_bn=frozen_bn,
                            frozen_stem=frozen_stem, train_halting=train_halting, out_channels=out_channels)
    levels = backbone.feature_names
    strides = [backbone.strides[n] for n in backbone.return_stages]
    strides += [strides[-1] * 2] * (len(levels) - len(strides))  # "pool" halves the last map
    if anchor_sizes is None:
        anchor_sizes = [8 * s for s in strides]
    if len(anchor_sizes) != len(levels):
        raise ValueError(f"anchor_sizes needs one size per FPN level {list(levels)}, got {list(anchor_sizes)}")
    anchors = AnchorGenerator(tuple((int(s),) for s in anchor_sizes), (tuple(aspect_ratios),) * len(levels))
    roi_names = list(backbone.return_stages)  # RoIs pool from the stage levels, not "pool" (torchvision)
    roi_pool = MultiScaleRoIAlign(featmap_names=roi_names, output_size=7, sampling_ratio=2)
    box_head = TwoMLPHead(out_channels * 7 * 7, representation_size)
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

    c = backbone.in_chans
    mean = [0.0] * c if image_mean is None else [float(v) for v in image_mean]
    std = [1.0] * c if image_std is None else [float(v) for v in image_std]
    if len(mean) != c or len(std) != c or min(std) <= 0:
        raise ValueError(f"image_mean/image_std need {c} values (std > 0), got {mean}, {std}")
    detector = SACTFasterRCNN(
        backbone,
        rpn_anchor_generator=anchors,
        box_roi_pool=roi_pool,
        box_head=box_head,
        box_predictor=FastRCNNPredictor(representation_size, num_classes),
        min_size=min_size,
        max_size=max_size,
        image_mean=mean,
        image_std=std,
        **fasterrcnn_kwargs,
    )
    config["anchor_sizes"] = [int(s) for s in anchor_sizes]
    config["return_stages"] = list(backbone.return_stages)
    config["aspect_ratios"] = [float(a) for a in aspect_ratios]
    config["image_mean"], config["image_std"] = mean, std
    detector.detector_config = config
    return detector


def _paths(path: str | Path) -> tuple[Path, Path]:
    from ..checkpoint import checkpoint_paths

    return checkpoint_paths(path, default_name="detector")


def save_detector(detector: SACTFasterRCNN, path: str | Path, *, meta: dict[str, Any] | None = None) -> Path:
    """Save weights (``NAME.safetensors``) and a JSON sidecar (``NAME.json``), atomically.

    The document ``{"format": "sact-detector", "version", "backbone": model.sact_config,
    "detector": detector_config, "meta"}`` is also stored in the safetensors header.

    Args:
        detector: from :func:`build_detector` (a DDP wrapper is unwrapped).
        path: ``NAME``, ``NAME.safetensors`` or a folder (then ``folder/detector``).
        meta: JSON-serialisable extras (tau, metrics, class names, training config).

    Returns:
        The weights file's path.
    """
    from safetensors.torch import save

    detector = getattr(detector, "module", detector)
    config = getattr(detector, "detector_config", None)
    backbone_cfg = getattr(detector.backbone.body, "sact_config", None)
    if config is None or backbone_cfg is None:
        raise CheckpointError("detector lacks detector_config / backbone sact_config: build it with build_detector")
    weights, sidecar = _paths(path)
    state = {k: v.detach().cpu().contiguous() for k, v in detector.state_dict().items()}
    doc = {"format": DETECTOR_FORMAT, "version": _VERSION, "backbone": backbone_cfg, "detector": config,
           "meta": meta or {}}
    header = json.dumps(doc, sort_keys=True)
    blob = save(state, metadata={"sact": header})
    text = json.dumps({**doc, "weights_file": weights.name, "weights_sha256": hashlib.sha256(blob).hexdigest()},
                      indent=2, sort_keys=True)
    atomic_write_bytes(weights, blob)
    atomic_write_bytes(sidecar, text.encode())
    return weights


def _check_detector_doc(doc: dict, weights: Path) -> None:
    """The backbone spec (:func:`sact.checkpoint.validate_model_spec`) and the detector's
    arguments (plain values, numbers within 100000, lists of at most 64) of a header."""
    backbone, options = doc.get("backbone"), doc.get("detector")
    if not (isinstance(backbone, dict) and isinstance(backbone.get("kwargs"), dict) and isinstance(options, dict)):
        raise CheckpointError(f"{weights}: the header lacks the backbone or detector arguments")
    try:
        validate_model_spec(backbone.get("name"), backbone["kwargs"])
    except ValueError as e:
        raise CheckpointError(f"{weights}: {e}") from e

    def plain(v) -> bool:
        if isinstance(v, list):
            return len(v) <= 64 and all(plain(x) for x in v)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return abs(v) <= 100_000
        return v is None or isinstance(v, (bool, str))

    bad = [f"{k}={v!r}" for k, v in options.items() if not (isinstance(k, str) and plain(v))]
    if bad:
        raise CheckpointError(f"{weights}: detector arguments out of bounds: {', '.join(bad[:5])}")


def load_detector(path: str | Path, *, map_location: str | torch.device = "cpu") -> SACTFasterRCNN:
    """Rebuild a detector saved by :func:`save_detector` (eval mode).

    Returns:
        The detector with ``checkpoint_meta`` set to the saved ``meta``.

    Raises:
        CheckpointError: missing / corrupt files, a different format, mismatched weights.
    """
    from safetensors import safe_open
    from safetensors.torch import load

    from ..models import create_model

    weights, sidecar = _paths(path)
    if not weights.exists():
        raise CheckpointError(f"detector weights not found: {weights}")
    try:
        with safe_open(str(weights), framework="pt") as f:
            doc = json.loads((f.metadata() or {}).get("sact", "null"))
        state = load(weights.read_bytes())
    except Exception as e:  # safetensors raises several types on corrupt data
        raise CheckpointError(f"cannot read {weights}: {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != DETECTOR_FORMAT or doc.get("version") != _VERSION:
        raise CheckpointError(f"{weights} is not an sact detector checkpoint (version {_VERSION})")
    _check_detector_doc(doc, weights)  # before anything is built (a forged header cannot ask for a giant)
    bad = non_finite_tensors(state)
    if bad:
        raise CheckpointError(f"{weights} holds non-finite weights (NaN or inf) in {len(bad)} tensor(s), e.g. {bad[:3]}")
    kwargs = dict(doc["backbone"]["kwargs"])
    mode = kwargs.pop("mode", "sact")
    try:
        model = create_model(doc["backbone"]["name"], mode=mode, **kwargs)
        detector = build_detector(model, **doc["detector"])
        detector.load_state_dict(state)
    except (RuntimeError, ValueError, TypeError) as e:
        raise CheckpointError(f"{weights} does not fit the detector it describes: {e}") from e
    detector.checkpoint_meta = doc.get("meta", {})
    return detector.to(map_location).eval()
