"""The row layout of the sparse engine: flat channels-last feature rows plus a zero pad row.

A stage's features ``[B, C, H, W]`` live in one matrix ``X`` of shape ``(B*H*W + 1, C)``:
row ``p = (b*H + y)*W + x`` holds position ``(b, y, x)`` and the last row (index
``N = B*H*W``) is all zeros. A 3x3 neighbourhood is then a row of the neighbour table
``(N, 9)`` (:func:`neighbour_table`), whose out-of-image entries point at the pad row, so
a gather of neighbour rows is exactly the zero-padded im2col of those positions.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["neighbour_table", "image_index", "dilate_rows", "rows_view"]

_CACHE: "OrderedDict[tuple, Tensor]" = OrderedDict()
_CACHE_SIZE = 32


def _cached(key: tuple, build) -> Tensor:
    hit = _CACHE.get(key)
    if hit is None:
        hit = build()
        _CACHE[key] = hit
        if len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    return hit


def neighbour_table(batch: int, height: int, width: int, device: torch.device | str) -> Tensor:
    """Rows of the 3x3 neighbours of every position (cached per shape and device).

    Args:
        batch, height, width: feature-map shape.
        device: where the table lives.

    Returns:
        ``(N, 9)`` int64, ``N = batch*height*width``; column ``k = 3*(dy+1) + (dx+1)``
        (the order of a conv weight's ``(kh, kw)``) holds the row of position
        ``(y+dy, x+dx)`` of the same image, or ``N`` (the pad row) outside the image.
    """

    def build() -> Tensor:
        n = batch * height * width
        ys = torch.arange(height, device=device).view(1, height, 1)
        xs = torch.arange(width, device=device).view(1, 1, width)
        base = torch.arange(batch, device=device).view(batch, 1, 1) * (height * width)
        cols = []
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                yy, xx = ys + dy, xs + dx
                inside = (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
                row = base + yy * width + xx
                cols.append(torch.where(inside, row, torch.full_like(row, n)).reshape(-1))
        return torch.stack(cols, dim=1).contiguous()

    return _cached(("nbr", batch, height, width, str(device)), build)


def image_index(batch: int, height: int, width: int, device: torch.device | str) -> Tensor:
    """``(N,)`` int64: the image of each row (cached)."""
    hw = height * width
    return _cached(
        ("img", batch, height, width, str(device)),
        lambda: torch.arange(batch, device=device).repeat_interleave(hw),
    )


def dilate_rows(active: Tensor, batch: int, height: int, width: int) -> Tensor:
    """Rows whose 3x3 neighbourhood touches an active row (the dilated set).

    Args:
        active: ``(N,)`` bool, active rows.

    Returns:
        ``(N,)`` bool: 3x3 max-pool of ``active`` per image (SAME padding), the positions a
        3x3 convolution evaluated at the active rows reads.
    """
    m = active.view(batch, 1, height, width).to(torch.float32 if active.device.type == "cpu" else torch.float16)
    return F.max_pool2d(m, 3, stride=1, padding=1).view(-1) > 0


def rows_view(buf: Tensor, batch: int, height: int, width: int) -> Tensor:
    """Zero-copy ``[B, C, H, W]`` (channels-last strided) view of the first ``N`` rows of ``buf``."""
    c = buf.shape[1]
    return buf[: batch * height * width].view(batch, height, width, c).permute(0, 3, 1, 2)
