"""The reference's CIFAR ResNets (``cifar_model.py``): pre-activation basic units.

Layout (spec section 5.1): stem 3x3 conv ``C_in -> 16`` with bias and no BN; three
stages of ``n`` :class:`~sact.units.PreActBasicUnit` at 16 / 32 / 64 channels (first
unit of stage 1 activates before the residual, first units of stages 2 and 3 have
stride 2); head = global average pool -> BN -> leaky ReLU -> linear (pooling *before*
the final BN). Leaky ReLU slope 0.1, BN momentum 0.1 (TF decay 0.9) and eps 1e-3, TF
variance-scaling initialisation. Depth ``6n + 2``: ResNet-20/32/56/110 for n = 3/5/9/18.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from ..flops import conv_flops
from ..halting import make_halting
from ..stage import AdaptiveStage
from ..units import PreActBasicUnit
from .base import AdaptiveResNet, make_classifier

__all__ = ["CifarResNet"]

LRELU_SLOPE = 0.1


def _variance_scaling_(w: Tensor) -> None:
    fan_in = w[0].numel()
    std = (1.3 * 2.0 / fan_in) ** 0.5
    nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)


class CifarResNet(AdaptiveResNet):
    """Reference CIFAR pre-activation ResNet with adaptive stages.

    Args:
        layers: units per stage, e.g. ``(5, 5, 5)`` for ResNet-32.
        mode: ``"vanilla"``, ``"act"`` or ``"sact"``.
        num_classes: size of the classifier (10; 0: none, ``fc`` is ``nn.Identity``).
        in_chans: input channels (3; 1 for Fashion-MNIST).
        base_channels: channels of the first stage (16).
        eps: halting threshold ``1 - eps``.
    """

    stage_names = ("layer1", "layer2", "layer3")
    first_conv = "stem"
    stem_stride = 1
    default_input_size = 32

    def __init__(
        self,
        *,
        layers: tuple[int, ...] = (5, 5, 5),
        mode: str = "sact",
        num_classes: int = 10,
        in_chans: int = 3,
        base_channels: int = 16,
        eps: float = 0.01,
    ) -> None:
        super().__init__()
        if len(layers) != 3 or any(int(n) < 1 for n in layers):
            raise ValueError(f"layers must be 3 positive unit counts, got {layers}")
        if num_classes < 0 or in_chans < 1 or base_channels < 1 or base_channels % 2:
            raise ValueError(
                f"num_classes must be >= 0, in_chans positive and base_channels positive and even, got "
                f"{num_classes}, {in_chans}, {base_channels}"
            )
        self.mode = mode
        self.in_chans = in_chans
        self.num_classes = num_classes
        norm = partial(nn.BatchNorm2d, eps=1e-3, momentum=0.1)
        self.stem = nn.Conv2d(in_chans, base_channels, 3, padding=1, bias=True)
        in_ch = base_channels
        for i, n in enumerate(layers):
            out_ch = base_channels * 2**i
            units = [
                PreActBasicUnit(
                    in_ch if u == 0 else out_ch,
                    out_ch,
                    stride=2 if (u == 0 and i > 0) else 1,
                    activate_before_residual=(i == 0 and u == 0),
                    norm_layer=norm,
                    slope=LRELU_SLOPE,
                )
                for u in range(int(n))
            ]
            in_ch = out_ch
            stage = AdaptiveStage(
                units,
                mode=mode,
                halting_factory=lambda m, c: make_halting(m, c, norm_layer=norm, activation=nn.LeakyReLU(LRELU_SLOPE)),
                eps=eps,
            )
            setattr(self, self.stage_names[i], stage)
        self.num_features = in_ch
        self.head_bn = norm(in_ch)
        self.head_act = nn.LeakyReLU(LRELU_SLOPE)
        self.fc = make_classifier(in_ch, num_classes)
        for name, m in self.named_modules():
            if ".halting." in f".{name}.":
                continue
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                _variance_scaling_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward_stem(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``[B, C_in, H, W]`` -> (``[B, 16, H, W]``, FLOPs ``[B]``)."""
        if x.shape[1] != self.in_chans:
            raise ValueError(f"expected {self.in_chans} input channels, got shape {tuple(x.shape)}")
        y = self.stem(x)
        return y, conv_flops(self.stem, torch.full((x.shape[0],), y.shape[-2] * y.shape[-1], device=x.device))

    def forward_pre_logits(self, x: Tensor) -> Tensor:
        """``[B, C, H, W]`` -> ``[B, C]``: global mean, then BN and leaky ReLU (pool before the BN)."""
        pooled = x.mean(dim=(2, 3), keepdim=True)
        return torch.flatten(self.head_act(self.head_bn(pooled)), 1)

    def default_preprocess(self):
        """The reference's CIFAR evaluation: per-image standardisation (:func:`sact.data.cifar_preprocess`)."""
        from ..data.transforms import Preprocess

        return Preprocess(kind="standardize", in_chans=self.in_chans) if self.in_chans in (1, 3) else None
