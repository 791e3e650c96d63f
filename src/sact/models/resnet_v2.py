"""The reference's ImageNet pre-activation ResNet-v2 (``imagenet_model.py``), in vanilla / ACT / SACT mode.

This is the network the authors' released ImageNet checkpoints were trained with, so
:mod:`sact.tools.convert_tf` can load them. It differs from the torchvision-style
:class:`~sact.models.ResNet` (see ``docs/reference_models.md``):

* pre-activation bottlenecks (:class:`PreActBottleneck`): ``BN -> ReLU`` *before* each
  unit, no BN after the last 1x1 convolution (which has a bias), projection shortcuts
  are a 1x1 convolution with bias and no BN applied to the pre-activated input;
* stride in the first unit of stages 2-4, inside its 3x3 convolution (like
  torchvision, unlike TF-Slim's ``resnet_v2`` which strides in the last unit);
* stem = 7x7/2 convolution (64 channels, with bias, no BN / ReLU) and a 3x3/2 max-pool
  with TF "SAME" padding (0 before, 1 after on even sizes); the final ``postnorm``
  BN + ReLU before the global pool; 1001 classes (index 0 = background);
* BN momentum 0.003 (TF decay 0.997), eps 1e-5; halting-branch BNs have no activation;
* TF-Slim initialisation (truncated normal, std ``sqrt(1.3 * 2 / fan_in)``, zero biases).

Parameter names follow the TF variable scopes (``conv1``, ``block1..4``, ``preact``,
``shortcut``, ``conv1``/``conv1_bn``, ..., ``postnorm``, ``logits``) so the mapping
``resnet_v2/block2/unit_3/bottleneck_v2/conv2/BatchNorm/gamma`` ->
``block2.2.conv2_bn.weight`` is mechanical.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..flops import conv_flops, masked_flops, output_positions
from ..halting import make_halting
from ..stage import AdaptiveStage
from ..units import Conv2dSame, NormFactory, masked_add
from .base import AdaptiveResNet, make_classifier

__all__ = ["PreActBottleneck", "ResNetV2", "MaxPool2dSame", "BN_MOMENTUM", "BN_EPS"]

BN_MOMENTUM = 0.003  # TF-Slim resnet_arg_scope batch_norm_decay 0.997
BN_EPS = 1e-5


class MaxPool2dSame(nn.Module):
    """Max-pool with TensorFlow ``padding='SAME'`` (padded positions never win).

    Args:
        kernel_size: window size.
        stride: stride.
    """

    def __init__(self, kernel_size: int = 3, stride: int = 2) -> None:
        super().__init__()
        if kernel_size < 1 or stride < 1:
            raise ValueError(f"kernel_size and stride must be positive, got {kernel_size}, {stride}")
        self.kernel_size = kernel_size
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, H, W]`` -> ``[B, C, ceil(H/s), ceil(W/s)]``."""
        ph = Conv2dSame._pad(x.shape[-2], self.kernel_size, self.stride, 1)
        pw = Conv2dSame._pad(x.shape[-1], self.kernel_size, self.stride, 1)
        # TF SAME pads asymmetrically (extra on the bottom/right); -inf never wins the max.
        x = F.pad(x, (pw[0], pw[1], ph[0], ph[1]), value=float("-inf"))
        return F.max_pool2d(x, self.kernel_size, self.stride)


