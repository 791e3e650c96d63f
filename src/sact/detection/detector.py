"""Faster R-CNN with an adaptive backbone whose forward returns the ponder cost and FLOPs.

:class:`SACTFasterRCNN` is torchvision's ``FasterRCNN`` whose ``forward`` follows
``GeneralizedRCNN.forward`` step by step, but calls the backbone's
``forward_with_ponder`` and returns a :class:`DetectorOutput` holding the detection
losses (training) or detections (eval) *and* the per-image ponder cost, backbone FLOPs
and stage outputs. The training loss is ``sum(losses) + tau * ponder_cost.mean()``
(:func:`detection_loss`), the reference's ponder term added to the detection losses.

:func:`build_detector` assembles one from a registered model with settings suited to
small images; :func:`save_detector` / :func:`load_detector` store it in the sact
checkpoint format (:mod:`sact.checkpoint`: safetensors whose header holds the backbone's
spec and the detector's arguments, a data hash, and a JSON sidecar), so the weights file
alone rebuilds it. Detector files of sact 0.1 (format ``sact-detector``) still load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor
from torchvision.models.detection import FasterRCNN

from ..models.loading import meta_state, read_checkpoint_meta, save_checkpoint, validate_model_spec
from ..io.checkpoint import CheckpointError, checkpoint_paths, header_document, read_safetensors_header, read_verified_state
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
    "LEGACY_DETECTOR_FORMAT",
]

#: The format of detector files written by sact 0.1 (read, never written).
LEGACY_DETECTOR_FORMAT = "sact-detector"


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
        input_size: ``(H, W)`` of the padded batch the backbone ran on.
    """

    losses: dict[str, Tensor] = field(default_factory=dict)
    detections: list[dict[str, Tensor]] = field(default_factory=list)
    ponder_cost: Tensor | None = None
    backbone_flops: Tensor | None = None
    stages: list[StageOutput] = field(default_factory=list)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    input_size: tuple[int, int] | None = None


def loss_terms(output: DetectorOutput, tau: float) -> tuple[Tensor, dict[str, Tensor]]:
    """``sum(detection losses) + tau * mean(ponder_cost)`` and its terms as tensors (no sync).

    Returns:
        ``(loss, {"loss", "loss_<name>"..., "ponder_cost", "ponder_loss"})``, 0-dim tensors.
    """
    if tau < 0:
        raise ValueError(f"tau must be non-negative, got {tau}")
    if not output.losses:
        raise ValueError("the output holds no losses: call the detector in training mode with targets")
    ponder = output.ponder_cost.float().mean()
    loss = sum(v.float() for v in output.losses.values()) + tau * ponder
    terms = {k: v.detach() for k, v in output.losses.items()}
    terms.update(ponder_cost=ponder.detach(), ponder_loss=tau * ponder.detach(), loss=loss.detach())
    return loss, terms


def detection_loss(output: DetectorOutput, tau: float) -> tuple[Tensor, dict[str, float]]:
    """``sum(detection losses) + tau * mean(ponder_cost)``, and the terms for logging.

    Returns:
        ``(loss, {"loss", "loss_<name>"..., "ponder_cost", "ponder_loss"})`` (floats).
    """
    loss, terms = loss_terms(output, tau)
    return loss, {k: float(v) for k, v in terms.items()}


class SACTFasterRCNN(FasterRCNN):
    """torchvision Faster R-CNN over a :class:`SACTBackbone`, returning ponder cost and FLOPs.

    Constructed like ``FasterRCNN(backbone, num_classes=..., ...)``; ``backbone`` must
    be a :class:`SACTBackbone`. Keyword arguments pass to ``FasterRCNN``.
    """

    def __init__(self, backbone: SACTBackbone, **kwargs: Any) -> None:
        if not isinstance(backbone, SACTBackbone):
            raise ValueError(f"backbone must be an SACTBackbone, got {type(backbone).__name__}")
        super().__init__(backbone, **kwargs)

    @property
    def sact_config(self) -> dict:
        """The backbone model's ``{"name", "kwargs"}`` (:func:`sact.create_model` arguments)."""
        return self.backbone.body.sact_config

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
            input_size=(int(batch.tensors.shape[-2]), int(batch.tensors.shape[-1])),
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


def save_detector(detector: SACTFasterRCNN, path: str | Path, *, meta: dict[str, Any] | None = None) -> Path:
    """Save a detector in the sact checkpoint format (:func:`sact.save_checkpoint`), atomically.

    The header holds ``{"format": "sact-checkpoint", "model": backbone sact_config,
    "detector": detector_config, "meta", "data_sha256"}``; the sidecar the same plus
    the file's hash.

    Args:
        detector: from :func:`build_detector` (a DDP wrapper is unwrapped).
        path: ``NAME``, ``NAME.safetensors`` or a folder (then ``folder/model``).
        meta: JSON-serialisable extras (tau, metrics, class names, training config).

    Returns:
        The weights file's path.
    """
    detector = getattr(detector, "module", detector)
    if getattr(detector, "detector_config", None) is None or not isinstance(detector, SACTFasterRCNN):
        raise CheckpointError("detector lacks detector_config: build it with build_detector")
    return save_checkpoint(detector, path, meta=meta)


