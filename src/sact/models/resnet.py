"""ImageNet ResNets with torchvision's layout and parameter names, in vanilla / ACT / SACT mode.

``conv1, bn1, relu, maxpool, layer1..layer4, avgpool, fc`` as in
``torchvision.models.resnet``; bottleneck units ``layerX.N.{conv1..3, bn1..3, downsample}``.
The halting branches are extra modules ``layerX.halting.N.*``, so a torchvision
checkpoint loads with :func:`load_torchvision_weights` and, in vanilla mode, the logits
equal torchvision's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..flops import conv_flops, linear_flops
from ..halting import make_halting
from ..stage import AdaptiveStage
from ..units import Bottleneck
from .base import AdaptiveResNet

__all__ = ["ResNet", "load_torchvision_weights"]


class ResNet(AdaptiveResNet):
    """torchvision-compatible bottleneck ResNet with adaptive stages.

    Args:
        layers: units per stage, e.g. ``(3, 4, 6, 3)`` for ResNet-50.
        mode: ``"vanilla"``, ``"act"`` or ``"sact"``.
        num_classes: size of the classifier.
        in_chans: input channels.
        base_width: channels of the first stage's inner convolutions (64).
        eps: halting threshold ``1 - eps``.
        zero_init_residual: zero-initialise each unit's last BN gamma (torchvision option).
    """

    stage_names = ("layer1", "layer2", "layer3", "layer4")

    def __init__(
        self,
        *,
        layers: tuple[int, ...] = (3, 4, 6, 3),
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
        if num_classes < 1 or in_chans < 1 or base_width < 1:
            raise ValueError(f"num_classes, in_chans, base_width must be positive, got {num_classes}, {in_chans}, {base_width}")
        self.mode = mode
        self.in_chans = in_chans
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
                units.append(
                    Bottleneck(in_ch, width, stride=stride if u == 0 else 1, downsample=(u == 0), norm_layer=norm)
                )
                in_ch = width * Bottleneck.expansion
            stage = AdaptiveStage(units, mode=mode, halting_factory=lambda m, c: make_halting(m, c, norm_layer=norm), eps=eps)
            setattr(self, self.stage_names[i], stage)
        self.num_features = in_ch
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
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
                    nn.init.zeros_(unit.bn3.weight)

    def forward_stem(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``[B, C_in, H, W]`` -> (``[B, 64, H/4, W/4]``, FLOPs ``[B]``)."""
        if x.shape[1] != self.in_chans:
            raise ValueError(f"expected {self.in_chans} input channels, got shape {tuple(x.shape)}")
        y = self.relu(self.bn1(self.conv1(x)))
        flops = conv_flops(self.conv1, torch.full((x.shape[0],), y.shape[-2] * y.shape[-1], device=x.device))
        return self.maxpool(y), flops

    def forward_head(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``[B, C, H, W]`` -> (logits ``[B, K]``, FLOPs ``[B]``)."""
        logits = self.fc(torch.flatten(self.avgpool(x), 1))
        return logits, torch.full((x.shape[0],), linear_flops(self.fc), device=x.device)


def load_torchvision_weights(model: ResNet, state_dict: dict | nn.Module, *, strict_head: bool = True) -> ResNet:
    """Load a torchvision ResNet state dict (or model) into ``model`` of any mode.

    Every parameter and buffer of the torchvision model must land in ``model``; the only
    parameters of ``model`` left untouched are its halting branches (``*.halting.*``),
    which keep their fresh initialisation, as the paper's fine-tuning from a pretrained
    ResNet does. With ``strict_head=False`` a classifier of another size (``fc.*``) is
    skipped too (fine-tuning on another label set).

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
            if k in sd and k in own and sd[k].shape != own[k].shape:
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
