"""An adaptive stage: a list of residual units run with ACT / SACT halting.

Semantics (reference ``act.py:spatially_adaptive_computation_time`` and
``resnet_act.py``; paper Alg. 2):

* unit 0 (the strided / projection unit) runs at every position;
* after unit ``n < U-1`` a halting branch predicts ``h^n``; the last unit has none and
  always halts;
* unit ``n >= 1`` updates only the positions still active after unit ``n - 1``:
  ``x^n = x^{n-1} + m^n * F^n(x^{n-1})`` (the unit applies the mask), so a halted
  position keeps its features in all later units;
* the stage output is ``sum_n p^n x^n`` with the halting distribution ``p`` (eq. (4)).

ACT is the same loop with one position per image (mask ``[B, 1, 1, 1]`` broadcast over
the image). ``vanilla`` runs every unit everywhere and returns the last output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from .act import DEFAULT_EPS, halting_step
from .halting import make_halting

__all__ = ["StageOutput", "AdaptiveStage", "MODES"]

MODES = ("vanilla", "act", "sact")


@dataclass
class StageOutput:
    """What one stage reports besides its features.

    Attributes:
        ponder_map: ``[B, H, W]`` ponder cost ``N + 1 + R`` per position (differentiable
            through ``R``). ACT: constant over ``H, W``. vanilla: ``U`` everywhere.
        num_units: ``[B, H, W]`` int64, units executed per position (``N + 1``).
        halting_distribution: ``[B, U, H, W]`` weights of the unit outputs (sum to 1 over U).
        flops: ``[B]`` FLOPs this stage spent on each image (units + halting branches).
    """

    ponder_map: Tensor
    num_units: Tensor
    halting_distribution: Tensor
    flops: Tensor

    @property
    def ponder_cost(self) -> Tensor:
        """``[B]`` mean of the ponder map over positions (what the loss uses)."""
        return self.ponder_map.flatten(1).mean(1)

    @property
    def num_units_mean(self) -> Tensor:
        """``[B]`` mean number of executed units over positions."""
        return self.num_units.float().flatten(1).mean(1)


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


class AdaptiveStage(nn.Module):
    """Runs residual units as one ACT / SACT / vanilla stage.

    Units are registered as children ``"0", "1", ...`` (so parameter names match
    torchvision's ``layer1.0.conv1.weight``); halting branches live under ``halting.<n>``.

    Args:
        units: residual units following the protocol of :mod:`sact.units` (unit 0 may be
            strided; units ``1..U-1`` must keep the shape).
        mode: ``"vanilla"``, ``"act"`` or ``"sact"``.
        halting_factory: ``(mode, channels) -> nn.Module`` building a halting branch;
            default :func:`sact.halting.make_halting`.
        eps: halting threshold ``1 - eps``.
    """

    def __init__(
        self,
        units: Sequence[nn.Module],
        *,
        mode: str = "sact",
        halting_factory: Callable[[str, int], nn.Module] | None = None,
        eps: float = DEFAULT_EPS,
    ) -> None:
        super().__init__()
        self.mode = _check_mode(mode)
        if len(units) == 0:
            raise ValueError("a stage needs at least one unit")
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"eps must be in [0, 1), got {eps}")
        for i, unit in enumerate(units):
            for attr in ("out_channels", "flops"):
                if not hasattr(unit, attr):
                    raise TypeError(f"unit {i} ({type(unit).__name__}) lacks {attr!r}; see sact.units.ResidualUnit")
            self.add_module(str(i), unit)
        self.num_units = len(units)
        self.eps = eps
        factory = halting_factory or make_halting
        channels = units[0].out_channels
        self.halting = (
            nn.ModuleList(factory(mode, channels) for _ in range(self.num_units - 1)) if mode != "vanilla" else None
        )

    @property
    def units(self) -> list[nn.Module]:
        """The residual units in order."""
        return [getattr(self, str(i)) for i in range(self.num_units)]

    def __getitem__(self, idx: int) -> nn.Module:
        return self.units[idx]

    def __len__(self) -> int:
        return self.num_units

    def forward(self, x: Tensor) -> tuple[Tensor, StageOutput]:
        """Run the stage.

        Args:
            x: ``[B, C_in, H_in, W_in]``.

        Returns:
            ``(features [B, C, H, W], StageOutput)``.
        """
        units = self.units
        flops = units[0].flops(x, None)
        x = units[0](x)  # [B, C, H, W], every position
        b, _, h, w = x.shape
        num_u = self.num_units

        if self.mode == "vanilla":
            for unit in units[1:]:
                flops = flops + unit.flops(x, None)
                x = unit(x)
            full = torch.full((b, h, w), num_u, device=x.device)
            dist = torch.zeros(b, num_u, h, w, dtype=x.dtype, device=x.device)
            dist[:, -1] = 1
            return x, StageOutput(full.to(x.dtype), full.long(), dist, flops)

        spatial = self.mode == "sact"
        state = None
        weights = []
        out = None
        for n, unit in enumerate(units):
            mask = None
            if n > 0:
                mask = _as_mask(state.active, x)  # [B, 1, H, W]: 1 where still running
                flops = flops + unit.flops(x, mask)
                # ACT runs every unit on every image, as the reference's wrapper does (halted
                # images get weight 0; BatchNorm batch statistics then match the reference's).
                x = unit(x, mask if spatial else None)
            if n < num_u - 1:
                branch = self.halting[n]
                proba = branch(x)  # [B, H, W] (SACT) or [B] (ACT)
                flops = flops + branch.flops(x, mask)
            else:
                proba = None if state is not None else _ones_positions(x, spatial)
            state, weight = halting_step(state, proba, eps=self.eps)
            wx = weight.unsqueeze(1) * x if spatial else weight.view(b, 1, 1, 1) * x
            out = wx if out is None else out + wx
            weights.append(weight)

        dist = torch.stack(weights, dim=1)  # [B, U, H, W] or [B, U]
        ponder, num_units = state.ponder_cost, state.num_units
        if not spatial:  # ACT: constant maps over H, W
            dist = dist[:, :, None, None].expand(b, num_u, h, w)
            ponder = ponder.view(b, 1, 1).expand(b, h, w)
            num_units = num_units.view(b, 1, 1).expand(b, h, w)
        return out, StageOutput(ponder, num_units, dist, flops)


    # ---- FLOPs from the halting outcome (for executors that do not run the Python loop) ----

    def _flop_rates(self) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
        """Per unit ``n``: masked rates of unit ``n`` (0 for unit 0) and rates of halting branch ``n``."""
        if getattr(self, "_rates_cache", None) is None:
            for i, u in enumerate(self.units[1:], start=1):
                if not hasattr(u, "masked_flop_rates"):
                    raise TypeError(f"unit {i} ({type(u).__name__}) has no masked_flop_rates(); use its flops()")
            unit_rates = [(0, 0, 0)] + [u.masked_flop_rates() for u in self.units[1:]]
            halt_rates = [b.flop_rates() for b in self.halting] + [(0, 0)] if self.halting is not None else []
            object.__setattr__(self, "_rates_cache", (
                [r[0] for r in unit_rates], [r[1] for r in unit_rates], [r[2] for r in unit_rates],
                [r[0] for r in halt_rates], [r[1] for r in halt_rates],
            ))
        return self._rates_cache

    def flops_from_counts(self, x: Tensor, active: Tensor, dilated: Tensor) -> Tensor:
        """``[B]`` FLOPs of a SACT stage from its per-unit position counts.

        The same formulas as the units' and branches' ``flops`` (their ``masked_flop_rates`` /
        ``flop_rates``), vectorised: for executors that know the counts without masks.

        Args:
            x: the stage input ``[B, C_in, H_in, W_in]`` (its shape gives unit 0's FLOPs).
            active: ``[U, B]`` int64, positions unit ``n`` (and halting branch ``n``) ran at;
                row 0 is every position of the stage's map.
            dilated: ``[U, B]`` int64, positions of the 3x3-dilated active set (row 0 unused).
        """
        rd, ra, re, hr, hi = self._flop_rates()
        hw = int(active[0, 0]) if active.shape[1] else 0
        coef_a = torch.tensor([a + h for a, h in zip(ra, hr)], dtype=active.dtype, device=active.device)
        coef_d = torch.tensor(rd, dtype=active.dtype, device=active.device)
        total = (coef_a[:, None] * active).sum(0) + (coef_d[:, None] * dilated).sum(0)
        return self.units[0].flops(x, None) + total + (sum(hi) + sum(re) * hw)

    def flops_from_num_units(self, x: Tensor, num_units: Tensor, hw: int) -> Tensor:
        """``[B]`` FLOPs of an ACT stage whose images ran ``num_units`` ``[B]`` units each.

        Args:
            x: the stage input (its shape gives unit 0's FLOPs).
            num_units: ``[B]`` int64 in ``1..U``.
            hw: positions of the stage's feature map.
        """
        rd, ra, re, hr, hi = self._flop_rates()
        # cum[k]: FLOPs of units 1..k and halting branches 0..k (an image that ran k + 1 units)
        cum, acc = [], 0
        for n in range(self.num_units):
            acc += (rd[n] + ra[n] + re[n] + hr[n]) * hw + hi[n]
            cum.append(acc)
        table = torch.tensor(cum, dtype=torch.long, device=num_units.device)
        return self.units[0].flops(x, None) + table.index_select(0, num_units - 1)


def _as_mask(active: Tensor, x: Tensor) -> Tensor:
    """``active`` ``[B, H, W]`` or ``[B]`` -> ``[B, 1, H, W]`` 0/1 mask of ``x``'s dtype."""
    b, _, h, w = x.shape
    if active.dim() == 1:
        return active.to(x.dtype).view(b, 1, 1, 1).expand(b, 1, h, w)
    return active.to(x.dtype).unsqueeze(1)


def _ones_positions(x: Tensor, spatial: bool) -> Tensor:
    b, _, h, w = x.shape
    return x.new_ones((b, h, w) if spatial else (b,))