class PreActBottleneck(nn.Module):
    """The reference's pre-activation bottleneck (``imagenet_model.bottleneck``).

    ``preact = relu(preact_bn(x))``; ``shortcut = x[::s, ::s]`` if the depth is unchanged,
    else ``shortcut_conv(preact)`` (1x1, stride ``s``, bias, no BN);
    ``r = conv3(relu(conv2_bn(conv2(relu(conv1_bn(conv1(preact)))))))`` with ``conv2``
    3x3 stride ``s`` (TF ``conv2d_same``: symmetric padding 1) and ``conv3`` with bias;
    ``y = shortcut + mask * r``.

    Args:
        in_channels: input channels.
        depth: output channels (4x ``depth_bottleneck`` in the standard networks).
        depth_bottleneck: channels of the inner convolutions.
        stride: stride of ``conv2`` and of the shortcut.
        norm_layer: BN factory (momentum 0.003, eps 1e-5 for the reference).
    """

    def __init__(
        self,
        in_channels: int,
        depth: int,
        depth_bottleneck: int,
        *,
        stride: int = 1,
        norm_layer: NormFactory = partial(nn.BatchNorm2d, eps=BN_EPS, momentum=BN_MOMENTUM),
    ) -> None:
        super().__init__()
        if min(in_channels, depth, depth_bottleneck) < 1 or stride < 1:
            raise ValueError(
                f"channels and stride must be positive, got in_channels={in_channels}, depth={depth}, "
                f"depth_bottleneck={depth_bottleneck}, stride={stride}"
            )
        self.in_channels = in_channels
        self.out_channels = depth
        self.stride = stride
        self.preact = norm_layer(in_channels)
        self.relu = nn.ReLU()
        # Reference: a projection only when the depth changes; a strided unit with the
        # same depth subsamples its input (TF-Slim resnet_utils.subsample).
        self.shortcut = nn.Conv2d(in_channels, depth, 1, stride=stride, bias=True) if depth != in_channels else None
        self.conv1 = nn.Conv2d(in_channels, depth_bottleneck, 1, bias=False)
        self.conv1_bn = norm_layer(depth_bottleneck)
        # conv2d_same: stride 1 -> TF SAME (= pad 1); stride s -> explicit pad 1/1 then VALID.
        self.conv2 = nn.Conv2d(depth_bottleneck, depth_bottleneck, 3, stride=stride, padding=1, bias=False)
        self.conv2_bn = norm_layer(depth_bottleneck)
        self.conv3 = nn.Conv2d(depth_bottleneck, depth, 1, bias=True)

    def residual(self, preact: Tensor) -> Tensor:
        """``F`` on the pre-activated input: ``[B, C_in, H, W]`` -> ``[B, depth, H/s, W/s]``."""
        r = self.relu(self.conv1_bn(self.conv1(preact)))
        r = self.relu(self.conv2_bn(self.conv2(r)))
        return self.conv3(r)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``x`` ``[B, C_in, H, W]``, ``mask`` ``[B, 1, H, W]`` or None -> ``[B, depth, H/s, W/s]``."""
        preact = self.relu(self.preact(x))
        if self.shortcut is not None:
            shortcut = self.shortcut(preact)
        else:
            shortcut = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
        return masked_add(shortcut, self.residual(preact), mask)

    def flops(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``[B]`` FLOPs (2 x MACs): ``conv1`` over the 3x3-dilated mask, ``conv2``/``conv3``
        over the mask, the projection shortcut (if any) everywhere."""
        n_out = output_positions(x, None, self.stride)
        total = conv_flops(self.shortcut, n_out) if self.shortcut is not None else 0
        if mask is None:
            n_in = output_positions(x, None)
            return total + conv_flops(self.conv1, n_in) + conv_flops(self.conv2, n_out) + conv_flops(self.conv3, n_out)
        if self.stride != 1:
            raise ValueError("a masked unit must have stride 1")
        return masked_flops(self.masked_flop_rates(), mask)

    def masked_flop_rates(self) -> tuple[int, int, int]:
        """FLOPs under a mask (stride 1): per dilated position (``conv1``), per active
        position (``conv2``, ``conv3``), per position of the map (the projection shortcut,
        if any, ignores the mask)."""
        if self.stride != 1:
            raise ValueError("a masked unit must have stride 1")
        everywhere = conv_flops(self.shortcut, 1) if self.shortcut is not None else 0
        return conv_flops(self.conv1, 1), conv_flops(self.conv2, 1) + conv_flops(self.conv3, 1), everywhere


def _slim_init_(w: Tensor) -> None:
    # TF-Slim variance_scaling_initializer(): truncated normal, std sqrt(1.3 * 2 / fan_in).
    std = (1.3 * 2.0 / w[0].numel()) ** 0.5
    nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)


