"""Typed model outputs and the ponder loss."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .stage import StageOutput

__all__ = ["ModelOutput", "FeaturesOutput", "ponder_loss", "compute_loss"]


@dataclass
class FeaturesOutput:
    """Output of ``model.forward_features``: the backbone part of a network.

    Attributes:
        features: per stage, ``[B, C_s, H_s, W_s]`` (the stage outputs, in order).
        stages: per stage, its :class:`~sact.stage.StageOutput`.
        flops: ``[B]`` FLOPs of the stem and all stages per image.
    """

    features: list[Tensor]
    stages: list[StageOutput]
    flops: Tensor


@dataclass
class ModelOutput:
    """Output of a classification model.

    Attributes:
        logits: ``[B, K]``.
        ponder_cost: ``[B]``, per image the sum over stages of the stage's mean ponder
            cost over positions (differentiable through the remainders).
        flops: ``[B]`` FLOPs this image needed (stem, units, halting branches, head).
        stages: one :class:`~sact.stage.StageOutput` per stage.
    """

    logits: Tensor
    ponder_cost: Tensor
    flops: Tensor
    stages: list[StageOutput] = field(default_factory=list)


def ponder_loss(output: ModelOutput, tau: float) -> Tensor:
    """``tau * mean over the batch of ponder_cost`` (reference ``add_all_ponder_costs``).

    Equals ``tau * sum_stages mean_{batch, H, W}(ponder_map)``, so the training loss is
    ``cross_entropy + ponder_loss(output, tau)`` exactly as in the reference.
    """
    if tau < 0:
        raise ValueError(f"tau must be non-negative, got {tau}")
    return tau * output.ponder_cost.mean()


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
