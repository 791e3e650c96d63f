"""The shared skeleton of every adaptive ResNet: stem -> adaptive stages -> head."""

from __future__ import annotations

from torch import Tensor, nn

from ..output import FeaturesOutput, ModelOutput
from ..stage import AdaptiveStage

__all__ = ["AdaptiveResNet"]


class AdaptiveResNet(nn.Module):
    """Base class: subclasses define ``stem``, ``stage_names`` and ``head``.

    Subclasses implement ``forward_stem(x) -> (x, flops [B])`` and
    ``forward_head(x) -> (logits, flops [B])``; stages are :class:`AdaptiveStage`
    attributes named in ``stage_names`` (``layer1``, ``layer2``, ...).
    """

    stage_names: tuple[str, ...] = ()
    mode: str
    #: set by :func:`sact.create_model`: ``{"name": ..., "kwargs": {...}}`` to rebuild the model.
    sact_config: dict

    @property
    def stages(self) -> list[AdaptiveStage]:
        """The adaptive stages in order."""
        return [getattr(self, n) for n in self.stage_names]

    def forward_stem(self, x: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_head(self, x: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_features(self, x: Tensor) -> FeaturesOutput:
        """Stem and stages. ``x`` ``[B, C_in, H, W]`` -> :class:`FeaturesOutput`."""
        if x.dim() != 4:
            raise ValueError(f"expected an image batch [B, C, H, W], got shape {tuple(x.shape)}")
        x, flops = self.forward_stem(x)
        features, stages = [], []
        for stage in self.stages:
            x, out = stage(x)
            features.append(x)
            stages.append(out)
            flops = flops + out.flops
        return FeaturesOutput(features, stages, flops)

    def forward(self, x: Tensor) -> ModelOutput:
        """``x`` ``[B, C_in, H, W]`` -> :class:`ModelOutput`."""
        feats = self.forward_features(x)
        logits, head_flops = self.forward_head(feats.features[-1])
        ponder = sum(s.ponder_cost for s in feats.stages)
        return ModelOutput(logits=logits, ponder_cost=ponder, flops=feats.flops + head_flops, stages=feats.stages)
