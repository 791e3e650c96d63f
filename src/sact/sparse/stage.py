"""One adaptive stage executed sparsely: units run only where (SACT) or on whom (ACT) needed.

The loop is :meth:`sact.AdaptiveStage.forward` restricted to the positions still active;
the halting recurrence (:func:`sact.act.halting_step`) is applied to the active positions
only, which gives the same values because halted positions never change again (their
weight is 0, their ponder cost and unit count are final).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..act import HaltingState, halting_step
from ..stage import AdaptiveStage, StageOutput
from . import native
from .kernels import Geometry, RowBottleneck0, RowSet, make_halting_kernel, make_unit_kernel
from .rows import image_index, neighbour_table, rows_view

__all__ = ["SparseStage"]


class SparseStage(nn.Module):
    """Inference-only sparse execution of an :class:`~sact.stage.AdaptiveStage`.

    Args:
        stage: the stage (its modules are shared, not copied).
        dense_above: active fraction above which a unit runs densely (a float for every
            unit type, a dict ``{kernel class name: fraction}``, or ``None`` for the measured
            defaults :data:`sact.sparse.kernels.DEFAULT_DENSE_ABOVE`).
        chunk_rows: rows per chunk of the fused per-unit loops.
        poison: fill scratch buffers with NaN before use (to show they are never read
            uninitialised).
    """

    def __init__(
        self,
        stage: AdaptiveStage,
        *,
        dense_above: float | dict | None = None,
        chunk_rows: int = 768,
        poison: bool = False,
    ) -> None:
        super().__init__()
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
        object.__setattr__(self, "stage", stage)  # shared with the wrapped model, not registered twice
        self.mode = stage.mode
        self.chunk_rows = chunk_rows
        self.poison = poison
        if self.mode == "sact":
            self.unit_kernels = nn.ModuleList(make_unit_kernel(u, dense_above=dense_above) for u in stage.units[1:])
            self.halting_kernels = nn.ModuleList(make_halting_kernel(b) for b in stage.halting)
            u0 = stage.units[0]
            self.unit0 = RowBottleneck0(u0) if RowBottleneck0.supports(u0) else None

    def refresh(self) -> None:
        """Re-fold batch norms after the wrapped model's weights changed."""
        if self.mode == "sact":
            for k in list(self.unit_kernels) + list(self.halting_kernels) + [self.unit0]:
                if k is not None:
                    k.refresh()

    def forward(self, x: Tensor) -> tuple[Tensor, StageOutput]:
        """``x`` ``[B, C_in, H_in, W_in]`` -> ``(features [B, C, H, W], StageOutput)`` like the dense stage."""
        if self.mode == "vanilla":
            return self.stage(x)
        if self.mode == "act":
            return self._forward_act(x)
        return self._forward_sact(x)

    def _forward_act(self, x: Tensor) -> tuple[Tensor, StageOutput]:
        stage = self.stage
        units = stage.units
        num_u = len(units)
        flops = units[0].flops(x, None)
        x = units[0](x)
        b, _, h, w = x.shape
        running = torch.arange(b, device=x.device)  # images still running
        cs = x.new_zeros(b)
        rem = x.new_ones(b)
        ponder = x.new_ones(b)
        nunits = torch.zeros(b, dtype=torch.long, device=x.device)
        dist = x.new_zeros(b, num_u)
        out = None
        for n in range(num_u):
            all_run = running.numel() == b
            if n > 0:
                if running.numel() == 0:
                    break
                xs = x if all_run else x.index_select(0, running)
                f = units[n].flops(xs, None)
                xs = units[n](xs)
                if all_run:
                    x, flops = xs, flops + f
                else:
                    x = x.index_copy(0, running, xs)
                    flops = flops.index_add(0, running, f.to(flops.dtype))
            else:
                xs = x
            p = None  # the last unit always halts
            if n < num_u - 1:
                branch = stage.halting[n]
                p = branch(xs)  # [b_running]
                f = branch.flops(xs, None)
                flops = flops + f if all_run else flops.index_add(0, running, f.to(flops.dtype))
            new, wgt = _step(cs[running], rem[running], ponder[running], nunits[running], p, stage.eps)
            wx = wgt.view(-1, 1, 1, 1) * xs
            if out is None:
                out = wx
            else:
                out = out.index_add(0, running, wx) if not all_run else out + wx
            ponder[running], nunits[running], dist[running, n] = new.ponder_cost, new.num_units, wgt
            cs[running], rem[running] = new.cumsum, new.remainder
            running = running[~new.finished]
        dist = dist[:, :, None, None].expand(b, num_u, h, w)
        return out, StageOutput(
            ponder.view(b, 1, 1).expand(b, h, w), nunits.view(b, 1, 1).expand(b, h, w), dist, flops
        )

    def _forward_sact(self, x: Tensor) -> tuple[Tensor, StageOutput]:
        stage = self.stage
        units = stage.units
        num_u = len(units)
        flops = units[0].flops(x, None)
        if self.unit0 is not None:
            b, h, w = x.shape[0], *_out_hw(units[0], x)
            X = self.unit0(x, poison=self.poison)  # rows (N + 1, C), last row zero
            c = X.shape[1]
        else:
            x0 = units[0](x)
            b, c, h, w = x0.shape
            X = x0.new_empty(b * h * w + 1, c)
            X[-1].zero_()
            rows_view(X, b, h, w).copy_(x0)
            del x0
        dev, dt = X.device, X.dtype
        geo = Geometry(b, h, w, c, neighbour_table(b, h, w, dev), image_index(b, h, w, dev), self.chunk_rows, self.poison,
                       native.use_for(X))
        n_rows = geo.n
        acc = torch.float32 if dt in (torch.float16, torch.bfloat16) else dt
        S = X[:n_rows].view(b, h * w, c).sum(1, dtype=acc)  # [B, C] running sums for the global halting term
        O = geo.scratch(n_rows, c, X)  # stage output rows, sum_n p_n x_n
        rows = RowSet.everything(geo, dev)
        cs = X.new_zeros(n_rows)
        rem = X.new_ones(n_rows)
        ponder = X.new_ones(n_rows)
        nunits = torch.zeros(n_rows, dtype=torch.long, device=dev)
        dist = X.new_zeros(num_u, n_rows)
        for n in range(num_u):
            idx = rows.idx
            if n > 0:
                flops = flops + self.unit_kernels[n - 1].run(X, S, rows)
            p = None  # the last unit always halts
            if n < num_u - 1:
                p, f = self.halting_kernels[n].run(X, S, rows)
                flops = flops + f
            if rows.all_active:
                new, wgt = _step(cs, rem, ponder, nunits, p, stage.eps)
                torch.mul(X[:n_rows], wgt.unsqueeze(1), out=O) if n == 0 else O.addcmul_(X[:n_rows], wgt.unsqueeze(1))
                ponder, nunits = new.ponder_cost, new.num_units
                dist[n] = wgt
            else:
                new, wgt = _step(cs, rem, ponder.index_select(0, idx), nunits.index_select(0, idx), p, stage.eps)
                if geo.native:
                    native.accumulate_rows(O, X, idx, wgt)
                else:
                    O.index_add_(0, idx, X.index_select(0, idx).mul_(wgt.unsqueeze(1)))
                ponder.index_copy_(0, idx, new.ponder_cost)
                nunits.index_copy_(0, idx, new.num_units)
                dist[n].index_copy_(0, idx, wgt)
            cs, rem = new.cumsum, new.remainder
            keep = ~new.finished
            n_keep = int(keep.sum())
            if n_keep < idx.numel():
                keep_idx = keep.nonzero().view(-1)
                cs, rem = cs.index_select(0, keep_idx), rem.index_select(0, keep_idx)
                rows = RowSet(idx.index_select(0, keep_idx), geo, False)
            else:
                rows = RowSet(idx, geo, rows.all_active)
            if n_keep == 0:
                # Everything halted: later units touch nothing, their halting branches still
                # count their global convolution (the dense convention).
                for m in range(n + 1, num_u):
                    flops = flops + self.unit_kernels[m - 1].empty_flops(X, rows)
                    if m < num_u - 1:
                        flops = flops + self.halting_kernels[m].empty_flops(X, rows)
                break
        out = O.view(b, h, w, c).permute(0, 3, 1, 2)
        return out, StageOutput(
            ponder.view(b, h, w), nunits.view(b, h, w), dist.view(num_u, b, h, w).transpose(0, 1).contiguous(), flops
        )


def _step(cumsum: Tensor, remainder: Tensor, ponder: Tensor, num_units: Tensor, proba: Tensor | None, eps: float):
    """:func:`sact.act.halting_step` on the positions still running (none of them finished).

    All arguments are ``[S_active]``; returns ``(new_state, weight)``.
    """
    state = HaltingState(cumsum, torch.zeros_like(cumsum, dtype=torch.bool), remainder, ponder, num_units)
    return halting_step(state, proba, eps=eps)


def _out_hw(unit: nn.Module, x: Tensor) -> tuple[int, int]:
    s = unit.stride
    return (x.shape[-2] - 1) // s + 1, (x.shape[-1] - 1) // s + 1