#: Largest image side a detector header may resize to (``min_size`` / ``max_size``): the
#: transform scales every image up to it, so it bounds the memory of each forward pass.
MAX_IMAGE_SIDE = 8192


def _check_detector_doc(doc: dict, weights: Path) -> None:
    """The backbone spec (:func:`sact.checkpoint.validate_model_spec`) and the detector's
    arguments (plain values, numbers within 100000, lists of at most 64, image sides
    within :data:`MAX_IMAGE_SIDE`) of a header. The sizes of the layers they ask for are
    bounded together when the detector is built on the ``meta`` device (:func:`load_detector`)."""
    backbone, options = doc.get("model"), doc.get("detector")
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
    bad += [f"{k}={options[k]!r} (at most {MAX_IMAGE_SIDE})" for k in ("min_size", "max_size")
            if isinstance(options.get(k), (int, float)) and options[k] > MAX_IMAGE_SIDE]
    if bad:
        raise CheckpointError(f"{weights}: detector arguments out of bounds: {', '.join(bad[:5])}")


def _detector_paths(path: str | Path) -> tuple[Path, Path]:
    """``NAME`` / its files / a run folder (``model.*``; a folder of sact 0.1 holds ``detector.*``)."""
    p = Path(path)
    if p.is_dir() and not (p / "model.safetensors").exists() and (p / "detector.safetensors").exists():
        return checkpoint_paths(p, default_name="detector")
    return checkpoint_paths(p)


def _read_doc(weights: Path) -> dict:
    """The checkpoint document; a legacy ``sact-detector`` header is mapped onto it (no data hash)."""
    if weights.is_file():
        meta = read_safetensors_header(weights).get("__metadata__") or {}
        legacy = header_document(meta.get("sact", "null"), weights)
        if isinstance(legacy, dict) and legacy.get("format") == LEGACY_DETECTOR_FORMAT:
            if legacy.get("version") != 1 or not isinstance(legacy.get("meta", {}), dict):
                raise CheckpointError(f"{weights}: unknown {LEGACY_DETECTOR_FORMAT} version {legacy.get('version')!r}")
            return {"model": legacy.get("backbone"), "detector": legacy.get("detector"), "meta": legacy.get("meta", {})}
    return read_checkpoint_meta(weights)


def load_detector(path: str | Path, *, map_location: str | torch.device = "cpu",
                  allow_non_finite: bool = False) -> SACTFasterRCNN:
    """Rebuild a detector saved by :func:`save_detector` or a detection run (eval mode).

    The header is validated before anything is allocated (backbone spec, detector
    arguments within bounds, then the detector built on the ``meta`` device: at most
    :data:`sact.models.loading.MAX_MODEL_ELEMENTS` parameters and buffers), then every
    tensor's dtype and shape, the hashes and the values
    (:func:`sact.checkpoint.read_verified_state`); only then is it built for real.

    Args:
        path: ``NAME``, ``NAME.safetensors``, or a run folder holding ``model.*``.
        map_location: device for the weights.
        allow_non_finite: load weights holding NaN / inf.

    Returns:
        The detector with ``checkpoint_meta`` set to the saved ``meta``.

    Raises:
        CheckpointError: missing / corrupt files, a classification checkpoint, forged
            or mismatched weights, non-finite weights.
    """
    from ..models import create_model

    weights, _ = _detector_paths(path)
    if not weights.exists():
        raise CheckpointError(f"detector weights not found: {weights}")
    doc = _read_doc(weights)
    if "detector" not in doc:
        name = doc["model"].get("name") if isinstance(doc.get("model"), dict) else None
        raise CheckpointError(f"{weights} holds a classification model ({name}), not a detector: evaluate it with "
                              "sact eval, or train a detector with sact detect train")
    _check_detector_doc(doc, weights)  # before anything is built (a forged header cannot ask for a giant)
    kwargs = dict(doc["model"]["kwargs"])
    mode = kwargs.pop("mode", "sact")
    label = f"detector over {doc['model']['name']} ({mode})"

    def build() -> SACTFasterRCNN:
        return build_detector(create_model(doc["model"]["name"], mode=mode, **kwargs), **doc["detector"])

    try:
        expected = meta_state(build)  # sizes bounded on the meta device: nothing allocated yet
    except (RuntimeError, ValueError, TypeError) as e:
        raise CheckpointError(f"{weights}: cannot build the {label} it describes: {e}") from e
    state = read_verified_state(weights, doc, expected=expected, label=label, allow_non_finite=allow_non_finite)
    try:
        detector = build()
        detector.load_state_dict(state)
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"{weights} does not fit the {label} it describes: {e}") from e
    detector.checkpoint_meta = doc.get("meta", {})
    return detector.to(map_location).eval()
