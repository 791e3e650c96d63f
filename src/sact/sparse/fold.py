"""Batch-norm folding for inference (exact up to float rounding in eval mode)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["foldable_bn", "bn_scale_shift", "fold_conv_bn", "conv_as_matrix"]


def foldable_bn(bn: nn.Module) -> bool:
    """True when ``bn`` is an affine map at inference: a ``BatchNorm2d`` with running
    statistics (used in eval mode), or torchvision's ``FrozenBatchNorm2d`` (detection backbones)."""
    if isinstance(bn, nn.BatchNorm2d):
        return bn.track_running_stats and bn.running_mean is not None
    return type(bn).__name__ == "FrozenBatchNorm2d" and all(
        isinstance(getattr(bn, k, None), Tensor) for k in ("weight", "bias", "running_mean", "running_var")
    )


def bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """``(s, t)`` ``[C]`` in float64 with ``bn(x) = s * x + t`` (eval mode)."""
    var = bn.running_var.double()
    s = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        s = s * bn.weight.double()
    t = -bn.running_mean.double() * s
    if bn.bias is not None:
        t = t + bn.bias.double()
    return s, t


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> tuple[Tensor, Tensor]:
    """Weight ``[O, I, kh, kw]`` and bias ``[O]`` of ``bn(conv(x))`` as one convolution (float64)."""
    w = conv.weight.detach().double()
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
    if bn is None:
        return w, b
    s, t = bn_scale_shift(bn)
    return w * s.view(-1, 1, 1, 1), b * s + t


def conv_as_matrix(weight: Tensor) -> Tensor:
    """``[O, I, kh, kw]`` -> ``(kh*kw*I, O)``, rows ordered ``(k, i)`` like a neighbour-row gather."""
    o, i, kh, kw = weight.shape
    return weight.permute(2, 3, 1, 0).reshape(kh * kw * i, o).contiguous()
