"""One stage evaluation's geometry and the row sets its units update.

A stage's features live in a row buffer ``X`` ``(N + 1, C)`` (see :mod:`sact.sparse.rows`);
:class:`Geometry` holds its shape and the shared tables, :class:`RowSet` the rows a unit
and the halting branch after it must update (with the 3x3-dilated set a unit's first
convolution needs, computed once and shared).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import native
from .rows import dilate_rows

__all__ = ["Geometry", "RowSet", "chunks", "refresh_sums"]


@dataclass
class Geometry:
    """Shape and shared tables of one stage evaluation.

    Attributes:
        batch, height, width, channels: feature-map shape; ``n = batch*height*width`` rows.
        nbr: ``(n, 9)`` neighbour rows (pad row ``n`` outside the image).
        img: ``(n,)`` image of each row.
        chunk: rows per chunk of the fused loops.
        poison: fill scratch buffers with NaN before use (debugging).
        native: use the C++ kernels of :mod:`sact.sparse.native` (decided once per stage call).
    """

    batch: int
    height: int
    width: int
    channels: int
    nbr: Tensor
    img: Tensor
    chunk: int = 768
    poison: bool = False
    native: bool = False

    @property
    def n(self) -> int:
        return self.batch * self.height * self.width

    @property
    def hw(self) -> int:
        return self.height * self.width

    def scratch(self, rows: int, cols: int, like: Tensor, *, pad_row: bool = False) -> Tensor:
        """``(rows, cols)`` scratch of ``like``'s dtype; NaN-filled when poisoning; last row zero if ``pad_row``."""
        buf = like.new_empty(rows, cols)
        if self.poison:
            buf.fill_(float("nan"))
        if pad_row:
            buf[-1].zero_()
        return buf


@dataclass
class RowSet:
    """The rows a unit (and the halting branch after it) must update.

    Attributes:
        idx: ``(na,)`` sorted active rows.
        geo: the :class:`Geometry`.
        all_active: every row is active (unit 0, or nothing halted yet).
        mask_: ``[B, 1, H, W]`` 0/1 mask of the active rows if the caller has it (else built on demand).
    """

    idx: Tensor
    geo: Geometry
    all_active: bool
    mask_: Tensor | None = None
    _cache: dict = field(default_factory=dict)

    @classmethod
    def everything(cls, geo: Geometry, device) -> "RowSet":
        return cls(torch.arange(geo.n, device=device), geo, True)

    @property
    def fraction(self) -> float:
        return self.idx.numel() / self.geo.n

    @property
    def active(self) -> Tensor:
        """``(N,)`` bool."""
        if "active" not in self._cache:
            a = torch.zeros(self.geo.n, dtype=torch.bool, device=self.idx.device)
            a[self.idx] = True
            self._cache["active"] = a
        return self._cache["active"]

    @property
    def dilated(self) -> Tensor:
        """``(nd,)`` sorted rows of the 3x3-dilated active set."""
        if "dil" not in self._cache:
            if self.all_active:
                self._cache["dil"] = self.idx
            elif self.geo.native:
                self._cache["dil"] = native.dilate_rows(self.idx, self.geo.nbr)
            else:
                g = self.geo
                self._cache["dil"] = dilate_rows(self.active, g.batch, g.height, g.width).nonzero().view(-1)
        return self._cache["dil"]

    @property
    def nbr(self) -> Tensor:
        """``(na, 9)`` neighbour rows of the active rows."""
        if "nbr" not in self._cache:
            self._cache["nbr"] = self.geo.nbr if self.all_active else self.geo.nbr.index_select(0, self.idx)
        return self._cache["nbr"]

    def mask(self, dtype) -> Tensor:
        """``[B, 1, H, W]`` 0/1 mask of the active rows."""
        if self.mask_ is not None:
            return self.mask_.to(dtype)
        g = self.geo
        if self.all_active:
            return torch.ones(g.batch, 1, g.height, g.width, dtype=dtype, device=self.idx.device)
        return self.active.view(g.batch, 1, g.height, g.width).to(dtype)


def refresh_sums(X: Tensor, S: Tensor, geo: Geometry) -> None:
    """Recompute the per-image channel sums ``S`` ``[B, C]`` of the rows of ``X``."""
    S.copy_(X[: geo.n].view(geo.batch, geo.hw, geo.channels).sum(1, dtype=S.dtype))


def chunks(total: int, size: int):
    """``(start, end)`` of consecutive chunks of ``size`` rows covering ``total`` rows."""
    for s in range(0, total, size):
        yield s, min(s + size, total)
