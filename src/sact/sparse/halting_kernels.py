"""Row kernels of halting branches: halting probabilities at a set of rows of the stage's buffer.

:class:`SparseSACTHalting` evaluates the standard SACT branch (3x3 local conv) at the
active rows; :class:`DenseHalting` runs any branch on the buffer's channels-last view and
reads the active rows. FLOPs are counted by the stage loop (the branches' ``flops``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..halting import SACTHalting
from . import native
from .refs import keep_ref
from .fold import bn_scale_shift, foldable_bn
from .rows import rows_view
from .rowset import RowSet

__all__ = ["SparseSACTHalting", "DenseHalting", "make_halting_kernel"]


class SparseSACTHalting(nn.Module):
    """:class:`~sact.halting.SACTHalting` (3x3 local conv) evaluated at the active rows.

    The local term is computed as nine per-row projections ``Z[q, k] = w_k . act(bn(x_q))``
    on the dilated rows (one ``addmm`` ``(rows, C) x (C, 9)``), then
    ``local[p] = sum_k Z[nbr[p, k], k]`` with ``Z[pad] = 0`` (zero padding after BN and
    activation, like the dense branch). With an identity activation BN is folded into the
    projections. The global term ``conv1x1(act(bn(mean)))`` uses the per-image channel sums
    ``S``, with its BN (and, for an identity activation, the whole term plus the local
    bias) folded into one small matrix product.
    """

    def __init__(self, branch: SACTHalting) -> None:
        super().__init__()
        keep_ref(self, "branch", branch)
        act = branch.local_act
        self.identity = isinstance(act, nn.Identity)
        self.slope = float(act.negative_slope) if isinstance(act, nn.LeakyReLU) else 0.0
        self.channels = branch.local_conv.in_channels
        for name in ("wz", "cz", "s", "t", "bias", "gw", "gc", "gs", "gt"):
            self.register_buffer(name, torch.empty(0), persistent=False)
        self.refresh()

    @staticmethod
    def supports(branch: nn.Module) -> bool:
        if not isinstance(branch, SACTHalting):
            return False
        conv = branch.local_conv
        return (
            foldable_bn(branch.local_bn)
            and foldable_bn(branch.global_bn)
            and type(branch.global_act) is type(branch.local_act)
            and isinstance(branch.local_act, (nn.Identity, nn.LeakyReLU, nn.ReLU))
            and getattr(branch.global_act, "negative_slope", None) == getattr(branch.local_act, "negative_slope", None)
            and branch.global_conv.bias is None
            and conv.kernel_size == (3, 3)
            and conv.padding == (1, 1)
            and conv.stride == (1, 1)
            and conv.dilation == (1, 1)
            and conv.groups == 1
        )

    @torch.no_grad()
    def refresh(self) -> None:
        """Re-fold the branch's current weights."""
        br = self.branch
        dt = br.local_conv.weight.dtype
        w = br.local_conv.weight.detach().double()[0].reshape(self.channels, 9)  # (C, 9), k = 3*ky + kx
        s, t = bn_scale_shift(br.local_bn)
        if self.identity:
            self.wz = (w * s[:, None]).to(dt)
            self.cz = (t @ w).to(dt)
        else:
            self.wz = w.to(dt)
            self.cz = torch.zeros(9, dtype=dt, device=w.device)
            self.s, self.t = s.to(dt), t.to(dt)
        b = br.local_conv.bias
        self.bias = (b.detach() if b is not None else torch.zeros(1, device=w.device)).to(dt).reshape(1)
        # global term g = conv1x1(act(s_g * mean + t_g)): identity -> mean @ (s_g w) + (t_g . w + bias)
        wg = br.global_conv.weight.detach().double().reshape(1, self.channels).t()  # (C, 1)
        sg, tg = bn_scale_shift(br.global_bn)
        acc = torch.float32 if dt in (torch.float16, torch.bfloat16) else dt  # S's dtype
        if self.identity:
            self.gw = (wg * sg[:, None]).to(acc)
            self.gc = (tg @ wg + self.bias.double()).to(acc)
        else:
            self.gw, self.gc = wg.to(acc), self.bias.to(acc)
            self.gs, self.gt = sg.to(acc), tg.to(acc)

    def _project(self, x: Tensor) -> Tensor:
        if self.identity:
            return torch.addmm(self.cz, x, self.wz)
        p = x * self.s + self.t
        p = F.leaky_relu_(p, self.slope) if self.slope else p.relu_()
        return p @ self.wz

    def run(self, X: Tensor, S: Tensor, rows: RowSet) -> Tensor:
        """``h (na,)``: halting probabilities at the active rows."""
        g = rows.geo
        # the global term plus the local conv's bias, per image [B] (in S's dtype)
        if self.identity:
            glob = torch.addmm(self.gc, S, self.gw, alpha=1.0 / g.hw).view(g.batch)
        else:
            a = torch.addcmul(self.gt, S, self.gs, value=1.0 / g.hw)
            a = F.leaky_relu_(a, self.slope) if self.slope else a.relu_()
            glob = torch.addmm(self.gc, a, self.gw).view(g.batch)
        if g.native:
            # s, t are empty when BN is folded into wz (identity activation); the kernel ignores them then.
            return native.halting_rows(X, rows.idx, rows.dilated, g.nbr, self.wz, self.cz, self.s, self.t, self.slope,
                                       self.identity, glob, g.hw)
        glob = glob.to(X.dtype)
        z = g.scratch(g.n + 1, 9, X, pad_row=True)
        dil = rows.dilated
        if dil.numel() == g.n:
            if self.identity:
                torch.addmm(self.cz, X[: g.n], self.wz, out=z[: g.n])
            else:
                z[: g.n] = self._project(X[: g.n])
        else:
            z.index_copy_(0, dil, self._project(X.index_select(0, dil)))
        cols = torch.arange(9, device=X.device)
        local = z.view(-1).index_select(0, (rows.nbr * 9 + cols).view(-1)).view(-1, 9).sum(1)  # bias is in glob
        if not rows.all_active:
            glob = glob.index_select(0, g.img.index_select(0, rows.idx))
        else:
            glob = glob.repeat_interleave(g.hw)
        h = torch.sigmoid(local + glob)
        return h


class DenseHalting(nn.Module):
    """Any halting branch: ``branch(x)`` on the buffer's view, read at the active rows."""

    def __init__(self, branch: nn.Module) -> None:
        super().__init__()
        keep_ref(self, "branch", branch)

    def refresh(self) -> None:
        """Nothing is folded."""

    def run(self, X: Tensor, S: Tensor, rows: RowSet) -> Tensor:
        """``h (na,)``: the branch on the buffer's view, read at the active rows."""
        g = rows.geo
        proba = self.branch(rows_view(X, g.batch, g.height, g.width)).reshape(-1)
        return proba if rows.all_active else proba.index_select(0, rows.idx)


def make_halting_kernel(branch: nn.Module) -> nn.Module:
    """Row kernel of a SACT halting branch (falls back to :class:`DenseHalting`)."""
    return SparseSACTHalting(branch) if SparseSACTHalting.supports(branch) else DenseHalting(branch)


