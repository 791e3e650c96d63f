"""Residual units and the small protocol an adaptive stage needs from them.

The unit protocol (any ``nn.Module`` that has these works in an
:class:`~sact.stage.AdaptiveStage`; see ``docs/custom_units.md``):

``out_channels: int``
    channels of the unit's output.
``forward(x, mask=None) -> Tensor``
    ``x`` ``[B, C_in, H, W]``. ``mask`` is ``None`` (update every position) or a
    ``[B, 1, H, W]`` 0/1 tensor of ``x``'s dtype; where it is 0 the output must equal
    ``x`` exactly (the position has halted and keeps its features). Units that receive a
    mask are never strided and keep the channel count. The usual way is
    ``x + mask * F(x)`` (pre-activation) or ``relu(x + mask * F(x))`` for post-activation
    units whose input is already non-negative.
``flops(x, mask=None) -> Tensor``
    ``[B]`` FLOPs of the unit for input ``x`` under ``mask`` (convention of
    :mod:`sact.flops`: the first convolution over the 3x3-dilated mask when it feeds a
    3x3 convolution, the rest over the mask).

Units defined here:

* :class:`Bottleneck` -- torchvision's ResNet-v1.5 bottleneck with its parameter names
  (``conv1, bn1, conv2, bn2, conv3, bn3, downsample``), so torchvision checkpoints load.
* :class:`PreActBasicUnit` -- the reference's CIFAR pre-activation basic unit
  (``cifar_model.residual``): leaky ReLU, option-A shortcut, TF "SAME" stride-2 padding.
"""

from __future__ import annotations

import math
from typing import Callable, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .flops import conv_flops, masked_flops, output_positions

__all__ = ["ResidualUnit", "Bottleneck", "PreActBasicUnit", "Conv2dSame", "apply_mask", "masked_add"]

NormFactory = Callable[[int], nn.Module]


@runtime_checkable
class ResidualUnit(Protocol):
    """What :class:`~sact.stage.AdaptiveStage` needs from a unit (see module docstring)."""

    out_channels: int

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor: ...

    def flops(self, x: Tensor, mask: Tensor | None = None) -> Tensor: ...


def apply_mask(residual: Tensor, mask: Tensor | None) -> Tensor:
    """``mask * residual`` (``mask`` ``[B, 1, H, W]`` broadcasts over channels); no-op for ``None``."""
    return residual if mask is None else residual * mask


def masked_add(x: Tensor, residual: Tensor, mask: Tensor | None) -> Tensor:
    """``x + mask * residual`` as one fused op (``mask`` ``[B, 1, H, W]`` 0/1, or ``None`` for all)."""
    return x + residual if mask is None else torch.addcmul(x, residual, mask)


