"""The ACT / SACT halting recurrence, as pure tensor functions.

This module is the single implementation of the halting math of
Graves (2016) as used by Figurnov et al., "Spatially Adaptive Computation Time
for Residual Networks" (CVPR 2017, arXiv:1612.02297), with the exact semantics
of the reference TensorFlow code (``act.py`` of ``github.com/mfigurnov/sact``):

* ``eps = 0.01``: a position halts at the first unit ``N`` whose cumulative halting
  probability reaches ``1 - eps`` (``>=``); the last unit always halts.
* Remainder ``R = 1 - sum_{n<N} h^n`` (paper eq. (2)).
* Ponder cost ``rho = N + 1 + R`` with ``N`` zero-based (paper eq. (5): number of
  executed units plus remainder). ``N`` is piecewise constant, so the gradient
  flows only through ``R``: ``d rho / d h^n = -1`` for ``n < N``, else 0.
* Halting distribution ``p^n = h^n`` for ``n < N``, ``p^N = R``, 0 after
  (paper eq. (3)); the output of a block is ``sum_n p^n x^n`` (eq. (4)).

ACT and SACT are the same recurrence over different "position" shapes: ``[B]``
(one position per image, ACT) or ``[B, H, W]`` (one per spatial position, SACT).
Because unit ``n + 1`` may only run where the position is still active, the
recurrence is written as a step function (:func:`halting_step`) that the stage
loop calls after every unit; :func:`adaptive_computation_time` is the same step
function folded over a given ``[..., U-1]`` tensor of probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["HaltingState", "halting_step", "adaptive_computation_time", "DEFAULT_EPS"]

DEFAULT_EPS = 0.01


@dataclass
class HaltingState:
    """Running state of the halting recurrence; every field has the position shape ``S``.

    Attributes:
        cumsum: ``[S]`` float, sum of halting probabilities seen so far (``c`` in the paper).
        finished: ``[S]`` bool, position halted at or before the last processed unit.
        remainder: ``[S]`` float, ``R = 1 - sum of h`` over units before halting.
        ponder_cost: ``[S]`` float, starts at 1 (the reference's off-by-one fix) and
            ends at ``N + 1 + R``.
        num_units: ``[S]`` int64, number of units executed at the position (``N + 1``).
    """

    cumsum: Tensor
    finished: Tensor
    remainder: Tensor
    ponder_cost: Tensor
    num_units: Tensor

    @classmethod
    def initial(cls, like: Tensor) -> "HaltingState":
        """State before the first unit, shaped and placed like ``like`` (``[S]``).

        The state is kept in at least float32 (``like``'s dtype if it is float32 or float64):
        under bfloat16 / float16 autocast the threshold ``>= 1 - eps`` and the cumulative sum
        must not be rounded to 8 or 11 bits.
        """
        dtype = like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32
        return cls.zeros(like.shape, dtype=dtype, device=like.device)

    @classmethod
    def zeros(cls, shape: tuple[int, ...], *, dtype: torch.dtype = torch.float32, device=None) -> "HaltingState":
        """State before the first unit for positions of ``shape`` (``[S]``)."""
        return cls(
            cumsum=torch.zeros(shape, dtype=dtype, device=device),
            finished=torch.zeros(shape, dtype=torch.bool, device=device),
            remainder=torch.ones(shape, dtype=dtype, device=device),
            ponder_cost=torch.ones(shape, dtype=dtype, device=device),
            num_units=torch.zeros(shape, dtype=torch.long, device=device),
        )

    @property
    def active(self) -> Tensor:
        """``[S]`` bool: positions that the next unit must still update."""
        return ~self.finished

    def select(self, idx: Tensor) -> "HaltingState":
        """The state of the positions ``idx`` only (for executors that compute only there).

        Args:
            idx: ``[n]`` int64 indices into the flattened positions ``S``.

        Returns:
            A state whose fields are ``[n]``.
        """
        return HaltingState(*(f.reshape(-1).index_select(0, idx) for f in self._fields()))

    def merge(self, idx: Tensor, sub: "HaltingState") -> "HaltingState":
        """This state with the positions ``idx`` replaced by ``sub`` (the inverse of :meth:`select`).

        Args:
            idx: ``[n]`` int64 indices into the flattened positions ``S``.
            sub: state of those positions, fields ``[n]``.

        Returns:
            A new state of shape ``S`` (``self`` is not modified).
        """
        return HaltingState(*(
            full.reshape(-1).index_copy(0, idx, part.to(full.dtype)).view(full.shape)
            for full, part in zip(self._fields(), sub._fields())
        ))

    def _fields(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        return self.cumsum, self.finished, self.remainder, self.ponder_cost, self.num_units


def halting_step(
    state: HaltingState | None, halting_proba: Tensor | None, *, eps: float = DEFAULT_EPS
) -> tuple[HaltingState, Tensor]:
    """Advance the recurrence by one unit (Alg. 1 / Alg. 2 of the paper, one iteration).

    Args:
        state: state after the previous units, or ``None`` before unit 0.
        halting_proba: ``[S]`` halting probability ``h^n`` of the unit just executed,
            or ``None`` for the last unit of a block (which always halts, ``h = 1``).
            Values at already-halted positions are ignored.
        eps: halting threshold is ``1 - eps``.

    Returns:
        ``(new_state, weight)``, where ``weight`` ``[S]`` is ``p^n``, the weight of this
        unit's output in the block output.
    """
    if halting_proba is None:
        if state is None:
            raise ValueError("the first call of halting_step needs halting_proba (shape of positions)")
        halting_proba = torch.ones_like(state.cumsum)
    if state is None:
        state = HaltingState.initial(halting_proba)
    # The recurrence runs in the state's dtype (at least float32), whatever the branch returned.
    halting_proba = halting_proba.to(state.cumsum.dtype)
    if halting_proba.shape != state.cumsum.shape:
        raise ValueError(
            f"halting_proba has shape {tuple(halting_proba.shape)}, expected {tuple(state.cumsum.shape)}"
        )
    cumsum = state.cumsum + halting_proba
    halted_now_or_before = cumsum >= 1.0 - eps  # `cur` in the reference
    h = torch.where(halted_now_or_before, torch.zeros_like(halting_proba), halting_proba)
    just_halted = halted_now_or_before & ~state.finished
    weight = torch.where(just_halted, state.remainder, h)
    ponder_increment = torch.where(
        halted_now_or_before,
        torch.where(just_halted, state.remainder, torch.zeros_like(h)),
        torch.ones_like(h),
    )
    new_state = HaltingState(
        cumsum=cumsum,
        finished=halted_now_or_before,
        remainder=state.remainder - h,
        ponder_cost=state.ponder_cost + ponder_increment,
        num_units=state.num_units + (~state.finished).long(),
    )
    return new_state, weight


def adaptive_computation_time(
    halting_probs: Tensor, eps: float = DEFAULT_EPS
) -> tuple[Tensor, Tensor, Tensor]:
    """ACT over ``U`` units from the halting probabilities of the first ``U - 1``.

    Args:
        halting_probs: ``[..., U-1]`` probabilities ``h^0 .. h^{U-2}`` in ``[0, 1]``
            (the last unit has no halting branch and always halts).
        eps: halting threshold is ``1 - eps`` (reference default 0.01).

    Returns:
        ``(ponder_cost [...], num_units [...] int64, halting_distribution [..., U])`` with
        ``ponder_cost = N + 1 + R`` (eq. (5)), ``num_units = N + 1`` and the
        distribution of eq. (3), which sums to 1 over the last dimension.
    """
    if halting_probs.dim() < 1:
        raise ValueError("halting_probs must have shape [..., U-1]")
    if not halting_probs.is_floating_point():
        raise ValueError(f"halting_probs must be floating point, got {halting_probs.dtype}")
    state = None
    weights = []
    num_halting = halting_probs.shape[-1]
    for n in range(num_halting + 1):
        h = halting_probs[..., n] if n < num_halting else None
        if state is None and h is None:  # U == 1: a single unit that always halts
            h = torch.ones_like(halting_probs.sum(-1))
        state, w = halting_step(state, h, eps=eps)
        weights.append(w)
    return state.ponder_cost, state.num_units, torch.stack(weights, dim=-1)
