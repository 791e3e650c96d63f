"""Any registered adaptive ResNet as a torchvision detection backbone (with an FPN).

:class:`SACTBackbone` wraps a model built by :func:`sact.create_model` (vanilla, ACT or
SACT; ``*_cifar`` or ImageNet ResNets). It runs the stem and the stages up to the last
requested one, feeds the requested stages' features to a
:class:`torchvision.ops.FeaturePyramidNetwork` and returns

* ``forward(x)`` -> ``OrderedDict`` of named FPN maps (torchvision's backbone protocol,
  so it also plugs into a plain :class:`torchvision.models.detection.FasterRCNN`);
* ``forward_with_ponder(x)`` -> :class:`BackboneOutput`: the same maps plus the per-stage
  :class:`~sact.stage.StageOutput` (ponder maps), the differentiable ponder cost and the
  per-image backbone FLOPs, returned explicitly (no state kept on the module).

Freezing follows ``torchvision.models.detection.backbone_utils``: ``frozen_bn`` swaps every
``BatchNorm2d`` (halting-branch BNs included, see :func:`freeze_batchnorm`) for
:class:`torchvision.ops.FrozenBatchNorm2d`; ``trainable_layers`` counts stages from the
last one backwards, the stem being the last to unfreeze.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from ..models.base import AdaptiveResNet, stage_feature_info
from ..stage import StageOutput

__all__ = ["BackboneOutput", "SACTBackbone", "freeze_batchnorm", "load_backbone_weights", "stem_modules"]


@dataclass
class BackboneOutput:
    """What :meth:`SACTBackbone.forward_with_ponder` returns.

    Attributes:
        features: FPN maps by name (the stage names, then ``"pool"``), each
            ``[B, out_channels, H_l, W_l]``.
        stages: one :class:`StageOutput` per stage that ran (ponder maps ``[B, h, w]``).
        ponder_cost: ``[B]`` sum over the stages that ran of the mean ponder map
            (differentiable; vanilla: the constant unit count).
        flops: ``[B]`` FLOPs of the stem and the stages that ran, per image (FPN not included).
    """

    features: "OrderedDict[str, Tensor]"
    stages: list[StageOutput]
    ponder_cost: Tensor
    flops: Tensor


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` in ``module`` (in place) by ``FrozenBatchNorm2d``.

    The frozen copy keeps the affine parameters and running statistics as buffers, so
    they no longer train or update. This includes the BNs of the halting branches: a
    detection batch holds 2-16 images, too few for batch statistics in the global
    halting branch (one pooled vector per image), and after a torchvision warm start a
    fresh halting BN is the identity, so the branch's convolutions still learn.

    Returns:
        ``module`` itself (or the frozen copy, if ``module`` is a BN).
    """
    from torchvision.ops import FrozenBatchNorm2d

    def frozen(bn: nn.BatchNorm2d) -> FrozenBatchNorm2d:
        new = FrozenBatchNorm2d(bn.num_features, eps=bn.eps)
        with torch.no_grad():
            if bn.affine:
                new.weight.copy_(bn.weight)
                new.bias.copy_(bn.bias)
            if bn.track_running_stats:
                new.running_mean.copy_(bn.running_mean)
                new.running_var.copy_(bn.running_var)
        return new.to(bn.weight.device if bn.affine else bn.running_mean.device)

    if isinstance(module, nn.BatchNorm2d):
        return frozen(module)
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, frozen(child))
        else:
            freeze_batchnorm(child)
    return module


def stem_modules(model: AdaptiveResNet) -> list[nn.Module]:
    """The modules ``forward_stem`` uses: ``conv1, bn1`` (ImageNet) or ``stem`` (CIFAR)."""
    names = [n for n in ("conv1", "bn1", "stem") if isinstance(getattr(model, n, None), nn.Module)]
    if not names:
        raise ValueError(f"cannot find the stem of {type(model).__name__} (no conv1/bn1/stem)")
    return [getattr(model, n) for n in names]


def _stage_strides(model: AdaptiveResNet) -> dict[str, int]:
    """Stage name -> stride of its output relative to the input (``model.feature_info``, no forward pass)."""
    return {d["module"]: d["reduction"] for d in stage_feature_info(model)}


def load_backbone_weights(model: AdaptiveResNet, path: str | Path) -> AdaptiveResNet:
    """Warm-start a detection backbone's model: :func:`sact.engine.warm_start` with the
    detection options (a classifier of another size skipped, an RGB stem summed for
    ``in_chans=1``).

    Args:
        model: the backbone's model, *before* :class:`SACTBackbone` freezes its BNs.
        path: a torchvision state dict (``.pth`` / ``.pt``) or an sact checkpoint of the
            same architecture in any mode.

    Raises:
        sact.CheckpointError: unreadable file, or tensors that do not fit (a ``ValueError``).
    """
    from ..engine.warm_start import warm_start

    warm_start(model, path, skip_classifier=True, sum_rgb_stem=True)
    return model


