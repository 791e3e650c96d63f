"""Break-even active fraction of a row kernel: where its sparse path stops beating its dense path.

A unit kernel (:mod:`sact.sparse.unit_kernels`) has a sparse path (gather the active rows
and their neighbours, compute, scatter back) and a dense path (the whole map on a view of
the row buffer, masked). :func:`break_even` times both on disc-shaped active sets of
growing area and interpolates the fraction where they cost the same: the value
``sact.sparse.DEFAULT_DENSE_ABOVE`` should hold. Process CPU time at one thread is the
least noisy measure on a shared machine (``sact bench --break-even``).
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import torch
from torch import nn

from ...models.resnet import BasicBlock
from ...models.resnet_v2 import PreActBottleneck
from ...units import Bottleneck, PreActBasicUnit
from ...sparse import native
from ...sparse.rows import image_index, neighbour_table
from ...sparse.rowset import Geometry, RowSet
from ...sparse.unit_kernels import make_unit_kernel

__all__ = ["UNIT_CASES", "break_even"]

#: (name, unit builder, map side) of the units measured by default.
UNIT_CASES: tuple[tuple[str, Callable[[], nn.Module], int], ...] = (
    ("Bottleneck 256x56x56", lambda: Bottleneck(256, 64), 56),
    ("Bottleneck 512x28x28", lambda: Bottleneck(512, 128), 28),
    ("Bottleneck 1024x14x14", lambda: Bottleneck(1024, 256), 14),
    ("Bottleneck 2048x7x7", lambda: Bottleneck(2048, 512), 7),
    ("PreActBottleneck 256x56x56", lambda: PreActBottleneck(256, 256, 64), 56),
    ("PreActBottleneck 1024x14x14", lambda: PreActBottleneck(1024, 1024, 256), 14),
    ("BasicBlock 64x56x56", lambda: BasicBlock(64, 64), 56),
    ("PreActBasicUnit 16x32x32", lambda: PreActBasicUnit(16, 16), 32),
    ("PreActBasicUnit 64x8x8", lambda: PreActBasicUnit(64, 64), 8),
)
FRACTIONS = (0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 1.0)


def _disc_rows(side: int, batch: int, fraction: float) -> torch.Tensor:
    """Sorted rows of a centred disc covering about ``fraction`` of each image."""
    if fraction >= 1.0:
        return torch.arange(batch * side * side)
    radius = math.sqrt(fraction * side * side / math.pi)
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    disc = ((yy - side / 2 + 0.5) ** 2 + (xx - side / 2 + 0.5) ** 2) <= radius**2
    return disc.flatten().repeat(batch).nonzero().view(-1)


def break_even(unit: nn.Module, side: int, *, batch: int = 1, reps: int = 5,
               fractions=FRACTIONS, clock: str = "wall") -> dict | None:
    """Sparse / dense time of one unit kernel over disc-shaped active sets.

    Args:
        unit: a stride-1 residual unit (eval mode is set).
        side: map side.
        batch: images.
        reps: timed repeats per point (median; one untimed first).
        fractions: active fractions to try.
        clock: ``"wall"`` (``time.perf_counter``) or ``"cpu"`` (``time.process_time``).

    Returns:
        ``{"kernel", "batch", "points": [(fraction, sparse/dense)], "break_even"}`` (``break_even``:
        the interpolated fraction where the ratio crosses 1, 1.0 if sparse always wins,
        ``None`` if it never does), or ``None`` when the unit has no sparse/dense pair.
    """
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}")
    now = time.perf_counter if clock == "wall" else time.process_time
    kernel = make_unit_kernel(unit.eval(), dense_above=1.0)
    if not (hasattr(kernel, "run_sparse") and hasattr(kernel, "run_dense")):
        return None
    c = unit.out_channels
    x0 = torch.zeros(batch * side * side + 1, c)
    x0[:-1] = torch.rand(batch * side * side, c)
    geo = Geometry(batch, side, side, c, neighbour_table(batch, side, side, "cpu"),
                   image_index(batch, side, side, "cpu"), native=native.use_for(x0))
    points = []
    with torch.no_grad():
        for frac in fractions:
            idx = _disc_rows(side, batch, frac)
            times: dict[str, list[float]] = {"sparse": [], "dense": []}
            for rep in range(reps + 1):
                for path in ("sparse", "dense"):
                    X, S = x0.clone(), torch.zeros(batch, c)
                    rows = RowSet(idx, geo, idx.numel() == geo.n)  # the set's bookkeeping is timed too
                    t0 = now()
                    getattr(kernel, f"run_{path}")(X, S, rows)
                    if rep:
                        times[path].append(now() - t0)
            points.append((idx.numel() / geo.n, statistics.median(times["sparse"]) / statistics.median(times["dense"])))
    crossing = next((f0 + (1 - r0) * (f1 - f0) / (r1 - r0) for (f0, r0), (f1, r1) in zip(points, points[1:])
                     if r0 < 1 <= r1), None)
    if crossing is None and all(r < 1 for _, r in points):
        crossing = 1.0
    return {"kernel": type(kernel).__name__, "batch": batch, "points": points, "break_even": crossing}
