"""Evaluation: accuracy, loss, FLOPs and ponder statistics over a dataset.

Statistics are accumulated as sums and sums of squares (float64) and summed over
ranks, so the result does not depend on the batch size or the number of processes.
Standard deviations are population std (as the reference's streaming covariance, up to
the ``n / (n - 1)`` factor):

* ``*_std`` (whole model, and per stage ``ponder_cost_std`` / ``num_units_std``): over
  images, of each image's value (its mean over positions);
* per stage ``ponder_cost_std_positions`` / ``num_units_std_positions``: over *all
  positions* of all images -- the reference's per-block ``moments_metric_map`` on the
  ``[B, H, W]`` maps, which also counts the spread inside an image (an ACT stage, constant
  over an image, has the same std both ways);
* per stage ``flops_mean`` / ``flops_std``: the stage's FLOPs (units and halting
  branches) per image, as the reference's per-block ``flops_metric_map``.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DataError
from ..engine.amp import autocast
from ..engine.distributed import DistInfo, all_reduce_sum

__all__ = ["evaluate"]


@dataclass
class Moment:
    """Running count, sum and sum of squares of one quantity (float64, summed over ranks)."""

    count: float = 0.0
    sum: float = 0.0
    sumsq: float = 0.0

    def add(self, values: torch.Tensor) -> None:
        """Adds every element of ``values`` (any shape)."""
        v = values.detach().double().cpu()
        self.count += v.numel()
        self.sum += float(v.sum())
        self.sumsq += float((v * v).sum())

    def mean_std(self, n: float) -> tuple[float, float]:
        """Mean and population std over ``n`` values."""
        return _mean_std((self.sum, self.sumsq), n)


@dataclass
class StageMoments:
    """One stage's quantities: per image (``ponder``, ``units``, ``flops``) and per position."""

    ponder: Moment = field(default_factory=Moment)
    units: Moment = field(default_factory=Moment)
    flops: Moment = field(default_factory=Moment)
    ponder_pos: Moment = field(default_factory=Moment)
    units_pos: Moment = field(default_factory=Moment)

    def add(self, s) -> None:
        """Adds a :class:`~sact.stage.StageOutput` of a batch."""
        self.ponder.add(s.ponder_cost.float())
        self.units.add(s.num_units_mean.float())
        self.flops.add(s.flops.double())
        self.ponder_pos.add(s.ponder_map.float().flatten())
        self.units_pos.add(s.num_units.float().flatten())

    def metrics(self, n: int) -> dict:
        pm, ps = self.ponder.mean_std(n)
        um, us = self.units.mean_std(n)
        fm, fs = self.flops.mean_std(n)
        _, ps_pos = self.ponder_pos.mean_std(self.ponder_pos.count)
        _, us_pos = self.units_pos.mean_std(self.units_pos.count)
        return {"ponder_cost_mean": pm, "ponder_cost_std": ps, "ponder_cost_std_positions": ps_pos,
                "num_units_mean": um, "num_units_std": us, "num_units_std_positions": us_pos,
                "flops_mean": fm, "flops_std": fs}


@dataclass
class EvalMoments:
    """Everything :func:`evaluate` accumulates, per image unless named ``_pos``."""

    num_stages: int
    ce: Moment = field(default_factory=Moment)
    top1: Moment = field(default_factory=Moment)
    top5: Moment = field(default_factory=Moment)  # empty with 5 classes or fewer
    flops: Moment = field(default_factory=Moment)
    ponder: Moment = field(default_factory=Moment)
    stages: list[StageMoments] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.stages = [StageMoments() for _ in range(self.num_stages)]

    def _all(self) -> list[Moment]:
        """Every moment in a fixed order (the same on every rank)."""
        return [self.ce, self.top1, self.top5, self.flops, self.ponder,
                *(m for s in self.stages for m in (s.ponder, s.units, s.flops, s.ponder_pos, s.units_pos))]

    def reduce(self, info: DistInfo, device: torch.device) -> None:
        """Sums every moment over the ranks (in place)."""
        if not info.enabled:
            return
        moments = self._all()
        t = torch.tensor([x for m in moments for x in (m.count, m.sum, m.sumsq)], dtype=torch.float64)
        t = all_reduce_sum(t.to(device), info).cpu().view(-1, 3).tolist()
        for m, (c, s_, q) in zip(moments, t):
            m.count, m.sum, m.sumsq = c, s_, q


def _mean_std(sums: tuple[float, float], n: float) -> tuple[float, float]:
    mean = sums[0] / n
    return mean, math.sqrt(max(0.0, sums[1] / n - mean * mean))


def _add_num_units_hist(hists: list[torch.Tensor], stages) -> None:
    """Adds each stage's ``num_units`` ``[B, h, w]`` counts to ``hists`` (int64, index k = k + 1 units)."""
    for i, s in enumerate(stages):
        counts = torch.bincount(s.num_units.detach().reshape(-1).long().cpu())[1:]
        if i == len(hists):
            hists.append(torch.zeros(0, dtype=torch.int64))
        n = max(len(hists[i]), len(counts))
        hists[i] = F.pad(hists[i], (0, n - len(hists[i]))) + F.pad(counts, (0, n - len(counts)))


