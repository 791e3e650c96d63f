"""The detection training step, epoch loop and evaluation (short and visible on purpose).

``train_one_epoch`` is torchvision's ``references/detection`` loop plus the ponder term;
``evaluate`` collects detections, backbone FLOPs and ponder cost over a loader and scores
them with pycocotools. Both work unchanged under ``torchrun``: the loader is sharded by a
``DistributedSampler``, and ``evaluate`` gathers every rank's results on all ranks.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from .coco import coco_evaluate, to_coco_results
from .detector import DetectorOutput, detection_loss

__all__ = ["train_one_epoch", "evaluate", "predict"]


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def train_one_epoch(
    detector: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    *,
    tau: float,
    device: torch.device | str = "cpu",
    scheduler=None,
    max_steps: int | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """One pass over ``loader``: loss = detection losses + ``tau`` * ponder cost.

    Args:
        detector: an :class:`~sact.detection.SACTFasterRCNN` (or its DDP wrapper).
        loader: yields ``(images list, targets list)``.
        optimizer, scheduler: the scheduler (if any) steps after every batch.
        tau: ponder cost weight.
        max_steps: stop after this many batches.
        on_step: called with ``(step, logs)`` after each batch (TensorBoard, ...).
        progress: tqdm bar.

    Returns:
        Means over the epoch of every logged term (``loss``, ``loss_*``, ``ponder_cost``,
        ``backbone_flops``).

    Raises:
        FloatingPointError: on a non-finite loss (the batch's terms are in the message).
    """
    from tqdm.auto import tqdm

    detector.train()
    sums: dict[str, float] = {}
    steps = 0
    bar = tqdm(loader, desc="train", leave=False, disable=not progress, total=max_steps or len(loader))
    for images, targets in bar:
        images = [im.to(device) for im in images]
        targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
        out: DetectorOutput = detector(images, targets)
        loss, logs = detection_loss(out, tau)
        if not math.isfinite(logs["loss"]):
            raise FloatingPointError(f"non-finite loss at step {steps}: {logs}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        logs["backbone_flops"] = float(out.backbone_flops.float().mean())
        for k, v in logs.items():
            sums[k] = sums.get(k, 0.0) + v
        steps += 1
        bar.set_postfix(loss=f"{logs['loss']:.3f}", ponder=f"{logs['ponder_cost']:.2f}")
        if on_step is not None:
            on_step(steps, logs)
        if max_steps is not None and steps >= max_steps:
            break
    return {k: v / max(steps, 1) for k, v in sums.items()}


@torch.no_grad()
def predict(detector: nn.Module, loader, *, device: torch.device | str = "cpu", progress: bool = True,
            max_batches: int | None = None) -> tuple[list[dict], dict[str, list[float]]]:
    """Run the detector over ``loader`` on this process.

    Returns:
        ``(per image {"image_id", "boxes", "scores", "labels"} on CPU, per image stats
        {"flops", "ponder_cost"} lists, "seconds": [wall time of the forward passes]})``.
    """
    from tqdm.auto import tqdm

    detector.eval()
    dets, stats = [], {"flops": [], "ponder_cost": [], "seconds": []}
    for b, (images, targets) in enumerate(tqdm(loader, desc="eval", leave=False, disable=not progress)):
        if max_batches is not None and b >= max_batches:
            break
        images = [im.to(device) for im in images]
        t0 = time.perf_counter()
        out: DetectorOutput = detector(images)
        if torch.cuda.is_available() and str(device).startswith("cuda"):
            torch.cuda.synchronize()
        stats["seconds"].append(time.perf_counter() - t0)
        stats["flops"] += out.backbone_flops.float().cpu().tolist()
        stats["ponder_cost"] += out.ponder_cost.float().cpu().tolist()
        for d, t in zip(out.detections, targets):
            dets.append({"image_id": int(t["image_id"]), **{k: v.cpu() for k, v in d.items()}})
    return dets, stats


def evaluate(detector: nn.Module, loader, dataset, *, device: torch.device | str = "cpu", progress: bool = True,
             max_batches: int | None = None) -> tuple[dict[str, float], list[dict]]:
    """COCO box AP plus backbone FLOPs and speed over ``loader`` (all ranks under torchrun).

    Args:
        detector: eval-mode detector (DDP wrapper allowed; its module is used).
        loader: over ``dataset`` (possibly a shard of it).
        dataset: the :class:`~sact.detection.CocoDetection` (ground truth, label mapping).

    Returns:
        ``(metrics, coco_results)``: metrics ``AP, AP50, AP75, APs, APm, APl,
        backbone_gflops_mean, backbone_gflops_std, ponder_cost_mean, images_per_s,
        num_images`` (``images_per_s`` counts the model's forward passes only, on this
        process); results as COCO json dicts.
    """
    dets, stats = predict(_unwrap(detector), loader, device=device, progress=progress, max_batches=max_batches)
    if dist.is_available() and dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (dets, stats))
        dets = [d for g in gathered for d in g[0]]
        stats = {k: [v for g in gathered for v in g[1][k]] for k in stats}
        seconds = max(sum(g[1]["seconds"]) for g in gathered)  # ranks run in parallel
    else:
        seconds = sum(stats["seconds"])
    seen = {}
    for d in dets:  # DistributedSampler pads with repeats; keep one copy per image
        seen.setdefault(d["image_id"], d)
    dets = list(seen.values())
    ids = [d["image_id"] for d in dets]
    results = to_coco_results(dets, ids, dataset.label_to_category)
    metrics = coco_evaluate(dataset.coco, results, image_ids=sorted(set(ids)))
    flops = torch.tensor(stats["flops"], dtype=torch.float64)
    metrics.update(
        backbone_gflops_mean=float(flops.mean() / 1e9) if len(flops) else float("nan"),
        backbone_gflops_std=float(flops.std(unbiased=False) / 1e9) if len(flops) else float("nan"),
        ponder_cost_mean=float(torch.tensor(stats["ponder_cost"]).mean()) if stats["ponder_cost"] else float("nan"),
        images_per_s=len(stats["flops"]) / seconds if seconds > 0 else float("nan"),
        num_images=len(ids),
    )
    return metrics, results
