"""Halting branches: the small heads that predict the halting probability ``h^n``.

Reference ``resnet_act.py`` (section 3 of the spec):

* :class:`ACTHalting` (per image): global average pool -> BN -> 1x1 conv ``C -> 1``
  (bias initialised to -3) -> sigmoid. Output ``[B]``.
* :class:`SACTHalting` (per position): a local term ``conv3x3(act(BN(x)))`` (one output
  channel, bias -3) plus a global term ``conv1x1(act(BN(mean_hw(x))))`` (no bias),
  summed and passed through a sigmoid. Output ``[B, H, W]``.

``act`` is the identity for ImageNet-style models and leaky ReLU (slope 0.1) for the
CIFAR models, as the reference's arg scopes make it.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import Tensor, nn

from .flops import conv_flops, mask_positions

__all__ = ["ACTHalting", "SACTHalting", "INIT_BIAS", "make_halting"]

INIT_BIAS = -3.0  # sigmoid(-3) = 0.047: units are rarely skipped at initialisation

NormFactory = Callable[[int], nn.Module]


def full_precision(x: Tensor, weight: Tensor) -> tuple[contextlib.AbstractContextManager, Tensor]:
    """``(context, x)`` for running a halting branch outside autocast in its weights' dtype.

    Under bfloat16 / float16 autocast the features arrive in low precision; the branch (about
    1-2% of the FLOPs) runs in its parameters' dtype (float32 unless the user cast the model),
    so the halting probabilities, and the recurrence after them, are not rounded to 8 bits.
    """
    try:
        ctx = torch.autocast(x.device.type, enabled=False)
    except RuntimeError:  # a device type without autocast
        ctx = contextlib.nullcontext()
    return ctx, (x if x.dtype == weight.dtype else x.to(weight.dtype))


def _conv1x1_on_pooled(conv: nn.Conv2d, g: Tensor) -> Tensor:
    """``conv(g)`` for a 1x1 convolution of pooled features ``g`` ``[B, C, 1, 1]``, as the
    matrix product it is (a convolution call costs 5x more here, forward and backward)."""
    import torch.nn.functional as F

    return F.linear(g.flatten(1), conv.weight.flatten(1), conv.bias).view(g.shape[0], -1, 1, 1)


def _init_conv(conv: nn.Conv2d) -> None:
    # TF-Slim variance_scaling_initializer(): truncated normal, std sqrt(1.3 * 2 / fan_in).
    fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] // conv.groups
    std = (1.3 * 2.0 / fan_in) ** 0.5
    nn.init.trunc_normal_(conv.weight, std=std, a=-2 * std, b=2 * std)


class ACTHalting(nn.Module):
    """Per-image halting branch (ACT).

    Args:
        channels: channels ``C`` of the unit output.
        norm_layer: BN factory ``C -> module`` (the model's BN settings).
        activation: module applied after BN (identity or leaky ReLU).
        init_bias: initial bias of the 1x1 convolution.
    """

    spatial = False

    def __init__(
        self,
        channels: int,
        *,
        norm_layer: NormFactory = nn.BatchNorm2d,
        activation: nn.Module | None = None,
        init_bias: float = INIT_BIAS,
    ) -> None:
        super().__init__()
        if channels <= 0:
            raise ValueError(f"channels must be positive, got {channels}")
        self.global_bn = norm_layer(channels)
        self.global_act = activation if activation is not None else nn.Identity()
        self.global_conv = nn.Conv2d(channels, 1, 1, bias=True)
        _init_conv(self.global_conv)
        nn.init.constant_(self.global_conv.bias, init_bias)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``[B, C, H, W]`` -> halting probability ``[B]`` (in the branch's weight dtype)."""
        ctx, x = full_precision(x, self.global_conv.weight)
        with ctx:
            g = x.mean(dim=(2, 3), keepdim=True)  # [B, C, 1, 1]
            logit = _conv1x1_on_pooled(self.global_conv, self.global_act(self.global_bn(g)))  # [B, 1, 1, 1]
            return torch.sigmoid(logit).flatten()

    def flops(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """``[B]`` FLOPs: the 1x1 conv, for images that still run this unit."""
        b = x.shape[0]
        active = torch.ones(b, dtype=torch.long, device=x.device) if mask is None else (mask.flatten(1) != 0).any(1).long()
        return self.flop_rates()[1] * active

    def flop_rates(self) -> tuple[int, int]:
        """``(per active position, per image)`` FLOPs: the 1x1 conv once per running image."""
        return 0, conv_flops(self.global_conv, 1)


class SACTHalting(nn.Module):
    """Per-position halting branch (SACT).

    Args:
        channels: channels ``C`` of the unit output.
        norm_layer: BN factory ``C -> module``.
        activation: module applied after both BNs (identity or leaky ReLU); a fresh copy
            is not needed since activations here are stateless.
        init_bias: initial bias of the local 3x3 convolution.
        kernel_size: size of the local convolution (reference: 3).
    """

    spatial = True

    def __init__(
        self,
        channels: int,
        *,
        norm_layer: NormFactory = nn.BatchNorm2d,
        activation: nn.Module | None = None,
        init_bias: float = INIT_BIAS,
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        if channels <= 0:
            raise ValueError(f"channels must be positive, got {channels}")
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        act = activation if activation is not None else nn.Identity()
        self.local_bn = norm_layer(channels)
        self.local_act = act
        self.local_conv = nn.Conv2d(channels, 1, kernel_size, padding=kernel_size // 2, bias=True)
        self.global_bn = norm_layer(channels)
        self.global_act = act
        self.global_conv = nn.Conv2d(channels, 1, 1, bias=False)
        _init_conv(self.local_conv)
        _init_conv(self.global_conv)
        nn.init.constant_(self.local_conv.bias, init_bias)

    def logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(local [B, 1, H, W], global [B, 1, 1, 1])`` halting logits (outside autocast, in
        the branch's weight dtype)."""
        ctx, x = full_precision(x, self.local_conv.weight)
        with ctx:
            local = self.local_conv(self.local_act(self.local_bn(x)))
            g = x.mean(dim=(2, 3), keepdim=True)  # raw features, not the BN'd ones
            glob = _conv1x1_on_pooled(self.global_conv, self.global_act(self.global_bn(g)))
            return local, glob

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``[B, C, H, W]`` -> halting probability ``[B, H, W]``."""
        local, glob = self.logits(x)
        return torch.sigmoid(local + glob)[:, 0]

    def flops(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """``[B]`` FLOPs: local conv over the active positions, global 1x1 conv always."""
        b, _, h, w = x.shape
        per_position, per_image = self.flop_rates()
        return per_position * mask_positions(mask, b, h, w, device=x.device) + per_image

    def flop_rates(self) -> tuple[int, int]:
        """``(per active position, per image)`` FLOPs: the local conv where the branch is
        evaluated, the global 1x1 conv once per image (always, as the reference counts it)."""
        return conv_flops(self.local_conv, 1), conv_flops(self.global_conv, 1)


def make_halting(mode: str, channels: int, **kwargs) -> nn.Module:
    """Halting branch for ``mode`` ('act' or 'sact')."""
    if mode == "act":
        return ACTHalting(channels, **kwargs)
    if mode == "sact":
        return SACTHalting(channels, **kwargs)
    raise ValueError(f"halting branches exist for modes 'act' and 'sact', got {mode!r}")