def _reduce_hists(hists: list[torch.Tensor], model: nn.Module, info: DistInfo, device: torch.device) -> list[list[int]]:
    """Per stage, the counts of positions that ran 1..U units (``U``: the stage's units), summed over ranks."""
    stages = getattr(getattr(model, "module", model), "stages", None)
    out = []
    for i in range(len(stages) if stages is not None else len(hists)):  # every rank reduces every stage
        h = hists[i] if i < len(hists) else torch.zeros(0, dtype=torch.int64)
        units = len(stages[i].units) if stages is not None else len(h)
        h = F.pad(h, (0, max(0, units - len(h))))
        if info.enabled:
            h = all_reduce_sum(h.double().to(device), info).cpu().long()
        out.append([int(c) for c in h])
    return out


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    device: torch.device | str = "cpu",
    tau: float = 0.0,
    amp_dtype: torch.dtype | None = None,
    info: DistInfo = DistInfo(),
    progress: bool = False,
) -> dict:
    """Evaluates ``model`` on ``(images [B, C, H, W], labels [B])`` batches.

    Args:
        model: an sact model (its mode decides whether ponder cost enters the total loss).
        loader: batches; with several processes each rank passes its own shard.
        device: where to run.
        tau: ponder weight for ``total_loss``.
        amp_dtype: autocast dtype or None.
        info: the process group (sums are all-reduced over ranks).
        progress: show a tqdm bar (rank 0 only).

    Returns:
        ``{"num_images", "skipped_images" (unreadable, left out), "top1", "top5" (only with more than 5 classes), "loss" (mean
        cross entropy), "total_loss" (+ tau * ponder cost unless vanilla),
        "ponder_cost_mean", "ponder_cost_std", "flops_mean", "flops_std",
        "stages": [{"ponder_cost_mean", "ponder_cost_std", "ponder_cost_std_positions",
        "num_units_mean", "num_units_std", "num_units_std_positions", "flops_mean",
        "flops_std", "num_units_hist"}], "images_per_s", "wall_time_s"}``; accuracies are
        fractions; std definitions in the module docstring; ``num_units_hist[k]`` counts the
        positions (over all images) that ran ``k + 1`` units of the stage (what ``sact plot`` draws).
    """
    from tqdm.auto import tqdm

    device = torch.device(device)
    was_training = model.training
    model.eval()
    mode = getattr(getattr(model, "module", model), "mode", "sact")
    stages = getattr(getattr(model, "module", model), "stages", None)
    moments = EvalMoments(len(stages) if stages is not None else 0)
    hists: list[torch.Tensor] = []  # per stage: positions that ran 1, 2, ... units (summed over images)
    count = skipped = 0
    start = time.perf_counter()
    for batch in tqdm(loader, desc="eval", leave=False, disable=not (progress and info.is_main)):
        images, labels = batch[0], batch[1]
        skipped += getattr(batch, "skipped", 0)  # unreadable images (each named in a warning)
        if images.shape[0] == 0:
            continue
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            out = model(images)
        logits = out.logits.float()
        moments.ce.add(F.cross_entropy(logits, labels, reduction="none"))
        moments.top1.add((logits.argmax(1) == labels).float())
        if logits.shape[1] > 5:
            top5 = logits.topk(5, dim=1).indices
            moments.top5.add((top5 == labels[:, None]).any(1).float())
        moments.flops.add(out.flops.double())
        moments.ponder.add(out.ponder_cost.float())
        if len(moments.stages) < len(out.stages):  # a model without ``stages``: grow with the output
            moments.stages += [StageMoments() for _ in range(len(out.stages) - len(moments.stages))]
        for acc, s in zip(moments.stages, out.stages):
            acc.add(s)
        _add_num_units_hist(hists, out.stages)
        count += images.shape[0]
    counts = all_reduce_sum(torch.tensor([float(count), float(skipped)], dtype=torch.float64, device=device), info)
    n, skipped = int(counts[0].item()), int(counts[1].item())
    if skipped and info.is_main:
        warnings.warn(f"{skipped} unreadable image(s) were skipped in the evaluation (each named above)", stacklevel=2)
    if n == 0:
        raise DataError("evaluation set is empty" + (f" ({skipped} unreadable images skipped)" if skipped else ""))
    moments.reduce(info, device)
    hists = _reduce_hists(hists, model, info, device)
    wall = time.perf_counter() - start
    model.train(was_training)
    ce, _ = moments.ce.mean_std(n)
    ponder, ponder_std = moments.ponder.mean_std(n)
    flops, flops_std = moments.flops.mean_std(n)
    metrics = {"num_images": n, "skipped_images": skipped, "top1": moments.top1.sum / n}
    if moments.top5.count:
        metrics["top5"] = moments.top5.sum / n
    metrics.update({
        "loss": ce,
        "total_loss": ce + (tau * ponder if mode != "vanilla" else 0.0),
        "ponder_cost_mean": ponder,
        "ponder_cost_std": ponder_std,
        "flops_mean": flops,
        "flops_std": flops_std,
        "stages": [],
    })
    for i, acc in enumerate(moments.stages):
        if acc.ponder.count:  # stages the model ran
            metrics["stages"].append(acc.metrics(n))
            if i < len(hists):
                metrics["stages"][-1]["num_units_hist"] = hists[i]
    metrics["wall_time_s"] = wall
    metrics["images_per_s"] = n / wall if wall > 0 else float("nan")
    return metrics