class SACTBackbone(nn.Module):
    """An adaptive ResNet body plus an FPN, as a torchvision detection backbone.

    The model is taken over and modified in place (frozen BNs, ``requires_grad``); its
    classification head stays in the state dict but never runs and is frozen, and so
    are stages after the last returned one (they do not run either).

    Args:
        model: a model from :func:`sact.create_model` (any mode).
        return_stages: stage names whose outputs feed the FPN; default: every stage of
            stride >= 2 (ImageNet: ``layer1..layer4``; CIFAR: ``layer2, layer3``).
        trainable_layers: how many stages stay trainable, counted from the last
            returned stage backwards; ``num_stages + 1`` also trains the stem.
            Default (None): everything trains.
        frozen_bn: replace every BatchNorm2d by FrozenBatchNorm2d (torchvision's default
            for detection; see :func:`freeze_batchnorm`). Turn it off to train a
            backbone from scratch, where BNs need batch statistics.
        frozen_stem: freeze the stem; default (None): frozen unless ``trainable_layers``
            covers it.
        train_halting: keep halting branches trainable even inside frozen stages (they
            are fresh after a torchvision warm start).
        out_channels: FPN channels.
        extra_pool: add a ``"pool"`` level (max-pool of the coarsest map, torchvision's
            ``LastLevelMaxPool``).

    Attributes:
        body: the wrapped model. ``fpn``: the pyramid. ``out_channels``: FPN channels
        (what torchvision's detectors read). ``feature_names``: names of the maps
        returned, in order (for ``MultiScaleRoIAlign``). ``strides``: stage name ->
        stride relative to the input.
    """

    def __init__(
        self,
        model: AdaptiveResNet,
        *,
        return_stages: Sequence[str] | None = None,
        trainable_layers: int | None = None,
        frozen_bn: bool = True,
        frozen_stem: bool | None = None,
        train_halting: bool = True,
        out_channels: int = 256,
        extra_pool: bool = True,
    ) -> None:
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

        if not isinstance(model, AdaptiveResNet):
            raise ValueError(f"model must be an sact AdaptiveResNet (from sact.create_model), got {type(model).__name__}")
        names = list(model.stage_names)
        strides = _stage_strides(model)
        if return_stages is None:
            # a stride-1 level (CIFAR layer1) runs the FPN and RPN at full input resolution
            # for little gain on objects of 16+ pixels; torchvision's ResNets start at stride 4
            return_stages = [n for n in names if strides[n] >= 2]
        return_stages = list(return_stages)
        if not return_stages or any(s not in names for s in return_stages) or len(set(return_stages)) != len(return_stages):
            raise ValueError(f"return_stages must be distinct names among {names}, got {return_stages}")
        return_stages.sort(key=names.index)
        num_stages = names.index(return_stages[-1]) + 1  # stages that run
        if trainable_layers is None:
            trainable_layers = num_stages + 1
        if not 0 <= trainable_layers <= num_stages + 1:
            raise ValueError(f"trainable_layers must be in [0, {num_stages + 1}], got {trainable_layers}")
        if out_channels < 1:
            raise ValueError(f"out_channels must be positive, got {out_channels}")
        if frozen_stem is None:
            frozen_stem = trainable_layers <= num_stages

        self.body = model
        self.return_stages = tuple(return_stages)
        self.num_run = num_stages
        self.frozen_bn = frozen_bn
        self.in_chans = model.in_chans
        if frozen_bn:
            freeze_batchnorm(model)
        # Freeze: everything, then unfreeze the last `trainable_layers` running stages (+ stem).
        model.requires_grad_(False)
        running = model.stages[:num_stages]
        for stage in running[num_stages - min(trainable_layers, num_stages):]:
            stage.requires_grad_(True)
        if not frozen_stem:
            for m in stem_modules(model):
                m.requires_grad_(True)
        if train_halting:
            for stage in running:
                if stage.halting is not None:
                    stage.halting.requires_grad_(True)

        channels = [model.stages[names.index(n)].units[-1].out_channels for n in self.return_stages]
        self.strides = strides
        self.fpn = FeaturePyramidNetwork(channels, out_channels, extra_blocks=LastLevelMaxPool() if extra_pool else None)
        self.out_channels = out_channels
        self.feature_names = self.return_stages + (("pool",) if extra_pool else ())

    def forward_with_ponder(self, x: Tensor, *, executors: Sequence | None = None) -> BackboneOutput:
        """Run stem, stages and FPN.

        Args:
            x: ``[B, C_in, H, W]`` normalised (padded) images.
            executors: per running stage, where its steps run (``None``: the dense
                reference; :func:`sact.detection.sparse_detector` passes the sparse engine's).

        Returns:
            :class:`BackboneOutput` with FPN maps named :attr:`feature_names`.
        """
        feats = self.body.forward_features(x, executors=executors, num_stages=self.num_run)
        names = self.body.stage_names
        picked = OrderedDict((names[i], f) for i, f in enumerate(feats.features) if names[i] in self.return_stages)
        features = self.fpn(picked)  # names kept; "pool" appended by LastLevelMaxPool
        ponder = sum(s.ponder_cost for s in feats.stages)
        return BackboneOutput(features=features, stages=feats.stages, ponder_cost=ponder, flops=feats.flops)

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        """torchvision protocol: ``[B, C_in, H, W]`` -> named FPN maps ``[B, out_channels, h, w]``."""
        return self.forward_with_ponder(x).features
