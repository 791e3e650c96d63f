"""ImageNet ResNets with torchvision's layout and parameter names, in vanilla / ACT / SACT mode.

``conv1, bn1, relu, maxpool, layer1..layer4, avgpool, fc`` as in
``torchvision.models.resnet``; bottleneck units ``layerX.N.{conv1..3, bn1..3, downsample}``
(ResNet-50/101/152), basic units ``layerX.N.{conv1, bn1, conv2, bn2, downsample}``
(:class:`BasicBlock`, ResNet-18/34). The halting branches are extra modules
``layerX.halting.N.*``, so a torchvision checkpoint loads with
:func:`load_torchvision_weights` and, in vanilla mode, the logits equal torchvision's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..flops import conv_flops, masked_flops, output_positions
from ..halting import make_halting
from ..stage import AdaptiveStage
from ..units import Bottleneck, NormFactory, masked_add
from .base import AdaptiveResNet, make_classifier

__all__ = ["ResNet", "BasicBlock", "BLOCKS", "load_torchvision_weights"]


class BasicBlock(nn.Module):
    """torchvision's ResNet-18/34 basic block with its parameter names, post-activation.

    ``y = relu(shortcut(x) + mask * bn2(conv2(relu(bn1(conv1(x))))))``, the stride in
    ``conv1`` (3x3) and in the projection shortcut ``downsample = (1x1 conv, BN)``. At a
    halted position (``mask == 0``) ``y = relu(x) = x``, because ``x`` is the output of a
    previous post-activation unit (non-negative).

    Args:
        in_channels: input channels.
        width: output channels (expansion 1).
        stride: stride of ``conv1`` (and of the projection shortcut).
        downsample: ``True`` to use a 1x1 projection shortcut (``downsample.0/1``).
        norm_layer: BN factory.
    """

    expansion = 1

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
        if min(in_channels, width, stride) < 1:
            raise ValueError(f"in_channels, width and stride must be positive, got {in_channels}, {width}, {stride}")
        if not downsample and (stride != 1 or in_channels != width):
            raise ValueError(
                f"an identity shortcut needs stride 1 and in_channels == width, got stride={stride}, "
                f"in_channels={in_channels}, width={width}"
            )
        self.in_channels = in_channels
        self.out_channels = width
        self.stride = stride
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = norm_layer(width)
        self.downsample = (
            nn.Sequential(nn.Conv2d(in_channels, width, 1, stride=stride, bias=False), norm_layer(width))
            if downsample
            else None
        )

    def residual(self, x: Tensor) -> Tensor:
        """``F(x)`` ``[B, C_out, H/s, W/s]``: the residual branch, before masking."""
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``x`` ``[B, C_in, H, W]``, ``mask`` ``[B, 1, H, W]`` or None -> ``[B, C_out, H/s, W/s]``."""
        shortcut = x if self.downsample is None else self.downsample(x)
        return torch.relu(masked_add(shortcut, self.residual(x), mask))

    def flops(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``[B]`` FLOPs: ``conv1`` over the 3x3-dilated mask (it feeds the 3x3 ``conv2``),
        ``conv2`` over the mask; unmasked: both convolutions and the projection everywhere."""
        if mask is None:
            b, _, h, w = x.shape
            n_out = output_positions(x, None, self.stride)
            total = conv_flops(self.conv1, n_out) + conv_flops(self.conv2, n_out)
            if self.downsample is not None:
                total = total + conv_flops(self.downsample[0], n_out)
            return total
        if self.stride != 1:
            raise ValueError("a masked unit must have stride 1")
        return masked_flops(self.masked_flop_rates(), mask)

    def masked_flop_rates(self) -> tuple[int, int, int]:
        """FLOPs under a mask: per dilated position (``conv1``), per active position (``conv2``),
        per position of the map (none)."""
        return conv_flops(self.conv1, 1), conv_flops(self.conv2, 1), 0


#: residual unit of each ``block`` choice of :class:`ResNet`
BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(AdaptiveResNet):
    """torchvision-compatible ResNet (basic or bottleneck units) with adaptive stages.

    Args:
        layers: units per stage, e.g. ``(3, 4, 6, 3)`` for ResNet-50 (and ResNet-34).
        block: ``"bottleneck"`` (ResNet-50/101/152) or ``"basic"`` (ResNet-18/34).
        mode: ``"vanilla"``, ``"act"`` or ``"sact"``.
        num_classes: size of the classifier (0: none, ``fc`` is ``nn.Identity``).
        in_chans: input channels.
        base_width: channels of the first stage's inner convolutions (64).
        eps: halting threshold ``1 - eps``.
        zero_init_residual: zero-initialise each unit's last BN gamma (torchvision option).
    """

    stage_names = ("layer1", "layer2", "layer3", "layer4")
    stem_stride = 4
    default_input_size = 224

    def __init__(
        self,
        *,
        layers: tuple[int, ...] = (3, 4, 6, 3),
        block: str = "bottleneck",
        mode: str = "sact",
        num_classes: int = 1000,
        in_chans: int = 3,
        base_width: int = 64,
        eps: float = 0.01,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if len(layers) != 4 or any(int(n) < 1 for n in layers):
            raise ValueError(f"layers must be 4 positive unit counts, got {layers}")
        if block not in BLOCKS:
            raise ValueError(f"block must be one of {sorted(BLOCKS)}, got {block!r}")
        if num_classes < 0 or in_chans < 1 or base_width < 1:
            raise ValueError(
                f"num_classes must be >= 0 and in_chans, base_width positive, got {num_classes}, {in_chans}, {base_width}"
            )
        unit_cls = BLOCKS[block]
        self.block = block
        self.mode = mode
        self.in_chans = in_chans
        self.num_classes = num_classes
        norm = nn.BatchNorm2d
        self.conv1 = nn.Conv2d(in_chans, base_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm(base_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_ch = base_width
        for i, n in enumerate(layers):
            width = base_width * 2**i
            stride = 1 if i == 0 else 2
            units = []
            for u in range(int(n)):
                s = stride if u == 0 else 1
                out_ch = width * unit_cls.expansion
                # torchvision: a projection shortcut where the shape changes (always in unit 0 of a bottleneck stage)
                units.append(unit_cls(in_ch, width, stride=s, downsample=(s != 1 or in_ch != out_ch), norm_layer=norm))
                in_ch = out_ch
            stage = AdaptiveStage(units, mode=mode, halting_factory=lambda m, c: make_halting(m, c, norm_layer=norm), eps=eps)
            setattr(self, self.stage_names[i], stage)
        self.num_features = in_ch
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = make_classifier(in_ch, num_classes)
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        # torchvision's initialisation; halting branches keep their own (bias -3).
        for name, m in self.named_modules():
            if ".halting." in f".{name}.":
                continue
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for stage in self.stages:
                for unit in stage.units:
                    nn.init.zeros_((unit.bn3 if isinstance(unit, Bottleneck) else unit.bn2).weight)

    def forward_stem(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``[B, C_in, H, W]`` -> (``[B, 64, H/4, W/4]``, FLOPs ``[B]``)."""
        if x.shape[1] != self.in_chans:
            raise ValueError(f"expected {self.in_chans} input channels, got shape {tuple(x.shape)}")
        y = self.relu(self.bn1(self.conv1(x)))
        flops = conv_flops(self.conv1, torch.full((x.shape[0],), y.shape[-2] * y.shape[-1], device=x.device))
        return self.maxpool(y), flops

    def forward_pre_logits(self, x: Tensor) -> Tensor:
        """``[B, C, H, W]`` -> ``[B, C]``: global average pool."""
        return torch.flatten(self.avgpool(x), 1)

    def default_preprocess(self):
        """torchvision's ImageNet recipe (:func:`sact.data.torchvision_preprocess`), what its weights expect.

        With ``in_chans=1`` the mean and std are the averages of the RGB ones (the stem's
        filters are summed over colours, see :func:`load_torchvision_weights`).
        """
        from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocess, torchvision_preprocess

        pre = torchvision_preprocess(self.default_input_size)
        if self.in_chans == 3:
            return pre
        if self.in_chans != 1:
            return None  # Preprocess handles 1 or 3 channels
        avg = lambda v: (sum(v) / len(v),)  # noqa: E731
        return Preprocess(kind="normalize", in_chans=1, image_size=pre.image_size, central_crop=pre.central_crop,
                          mean=avg(IMAGENET_MEAN), std=avg(IMAGENET_STD), resize=pre.resize)


def load_torchvision_weights(model: ResNet, state_dict: dict | nn.Module, *, strict_head: bool = True) -> ResNet:
    """Load a torchvision ResNet state dict (or model) into ``model`` of any mode.

    ``resnet18/34/50/101/152`` take the weights of torchvision's model of the same name.

    Every parameter and buffer of the torchvision model must land in ``model``; the only
    parameters of ``model`` left untouched are its halting branches (``*.halting.*``),
    which keep their fresh initialisation, as the paper's fine-tuning from a pretrained
    ResNet does. With ``strict_head=False`` a classifier of another size (``fc.*``, or
    none: ``num_classes=0``) is skipped too (fine-tuning on another label set).

    A checkpoint with 3 input channels loads into a model with ``in_chans=1`` by summing
    the stem's filters over colour channels.

    Raises:
        ValueError: for missing, unexpected or mis-shaped tensors (all listed).
    """
    if isinstance(state_dict, nn.Module):
        state_dict = state_dict.state_dict()
    own = model.state_dict()
    sd = dict(state_dict)
    if "conv1.weight" in sd and "conv1.weight" in own:
        w, target = sd["conv1.weight"], own["conv1.weight"]
        if w.shape[1] == 3 and target.shape[1] == 1 and w.shape[0] == target.shape[0]:
            sd["conv1.weight"] = w.sum(1, keepdim=True)
    skipped_head = []
    if not strict_head:
        for k in ("fc.weight", "fc.bias"):
            if k in sd and (k not in own or sd[k].shape != own[k].shape):  # other size, or no classifier
                skipped_head.append(k)
                del sd[k]
    unexpected = sorted(k for k in sd if k not in own)
    missing = sorted(k for k in own if k not in sd and ".halting." not in k and k not in skipped_head)
    mismatched = sorted(
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sd
        if k in own and sd[k].shape != own[k].shape
    )
    if unexpected or missing or mismatched:
        parts = []
        if missing:
            parts.append(f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        if mismatched:
            parts.append(f"wrong shape {mismatched[:8]}")
        raise ValueError("state dict does not match the model: " + "; ".join(parts))
    model.load_state_dict(sd, strict=False)
    return model