class Conv2dSame(nn.Conv2d):
    """Convolution with TensorFlow's ``padding='SAME'``.

    For stride 1 and odd kernels this equals symmetric padding ``k // 2``; for stride 2 on
    an even input TF pads 0 before and 1 after, unlike PyTorch's ``padding=k//2``.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs["padding"] = 0
        super().__init__(*args, **kwargs)

    @staticmethod
    def _pad(size: int, k: int, s: int, d: int) -> tuple[int, int]:
        out = math.ceil(size / s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        return total // 2, total - total // 2

    def forward(self, x: Tensor) -> Tensor:
        ph = self._pad(x.shape[-2], self.kernel_size[0], self.stride[0], self.dilation[0])
        pw = self._pad(x.shape[-1], self.kernel_size[1], self.stride[1], self.dilation[1])
        if any(ph) or any(pw):
            x = F.pad(x, (pw[0], pw[1], ph[0], ph[1]))
        return super().forward(x)


class Bottleneck(nn.Module):
    """torchvision ResNet-v1.5 bottleneck (stride in the 3x3 conv), post-activation.

    ``y = relu(shortcut(x) + mask * bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))))``.

    Args:
        in_channels: input channels.
        width: channels of the inner 3x3 convolution.
        stride: stride of the 3x3 convolution (and of the projection shortcut).
        downsample: ``True`` to use a 1x1 projection shortcut (``downsample.0/1``).
        norm_layer: BN factory.
    """

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        width: int,
        *,
        stride: int = 1,
        downsample: bool = False,
        norm_layer: NormFactory = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        out_channels = width * self.expansion
        if not downsample and (stride != 1 or in_channels != out_channels):
            raise ValueError(
                f"an identity shortcut needs stride 1 and in_channels == out_channels, got "
                f"stride={stride}, in_channels={in_channels}, out_channels={out_channels}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = norm_layer(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = norm_layer(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = norm_layer(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (
            nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), norm_layer(out_channels))
            if downsample
            else None
        )

    def residual(self, x: Tensor) -> Tensor:
        """``F(x)`` ``[B, C_out, H/s, W/s]``: the residual branch, before masking."""
        r = self.relu(self.bn1(self.conv1(x)))
        r = self.relu(self.bn2(self.conv2(r)))
        return self.bn3(self.conv3(r))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return torch.relu(masked_add(shortcut, self.residual(x), mask))

    def flops(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if mask is None:
            n_in = output_positions(x, None)
            n_out = output_positions(x, None, self.stride)
            total = conv_flops(self.conv1, n_in) + (conv_flops(self.conv2, n_out) + conv_flops(self.conv3, n_out))
            if self.downsample is not None:
                total = total + conv_flops(self.downsample[0], n_out)
            return total
        if self.stride != 1:
            raise ValueError("a masked unit must have stride 1")
        return masked_flops(self.masked_flop_rates(), mask)

    def masked_flop_rates(self) -> tuple[int, int, int]:
        """FLOPs under a mask: per dilated position (``conv1``), per active position
        (``conv2``, ``conv3``), per position of the map (none)."""
        return conv_flops(self.conv1, 1), conv_flops(self.conv2, 1) + conv_flops(self.conv3, 1), 0


class PreActBasicUnit(nn.Module):
    """The reference's CIFAR unit (``cifar_model.residual``), pre-activation basic block.

    ``preact = lrelu(bn1(x))``; ``shortcut = preact if activate_before_residual else x``;
    ``r = conv2(lrelu2(bn2(conv1(preact))))`` (conv2 has a bias and no BN); if the depth
    changes, the shortcut is average-pooled by the stride and zero-padded in channels
    (option A, no parameters); ``y = shortcut + mask * r``.

    ``lrelu`` has slope 0.1; ``lrelu2`` has slope 0.01 because the reference's arg scope
    applies leaky ReLU both inside ``batch_norm`` and as the conv's activation
    (``lrelu(lrelu(z))``). ``conv1`` uses TF "SAME" padding (asymmetric when strided).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        stride: int = 1,
        activate_before_residual: bool = False,
        norm_layer: NormFactory = nn.BatchNorm2d,
        slope: float = 0.1,
    ) -> None:
        super().__init__()
        if out_channels < in_channels or (out_channels - in_channels) % 2:
            raise ValueError(
                f"option-A shortcuts need out_channels >= in_channels with an even difference, got "
                f"{in_channels} -> {out_channels}"
            )
        if in_channels == out_channels and stride != 1:
            raise ValueError("a strided unit must change the channel count (reference layout)")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        self.activate_before_residual = activate_before_residual
        self.bn1 = norm_layer(in_channels)
        self.act1 = nn.LeakyReLU(slope)
        self.conv1 = Conv2dSame(in_channels, out_channels, 3, stride=stride, bias=False)
        self.bn2 = norm_layer(out_channels)
        self.act2 = nn.LeakyReLU(slope * slope)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=True)

    def shortcut(self, x: Tensor, preact: Tensor) -> Tensor:
        s = preact if self.activate_before_residual else x
        if self.in_channels != self.out_channels:
            # ceil_mode: odd sizes give the same output size as the TF-SAME conv1 (even sizes: VALID).
            s = F.avg_pool2d(s, self.stride, self.stride, ceil_mode=True) if self.stride > 1 else s
            pad = (self.out_channels - self.in_channels) // 2
            s = F.pad(s, (0, 0, 0, 0, pad, pad))
        return s

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        preact = self.act1(self.bn1(x))
        r = self.conv2(self.act2(self.bn2(self.conv1(preact))))
        return masked_add(self.shortcut(x, preact), r, mask)

    def flops(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if mask is None:
            n_out = output_positions(x, None, self.stride)
            return conv_flops(self.conv1, n_out) + conv_flops(self.conv2, n_out)
        if self.stride != 1:
            raise ValueError("a masked unit must have stride 1")
        return masked_flops(self.masked_flop_rates(), mask)

    def masked_flop_rates(self) -> tuple[int, int, int]:
        """FLOPs under a mask: per dilated position (``conv1``), per active position (``conv2``),
        per position of the map (none)."""
        return conv_flops(self.conv1, 1), conv_flops(self.conv2, 1), 0
