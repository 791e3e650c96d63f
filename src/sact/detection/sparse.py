"""Detection through the sparse engine at inference.

:func:`sparse_backbone` gives a detector's backbone the stages of
``sact.sparse.to_sparse(body)``: the same stage outputs (features, ponder maps, FLOPs) as
the dense path, with residual units run only at active positions. The sparse kernels fold
``BatchNorm2d`` into the convolutions, so frozen BNs are first turned back into eval-mode
``BatchNorm2d`` with the same statistics (the same function) in a copy of the body.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["sparse_backbone", "unfreeze_batchnorm"]


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


def sparse_backbone(detector: nn.Module, **to_sparse_kwargs) -> nn.Module:
    """Make ``detector`` (eval mode, modified in place) run its backbone stages sparsely.

    Args:
        detector: an :class:`~sact.detection.SACTFasterRCNN`.
        **to_sparse_kwargs: passed to ``sact.sparse.to_sparse`` (``dense_above``, ...).

    Returns:
        ``detector``, whose ``backbone.sparse_stages`` now holds the sparse stages;
        ``backbone.sparse_stages = None`` goes back to the dense path. Inference only:
        weights are copied, so re-run this after changing them.

    Raises:
        NotImplementedError: ``sact.sparse.to_sparse`` is not available in this build.
    """
    try:
        from ..sparse import to_sparse
    except ImportError as e:
        raise NotImplementedError("sact.sparse.to_sparse is not available in this build; use the dense path") from e
    detector.eval()
    body = unfreeze_batchnorm(copy.deepcopy(detector.backbone.body)).eval()
    sparse = to_sparse(body, **to_sparse_kwargs)
    detector.backbone.sparse_stages = sparse.sparse_stages[: detector.backbone.num_run]
    return detector
