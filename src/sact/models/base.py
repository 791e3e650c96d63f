"""The shared skeleton of every adaptive ResNet: stem -> adaptive stages -> head."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from ..output import FeaturesOutput, ModelOutput
from ..stage import AdaptiveStage, StageExecutor

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

    def forward_features(
        self,
        x: Tensor,
        *,
        executors: Sequence[StageExecutor | None] | None = None,
        num_stages: int | None = None,
    ) -> FeaturesOutput:
        """Stem and stages. ``x`` ``[B, C_in, H, W]`` -> :class:`FeaturesOutput`.

        Args:
            x: the image batch.
            executors: one per stage (``None`` entries or ``None``: the dense reference
                execution); the sparse engine passes its own (:func:`sact.to_sparse`).
            num_stages: run only the first ``num_stages`` stages (detection backbones).
        """
        if x.dim() != 4:
            raise ValueError(f"expected an image batch [B, C, H, W], got shape {tuple(x.shape)}")
        stages_to_run = self.stages[:num_stages]
        if executors is not None and len(executors) < len(stages_to_run):
            raise ValueError(f"got {len(executors)} executors for {len(stages_to_run)} stages")
        x, flops = self.forward_stem(x)
        features, stages = [], []
        for i, stage in enumerate(stages_to_run):
            x, out = stage(x, None if executors is None else executors[i])
            features.append(x)
            stages.append(out)
            flops = flops + out.flops
        return FeaturesOutput(features, stages, flops)

    def forward(self, x: Tensor, *, executors: Sequence[StageExecutor | None] | None = None) -> ModelOutput:
        """``x`` ``[B, C_in, H, W]`` -> :class:`ModelOutput` (``executors``: see :meth:`forward_features`)."""
        feats = self.forward_features(x, executors=executors)
        logits, head_flops = self.forward_head(feats.features[-1])
        ponder = sum(s.ponder_cost for s in feats.stages)
        return ModelOutput(logits=logits, ponder_cost=ponder, flops=feats.flops + head_flops, stages=feats.stages)
