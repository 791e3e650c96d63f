"""``to_sparse``: the inference module that skips halted positions."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..output import ModelOutput
from ..stage import AdaptiveStage
from .executors import make_executor
from .unit_kernels import ResNetStem

__all__ = ["SparseModel", "to_sparse"]


class SparseModel(nn.Module):
    """Sparse inference wrapper of an adaptive ResNet (see :func:`to_sparse`).

    The wrapped model is the submodule ``model`` (weights shared). The model's own forward
    runs (stem, stages, head), with the sparse executors of :mod:`sact.sparse.executors`
    (one per stage, ``None`` for vanilla stages) deciding where each stage's steps run.
    Always in eval mode; calls run under ``torch.no_grad()``.
    """

    def __init__(self, model: nn.Module, *, dense_above=None, chunk_rows: int = 768, poison: bool = False) -> None:
        super().__init__()
        for attr in ("forward_features", "stages"):
            if not hasattr(model, attr):
                raise ValueError(f"to_sparse needs a model following sact.models.AdaptiveResNet's protocol (with "
                                 f"{attr!r}; docs/custom_units.md); got {type(model).__name__}")
        self.model = model.eval()
        self.executors = nn.ModuleList(
            make_executor(s, dense_above=dense_above, chunk_rows=chunk_rows, poison=poison) or nn.Identity()
            for s in model.stages
        )
        #: the folded stem (torchvision ResNets), ``None``: the model's own
        self.stem = ResNetStem(model) if ResNetStem.supports(model) else None
        super().train(False)

    @property
    def mode(self) -> str:
        """The wrapped model's mode (``"vanilla"``, ``"act"`` or ``"sact"``)."""
        return self.model.mode

    @property
    def stages(self) -> nn.ModuleList:
        """The wrapped model's adaptive stages (what evaluation and ponder-map code read)."""
        return self.model.stages

    def stage_executors(self) -> list:
        """One executor per stage (``None``: the stage runs densely), for ``model.forward(x, executors=...)``."""
        return [None if isinstance(e, nn.Identity) else e for e in self.executors]

    def train(self, mode: bool = True) -> "SparseModel":
        """Inference only: stays in eval mode whatever ``mode`` is."""
        return super().train(False)

    @property
    def poison(self) -> bool:
        """Fill scratch buffers with NaN before use (debugging aid)."""
        return any(getattr(e, "poison", False) for e in self.executors)

    @poison.setter
    def poison(self, value: bool) -> None:
        for e in self.executors:
            if hasattr(e, "poison"):
                e.poison = bool(value)

    def refresh(self) -> None:
        """Re-fold batch norms after the wrapped model's weights or statistics changed."""
        for e in [*self.stage_executors(), self.stem]:
            if e is not None:
                e.refresh()

    @torch.no_grad()
    def forward(self, x: Tensor) -> ModelOutput:
        """``x`` ``[B, C_in, H, W]`` -> :class:`~sact.ModelOutput` equal to ``model.eval()(x)``
        (a ``features_only`` model: its list of stage maps)."""
        if x.dim() != 4:
            raise ValueError(f"expected an image batch [B, C, H, W], got shape {tuple(x.shape)}")
        if x.device.type == "cpu":
            # The stem's convolution and pooling are several times faster channels-last on
            # the CPU, and the row buffers of the stages are channels-last anyway.
            x = x.contiguous(memory_format=torch.channels_last)
        if self.stem is None:
            return self.model(x, executors=self.stage_executors())
        return self.model(x, executors=self.stage_executors(), stem=self.stem)


def to_sparse(
    model: nn.Module,
    *,
    dense_above: float | dict | None = None,
    chunk_rows: int = 768,
    poison: bool = False,
) -> SparseModel:
    """Sparse inference module computing the same :class:`~sact.ModelOutput` as ``model.eval()(x)``.

    SACT stages run unit 0 densely and every later unit only at the positions still
    active (its first convolution at the 3x3-dilated active set), on a flat channels-last
    row buffer with batch norm folded into the convolutions; the halting branches are
    evaluated at the active positions. ACT stages run later units only on the images
    still running; vanilla stages run as usual. Units of unknown types run as
    ``unit(x, mask)`` (dense masked) so any :class:`~sact.AdaptiveStage` works. The
    reported ``flops`` are counted from the position sets the engine used and equal the
    dense model's count.

    Args:
        model: an adaptive network: built by ``sact.create_model``, or any model of
            :class:`sact.models.AdaptiveResNet`'s protocol (``docs/custom_units.md``); put in
            eval mode, weights shared.
        dense_above: active fraction above which a unit runs densely on a view of the
            same buffer (float, dict ``{"SparseBottleneck": f, "SparsePreActBasic": f}``,
            or ``None`` for the measured break-even defaults). ``1.0`` = always sparse,
            ``-1.0`` = always dense.
        chunk_rows: rows per chunk of the fused gather-GEMM-scatter loops.
        poison: NaN-fill scratch buffers before use (debugging; slower).

    Returns:
        A :class:`SparseModel`. Call ``.refresh()`` after changing the model's weights.
    """
    if not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
    if dense_above is not None and not isinstance(dense_above, (int, float, dict)):
        raise ValueError(f"dense_above must be a float, a dict or None, got {dense_above!r}")
    if not all(isinstance(s, AdaptiveStage) for s in getattr(model, "stages", [None])):
        raise ValueError(f"to_sparse needs a model whose stages are AdaptiveStage; got {type(model).__name__}")
    return SparseModel(model, dense_above=dense_above, chunk_rows=chunk_rows, poison=poison)
