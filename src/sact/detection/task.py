"""Detection as a task of the one training loop (:mod:`sact.engine.train`).

``sact train`` with ``task: detection`` (and ``sact detect train``, which builds such a
config from its flags) runs the same loop, optimiser, schedules, checkpoints, exact
resume and non-finite checks as classification. This module says what differs:

* data: COCO-format training and evaluation sets (:func:`~sact.detection.coco.coco_paths`), batches as lists;
* model: a Faster R-CNN + FPN (:func:`sact.detection.build_detector`) over the
  registered ``config.model``, warm-started by :func:`sact.engine.warm_start` with the
  detection options (a classifier of another size skipped, an RGB stem summed);
* loss: ``sum(detection losses) + tau * mean(ponder_cost)`` (no ponder term for vanilla);
* metrics: COCO box AP, backbone FLOPs and ponder cost (:func:`sact.detection.evaluate`).

:data:`DETECT_DEFAULTS` are the settings ``sact detect train`` starts from (a small
detector on small images), before ``--config``, ``--set`` and its flags.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..engine.amp import autocast
from .config import DETECT_DEFAULTS
from ..engine.tasks import Step
from ..errors import DataError, InputError
from .coco import CocoDetection, coco_paths, collate
from .detector import DetectorOutput, build_detector, loss_terms

__all__ = ["DetectionTask", "DETECT_DEFAULTS", "coco_paths", "detector_from_config", "image_maps"]


def _in_chans(config) -> int:
    return int(config.model_kwargs.get("in_chans", 3))


def detector_from_config(config, *, num_classes: int, image_side: int, warm_start: bool) -> nn.Module:
    """The Faster R-CNN of a detection config, over ``config.model`` (warm-started if asked).

    Args:
        config: a :class:`~sact.engine.TrainConfig` with ``task: detection``.
        num_classes: categories + 1 (background).
        image_side: default of ``min_size`` / ``max_size`` (the training images' side).
        warm_start: load ``config.init`` into the backbone model (before BNs are frozen).

    Raises:
        InputError: detector settings that do not fit the model (stage names, anchors), or
            a detector above :data:`sact.models.loading.MAX_MODEL_ELEMENTS` (found on the
            ``meta`` device, before anything is allocated).
        CheckpointError: an ``init`` file that does not fit.
    """
    from ..models.loading import meta_state
    from ..models import create_model
    from .backbone import load_backbone_weights

    kwargs = {"in_chans": _in_chans(config), **config.model_kwargs}
    frozen_bn = config.init is not None if config.frozen_bn is None else config.frozen_bn  # same on resume
    min_size = config.min_size or image_side
    proposals_train, proposals_test = config.rpn_proposals

    def detector(model: nn.Module) -> nn.Module:
        return build_detector(
            model, num_classes=num_classes, return_stages=config.return_stages,
            trainable_layers=config.trainable_layers, frozen_bn=frozen_bn, out_channels=config.fpn_channels,
            anchor_sizes=config.anchor_sizes, min_size=min_size, max_size=config.max_size or min_size,
            representation_size=config.representation_size, box_batch_size_per_image=config.box_batch_size,
            rpn_pre_nms_top_n_train=2 * proposals_train, rpn_post_nms_top_n_train=proposals_train,
            rpn_pre_nms_top_n_test=2 * proposals_test, rpn_post_nms_top_n_test=proposals_test,
            box_detections_per_img=config.detections_per_img,
        )

    try:
        meta_state(lambda: detector(create_model(config.model, mode=config.mode, **kwargs)))  # allocates nothing
    except ValueError as e:
        raise InputError(f"detector settings do not fit {config.model}: {e}") from e
    model = create_model(config.model, mode=config.mode, **kwargs)
    if warm_start and config.init:
        load_backbone_weights(model, config.init)
    return detector(model)


def image_maps(out: DetectorOutput, sizes: list[tuple[int, int]], *, field: str = "ponder_map") -> list[Tensor]:
    """Per image, the stages' maps summed over the image itself (padding cut off),
    nearest-resized to the image's original size (as :func:`sact.viz.summed_map`).

    Args:
        out: a detector output (maps cover the padded, resized batch ``out.input_size``).
        sizes: per image its ``(H, W)`` before the detector's transform.
        field: ``"ponder_map"`` or ``"num_units"``.

    Returns:
        Per image a ``[H, W]`` float map.
    """
    pad_h, pad_w = out.input_size
    maps = []
    for i, ((h, w), (rh, rw)) in enumerate(zip(sizes, out.image_sizes)):
        total = None
        for stage in out.stages:
            m = getattr(stage, field)[i].float()  # [h_s, w_s] over the padded batch
            keep_h = max(1, math.ceil(m.shape[0] * rh / pad_h))
            keep_w = max(1, math.ceil(m.shape[1] * rw / pad_w))
            m = F.interpolate(m[None, None, :keep_h, :keep_w], size=(h, w), mode="nearest")[0, 0]
            total = m if total is None else total + m
        maps.append(total)
    return maps


class DetectionTask:
    """Faster R-CNN training on COCO-format data (see the module docstring)."""

    name = "detection"
    collate = staticmethod(collate)

    def data(self, config, *, train: bool = True, train_set=None, eval_set=None):
        from ..engine.datasets import DataSpec

        chans = _in_chans(config)
        if eval_set is None:
            eval_set = CocoDetection(*coco_paths(config, "val"), in_chans=chans)
        if train_set is None and train:
            images, ann = coco_paths(config, "train")
            train_set = CocoDetection(images, ann, in_chans=chans, skip_empty=True, hflip=config.hflip)
            if len(train_set) == 0:
                raise DataError(f"no annotated images in {ann}")
        if eval_set.in_chans != chans:
            raise InputError(f"the evaluation set has {eval_set.in_chans} channels, the model {chans}")
        return DataSpec(train_set, eval_set, list(eval_set.class_names), chans, {})

    def model(self, config, data, *, warm_start: bool) -> nn.Module:
        ref = data.train if data.train is not None else data.eval
        info = ref.coco.imgs[ref.ids[0]] if len(ref) else {"height": 800, "width": 800}
        return detector_from_config(config, num_classes=len(data.classes) + 1,
                                    image_side=max(info["height"], info["width"]), warm_start=warm_start)

    def step(self, model, batch, config, *, device, amp) -> Step:
        images = [im.to(device, non_blocking=True) for im in batch[0]]
        targets = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
                   for t in batch[1]]
        with autocast(device, amp):
            out = model(images, targets)
        loss, terms = loss_terms(out, config.tau if config.mode != "vanilla" else 0.0)
        return Step(loss, out, (images, targets), terms)

    def train_logs(self, step: Step) -> dict[str, Tensor]:
        return {**step.terms, "backbone_flops": step.out.backbone_flops.float().mean()}

    def images(self, step: Step) -> dict[str, np.ndarray]:
        from ..viz import overlay_grid

        images = step.inputs[0]
        same = [i for i, im in enumerate(images) if im.shape == images[0].shape][:4]  # one row width
        sizes = [tuple(im.shape[-2:]) for im in images]
        pictures = {}
        for name, field in (("ponder_maps", "ponder_map"), ("num_units_maps", "num_units")):
            maps = image_maps(step.out, sizes, field=field)
            pictures[name] = overlay_grid([images[i].float() for i in same], [maps[i] for i in same])
        return pictures

    def evaluate(self, model, loader, *, config, data, device, amp, info, progress: bool) -> dict:
        from .evaluate import evaluate

        metrics, _ = evaluate(model, loader, data.eval, device=device, progress=progress, amp_dtype=amp)
        return metrics

    def meta(self, data) -> dict:
        return {"label_to_category": {str(k): v for k, v in data.eval.label_to_category.items()}}