class ResNetV2(AdaptiveResNet):
    """Reference ImageNet pre-activation ResNet-v2 with adaptive stages.

    Args:
        layers: units per stage, e.g. ``(3, 4, 23, 3)`` for ResNet-101.
        mode: ``"vanilla"``, ``"act"`` or ``"sact"``.
        num_classes: classifier size (1001: the reference's background class + 1000; 0: none).
        in_chans: input channels.
        base_width: bottleneck channels of the first stage (64); stage ``i`` has
            ``base_width * 2**i`` inner and 4x that output channels.
        stem_width: output channels of the stem convolution; the reference fixes it to
            64 whatever ``base_width`` is.
        eps: halting threshold ``1 - eps``.
    """

    stage_names = ("block1", "block2", "block3", "block4")
    classifier_name = "logits"
    stem_stride = 4
    default_input_size = 224

    def __init__(
        self,
        *,
        layers: tuple[int, ...] = (3, 4, 23, 3),
        mode: str = "sact",
        num_classes: int = 1001,
        in_chans: int = 3,
        base_width: int = 64,
        stem_width: int = 64,
        eps: float = 0.01,
    ) -> None:
        super().__init__()
        if len(layers) != 4 or any(int(n) < 1 for n in layers):
            raise ValueError(f"layers must be 4 positive unit counts, got {layers}")
        if num_classes < 0 or min(in_chans, base_width, stem_width) < 1:
            raise ValueError(
                f"num_classes must be >= 0 and in_chans, base_width, stem_width positive, got {num_classes}, "
                f"{in_chans}, {base_width}, {stem_width}"
            )
        self.mode = mode
        self.in_chans = in_chans
        self.num_classes = num_classes
        norm = partial(nn.BatchNorm2d, eps=BN_EPS, momentum=BN_MOMENTUM)
        # conv2d_same 7x7/2: explicit pad 3/3 then VALID == PyTorch padding=3.
        self.conv1 = nn.Conv2d(in_chans, stem_width, 7, stride=2, padding=3, bias=True)
        self.pool1 = MaxPool2dSame(3, 2)
        in_ch = stem_width
        for i, n in enumerate(layers):
            width = base_width * 2**i
            units = []
            for u in range(int(n)):
                stride = 2 if (i > 0 and u == 0) else 1
                units.append(PreActBottleneck(in_ch, 4 * width, width, stride=stride, norm_layer=norm))
                in_ch = 4 * width
            stage = AdaptiveStage(units, mode=mode, halting_factory=lambda m, c: make_halting(m, c, norm_layer=norm), eps=eps)
            setattr(self, self.stage_names[i], stage)
        self.num_features = in_ch
        self.postnorm = norm(in_ch)
        self.relu = nn.ReLU()
        self.logits = make_classifier(in_ch, num_classes)  # the reference's 1x1 conv on the pooled features
        for name, m in self.named_modules():
            if ".halting." in f".{name}.":
                continue  # halting branches keep their own initialisation (bias -3)
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                _slim_init_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward_stem(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``[B, C_in, H, W]`` -> (``[B, 64, H/4, W/4]``, FLOPs ``[B]``); no BN / ReLU in the stem."""
        if x.shape[1] != self.in_chans:
            raise ValueError(f"expected {self.in_chans} input channels, got shape {tuple(x.shape)}")
        y = self.conv1(x)
        flops = conv_flops(self.conv1, torch.full((x.shape[0],), y.shape[-2] * y.shape[-1], device=x.device))
        return self.pool1(y), flops

    def forward_pre_logits(self, x: Tensor) -> Tensor:
        """``[B, C, H, W]`` -> ``[B, C]``: postnorm BN + ReLU, then the global mean."""
        return self.relu(self.postnorm(x)).mean(dim=(2, 3))

    def default_preprocess(self):
        """The reference's Inception evaluation (:func:`sact.data.imagenet_preprocess`), what its weights expect."""
        from ..data.transforms import Preprocess, imagenet_preprocess

        pre = imagenet_preprocess(self.default_input_size)
        return pre if self.in_chans == 3 else (Preprocess(**{**pre.to_dict(), "in_chans": 1}) if self.in_chans == 1 else None)


def build_resnet_v2(layers: tuple[int, int, int, int]):
    """Registry builder for :class:`ResNetV2` with ``layers`` units per stage."""

    def build(*, mode: str = "sact", num_classes: int = 1001, in_chans: int = 3, base_width: int = 64,
              stem_width: int = 64, eps: float = 0.01) -> ResNetV2:
        return ResNetV2(layers=layers, mode=mode, num_classes=num_classes, in_chans=in_chans, base_width=base_width,
                        stem_width=stem_width, eps=eps)

    return build


V2_LAYERS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
