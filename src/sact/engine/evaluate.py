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
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DataError
from .amp import autocast
from .distributed import DistInfo, all_reduce_sum

__all__ = ["evaluate"]


class _Moments:
    """Running count / sum / sum of squares of several named per-image quantities."""

    def __init__(self) -> None:
        self.sums: dict[str, list[float]] = {}

    def add(self, name: str, values: torch.Tensor) -> None:
        v = values.detach().double().cpu()
        s = self.sums.setdefault(name, [0.0, 0.0])
        s[0] += float(v.sum())
        s[1] += float((v * v).sum())

    def reduce(self, info: DistInfo, device: torch.device) -> dict[str, tuple[float, float]]:
        names = sorted(self.sums)
        t = torch.tensor([x for n in names for x in self.sums[n]], dtype=torch.float64)
        if info.enabled:
            t = all_reduce_sum(t.to(device), info).cpu()
        return {n: (float(t[2 * i]), float(t[2 * i + 1])) for i, n in enumerate(names)}


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
    moments = _Moments()
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
        moments.add("ce", F.cross_entropy(logits, labels, reduction="none"))
        moments.add("top1", (logits.argmax(1) == labels).float())
        if logits.shape[1] > 5:
            top5 = logits.topk(5, dim=1).indices
            moments.add("top5", (top5 == labels[:, None]).any(1).float())
        moments.add("flops", out.flops.double())
        moments.add("ponder", out.ponder_cost.float())
        for i, s in enumerate(out.stages):
            moments.add(f"stage{i}_ponder", s.ponder_cost.float())
            moments.add(f"stage{i}_units", s.num_units_mean.float())
            moments.add(f"stage{i}_flops", s.flops.double())
            moments.add(f"stage{i}_positions", torch.tensor([float(s.num_units.numel())]))
            moments.add(f"stage{i}_ponder_pos", s.ponder_map.float().flatten())
            moments.add(f"stage{i}_units_pos", s.num_units.float().flatten())
        _add_num_units_hist(hists, out.stages)
        count += images.shape[0]
    counts = all_reduce_sum(torch.tensor([float(count), float(skipped)], dtype=torch.float64, device=device), info)
    n, skipped = int(counts[0].item()), int(counts[1].item())
    if skipped and info.is_main:
        warnings.warn(f"{skipped} unreadable image(s) were skipped in the evaluation (each named above)", stacklevel=2)
    if n == 0:
        raise DataError("evaluation set is empty" + (f" ({skipped} unreadable images skipped)" if skipped else ""))
    sums = moments.reduce(info, device)
    hists = _reduce_hists(hists, model, info, device)
    wall = time.perf_counter() - start
    model.train(was_training)
    ce, _ = _mean_std(sums["ce"], n)
    ponder, ponder_std = _mean_std(sums["ponder"], n)
    flops, flops_std = _mean_std(sums["flops"], n)
    metrics = {"num_images": n, "skipped_images": skipped, "top1": sums["top1"][0] / n}
    if "top5" in sums:
        metrics["top5"] = sums["top5"][0] / n
    metrics.update({
        "loss": ce,
        "total_loss": ce + (tau * ponder if mode != "vanilla" else 0.0),
        "ponder_cost_mean": ponder,
        "ponder_cost_std": ponder_std,
        "flops_mean": flops,
        "flops_std": flops_std,
        "stages": [],
    })
    stage_ids = sorted({int(k[5:].split("_")[0]) for k in sums if k.startswith("stage")})
    for i in stage_ids:
        pm, ps = _mean_std(sums[f"stage{i}_ponder"], n)
        um, us = _mean_std(sums[f"stage{i}_units"], n)
        fm, fs = _mean_std(sums[f"stage{i}_flops"], n)
        positions = sums[f"stage{i}_positions"][0]
        _, ps_pos = _mean_std(sums[f"stage{i}_ponder_pos"], positions)
        _, us_pos = _mean_std(sums[f"stage{i}_units_pos"], positions)
        metrics["stages"].append({"ponder_cost_mean": pm, "ponder_cost_std": ps, "ponder_cost_std_positions": ps_pos,
                                  "num_units_mean": um, "num_units_std": us, "num_units_std_positions": us_pos,
                                  "flops_mean": fm, "flops_std": fs})
        if i < len(hists):
            metrics["stages"][-1]["num_units_hist"] = hists[i]
    metrics["wall_time_s"] = wall
    metrics["images_per_s"] = n / wall if wall > 0 else float("nan")
    return metrics
