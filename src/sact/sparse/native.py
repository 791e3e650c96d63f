"""The sparse engine's native kernels (``csrc/rows.cpp``, ``csrc/basic_stage.cpp``): thin wrappers
over ``torch.ops.sact_native``. Building, loading and switching them on and off is
:mod:`sact.native`'s (re-exported here: ``SACT_NATIVE=0`` or :func:`set_enabled` turns them off)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..native import _build_name, available, build, enabled, load_error, set_enabled, use_for

__all__ = ["available", "enabled", "set_enabled", "build", "use_for", "load_error", "bottleneck_rows", "halting_rows",
           "dilate_rows", "accumulate_rows", "halting_step_rows"]


def bottleneck_rows(X, S, t1, idx, dil, nbr, m1, b1, m2, b2, m3, b3, hw: int, chunk: int, min_rows: int, *,
                    pre_scale: Tensor | None = None, pre_shift: Tensor | None = None, final_relu: bool = True,
                    wt: tuple[Tensor, Tensor, Tensor] | None = None) -> None:
    """Fused sparse bottleneck (see ``csrc/rows.cpp``): updates ``X`` at ``idx`` and ``S`` in place.

    ``pre_scale`` / ``pre_shift`` (``[C]``): a pre-activation unit's BN, applied with a ReLU to
    the rows conv1 reads; ``final_relu=False`` for pre-activation units (no ReLU after the sum).
    ``wt``: the three weights as ``(out, in)`` matrices: the products then run through oneDNN
    (:mod:`sact.sparse.gemm`) with the bias and ReLU fused; ``None``: ``m1, m2, m3`` with at::mm.
    """
    empty = X.new_empty(0)
    wt1, wt2, wt3 = wt if wt is not None else (empty, empty, empty)
    torch.ops.sact_native.bottleneck_rows(X, S, t1, idx, dil, nbr, m1, b1, m2, b2, m3, b3,
                                          empty if pre_scale is None else pre_scale,
                                          empty if pre_shift is None else pre_shift, final_relu, wt1, wt2, wt3,
                                          hw, chunk, min_rows)


def halting_rows(X, idx, dil, nbr, wz, cz, scale, shift, slope: float, identity: bool, glob, hw: int) -> Tensor:
    """SACT halting probabilities at the rows ``idx`` (see ``csrc/rows.cpp``)."""
    return torch.ops.sact_native.halting_rows(X, idx, dil, nbr, wz, cz, scale, shift, slope, identity, glob, hw)


def dilate_rows(idx: Tensor, nbr: Tensor) -> Tensor:
    """Sorted rows of the 3x3-dilated set of the rows ``idx``."""
    return torch.ops.sact_native.dilate_rows(idx, nbr)


def accumulate_rows(out: Tensor, X: Tensor, idx: Tensor, w: Tensor) -> None:
    """``out[idx] += w[:, None] * X[idx]`` in place."""
    torch.ops.sact_native.accumulate_rows(out, X, idx, w)


def halting_step_rows(state, dist: Tensor, O: Tensor, X: Tensor, idx: Tensor | None, proba: Tensor | None, eps: float,
                      *, first: bool) -> Tensor:
    """:func:`sact.act.halting_step` at the running rows ``idx`` (``None``: all), in place on the full
    :class:`~sact.act.HaltingState` ``state``, fused with the stage output accumulation (see
    ``csrc/rows.cpp``). Returns the rows still running."""
    empty = dist.new_empty(0)
    return torch.ops.sact_native.halting_step_rows(
        state.cumsum, state.remainder, state.ponder_cost, state.num_units, state.finished, dist, O, X,
        idx if idx is not None else torch.empty(0, dtype=torch.long), idx is None,
        empty if proba is None else proba, float(eps), first)


if __name__ == "__main__":  # python -m sact.sparse.native: build ahead of time (as python -m sact.native)
    build(verbose=True)
    print("sact native kernels built:", _build_name())
