"""FLOP convention and per-image counting from real masks.

Convention (reference ``flopsometer.py``, section 6 of the spec): only convolutions and
linear layers are counted, as **2 x multiply-adds**:
``flops = 2 * positions * k_h * k_w * (C_in / groups) * C_out`` per image.
Biases, batch norm, activations, pooling, global means, additions, mask multiplications
and the halting sigmoid are not counted. ``positions`` is the number of output positions,
or, for a masked convolution, the number of positions where the mask is non-zero.

Masked residual units count their first convolution over the 3x3-dilated mask
(:func:`dilate_mask`; its outputs feed a 3x3 convolution) and the rest over the mask.
These are exactly the positions the sparse engine computes.

This convention equals :class:`torch.utils.flop_counter.FlopCounterMode` on dense models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["conv_flops", "linear_flops", "dilate_mask", "mask_positions", "output_positions", "masked_flops", "count_model_flops"]


def _macs_per_position(conv: nn.Conv2d) -> int:
    kh, kw = conv.kernel_size
    return kh * kw * (conv.in_channels // conv.groups) * conv.out_channels


def conv_flops(conv: nn.Conv2d, positions: Tensor | int) -> Tensor | int:
    """FLOPs of ``conv`` evaluated at ``positions`` output positions (per image).

    Args:
        conv: the convolution.
        positions: number of output positions, an int or a ``[B]`` tensor.
    """
    return 2 * _macs_per_position(conv) * positions


def linear_flops(linear: nn.Linear) -> int:
    """FLOPs of one application of ``linear`` (per image)."""
    return 2 * linear.in_features * linear.out_features


def dilate_mask(mask: Tensor, kernel_size: int = 3) -> Tensor:
    """Positions needed to evaluate a ``k x k`` stride-1 convolution on ``mask``'s positions.

    Args:
        mask: ``[B, 1, H, W]`` (0/1 or bool).
        kernel_size: odd kernel size of the convolution that reads the result.

    Returns:
        ``[B, 1, H, W]`` mask of the same dtype: max-pool with stride 1 and SAME padding.
    """
    if mask.dim() != 4:
        raise ValueError(f"mask must be [B, 1, H, W], got shape {tuple(mask.shape)}")
    pad = kernel_size // 2
    dtype = mask.dtype
    m = mask.float() if dtype == torch.bool else mask
    out = F.max_pool2d(m, kernel_size, stride=1, padding=pad)
    return out.bool() if dtype == torch.bool else out


def mask_positions(mask: Tensor | None, batch: int, height: int, width: int, device=None) -> Tensor:
    """``[B]`` number of active positions; a ``None`` mask means every position is active."""
    if mask is None:
        return torch.full((batch,), height * width, dtype=torch.long, device=device)
    return (mask != 0).flatten(1).sum(1)


def output_positions(x: Tensor, mask: Tensor | None, stride: int = 1) -> Tensor:
    """``[B]`` active positions of a unit's output: ``mask`` (on the output grid), or every
    position of ``x [B, C, H, W]``'s grid after ``stride`` (``ceil(H / stride) x ceil(W / stride)``)."""
    b, _, h, w = x.shape
    return mask_positions(mask, b, -(-h // stride), -(-w // stride), device=x.device)


def masked_flops(rates: tuple[int, int, int], mask: Tensor) -> Tensor:
    """``[B]`` FLOPs of a stride-1 unit run under ``mask`` from its ``masked_flop_rates()``.

    Args:
        rates: ``(per dilated position, per active position, per position of the map)``:
            the unit's first convolution runs on the 3x3-dilated mask, the rest on the mask,
            and parts that ignore the mask (a projection shortcut) everywhere.
        mask: ``[B, 1, H, W]`` 0/1 (or bool).
    """
    per_dilated, per_active, everywhere = rates
    b, _, h, w = mask.shape
    total = per_active * mask_positions(mask, b, h, w)
    if per_dilated:
        total = total + per_dilated * mask_positions(dilate_mask(mask), b, h, w)
    return total + everywhere * h * w


def count_model_flops(model: nn.Module, x: Tensor) -> int:
    """Total FLOPs of one forward pass as measured by ``FlopCounterMode`` (sum over the batch).

    Used to check the analytic per-image counts of dense models.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())
