"""Detection through the sparse engine at inference.

:func:`sparse_detector` wraps a detector so that its backbone's stages run through the
sparse engine's executors (:mod:`sact.sparse.executors`): the same stage outputs
(features, ponder maps, FLOPs) as the dense path, with residual units run only at active
positions. The detector is not modified: the executors are an argument of its forward.
Frozen batch norms (``FrozenBatchNorm2d``) fold like eval-mode ``BatchNorm2d``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["SparseDetector", "sparse_detector", "unfreeze_batchnorm"]


def unfreeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``FrozenBatchNorm2d`` in ``module`` (in place) by an eval ``BatchNorm2d``
    holding the same affine parameters and statistics (the inverse of ``freeze_batchnorm``)."""
    from torchvision.ops import FrozenBatchNorm2d

    for name, child in module.named_children():
        if isinstance(child, FrozenBatchNorm2d):
            bn = nn.BatchNorm2d(child.weight.numel(), eps=child.eps).to(child.weight.device)
            with torch.no_grad():
                for key in ("weight", "bias", "running_mean", "running_var"):
                    getattr(bn, key).copy_(getattr(child, key))
            setattr(module, name, bn.eval())
        else:
            unfreeze_batchnorm(child)
    return module


class SparseDetector(nn.Module):
    """Inference wrapper: ``detector(images, executors=...)`` with the sparse engine's executors.

    The detector is the submodule ``detector`` (weights shared). Always in eval mode;
    calls run under ``torch.no_grad()``. Call :meth:`refresh` after changing its weights.
    """

    def __init__(self, detector: nn.Module, **to_sparse_kwargs) -> None:
        super().__init__()
        from ..sparse import make_executor

        self.detector = detector.eval()
        backbone = detector.backbone
        self.executors = nn.ModuleList(
            make_executor(s, **to_sparse_kwargs) or nn.Identity() for s in backbone.body.stages[: backbone.num_run]
        )
        super().train(False)

    def train(self, mode: bool = True) -> "SparseDetector":
        """Inference only: stays in eval mode whatever ``mode`` is."""
        return super().train(False)

    def refresh(self) -> None:
        """Re-fold batch norms after the detector's backbone weights changed."""
        for e in self.executors:
            if hasattr(e, "refresh"):
                e.refresh()

    def stage_executors(self) -> list:
        """One executor per running backbone stage (``None``: dense), for ``executors=`` arguments."""
        return [None if isinstance(e, nn.Identity) else e for e in self.executors]

    @torch.no_grad()
    def forward(self, images: list[Tensor]):
        """Detections as :meth:`SACTFasterRCNN.forward` returns them in eval mode."""
        return self.detector(images, executors=self.stage_executors())


def sparse_detector(detector: nn.Module, **to_sparse_kwargs) -> SparseDetector:
    """``detector`` (put in eval mode) with its backbone stages run by the sparse engine.

    Args:
        detector: an :class:`~sact.detection.SACTFasterRCNN`.
        **to_sparse_kwargs: executor options of ``sact.to_sparse`` (``dense_above``,
            ``chunk_rows``, ``poison``).

    Returns:
        A :class:`SparseDetector` sharing the detector's weights.
    """
    return SparseDetector(detector, **to_sparse_kwargs)
