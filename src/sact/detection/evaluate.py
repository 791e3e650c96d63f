"""Detection evaluation: detections, backbone FLOPs and ponder cost over a loader, COCO AP.

``evaluate`` scores the detections with pycocotools; :func:`evaluate_detector` does it for
a saved detector and :func:`score_detections` for a ready-made results json (the two
modes of ``sact detect eval``); :func:`run_evaluation` is that command as one call (with
``--watch``). It works unchanged under
``torchrun``: each rank runs its shard of the loader and the results of all ranks are
gathered on every rank. Training goes through the one training loop
(:mod:`sact.engine.train` with :class:`sact.detection.task.DetectionTask`).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .coco import coco_evaluate, to_coco_results
from ..engine.amp import autocast
from .detector import DetectorOutput

__all__ = ["evaluate", "predict", "evaluate_detector", "score_detections", "run_evaluation"]


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


@torch.no_grad()
def predict(detector: nn.Module, loader, *, device: torch.device | str = "cpu", progress: bool = True,
            max_batches: int | None = None, amp_dtype: torch.dtype | None = None) -> tuple[list[dict], dict[str, list[float]]]:
    """Run the detector over ``loader`` on this process.

    Args:
        detector: the detector (put in eval mode).
        loader: yields ``(images list, targets list)``.
        device: where to run.
        progress: tqdm bar.
        max_batches: stop after this many batches.
        amp_dtype: autocast dtype or None.

    Returns:
        ``(per image {"image_id", "boxes", "scores", "labels"} on CPU, per image stats
        {"flops", "ponder_cost"} lists, "seconds": [wall time of the forward passes]})``.
    """
    from tqdm.auto import tqdm

    device = torch.device(device)
    detector.eval()
    dets, stats = [], {"flops": [], "ponder_cost": [], "seconds": []}
    for b, (images, targets) in enumerate(tqdm(loader, desc="eval", leave=False, disable=not progress)):
        if max_batches is not None and b >= max_batches:
            break
        images = [im.to(device) for im in images]
        t0 = time.perf_counter()
        with autocast(device, amp_dtype):
            out: DetectorOutput = detector(images)
        if device.type == "cuda":
            torch.cuda.synchronize()
        stats["seconds"].append(time.perf_counter() - t0)
        stats["flops"] += out.backbone_flops.float().cpu().tolist()
        stats["ponder_cost"] += out.ponder_cost.float().cpu().tolist()
        for d, t in zip(out.detections, targets):
            dets.append({"image_id": int(t["image_id"]), **{k: v.cpu() for k, v in d.items()}})
    return dets, stats


def evaluate(detector: nn.Module, loader, dataset, *, device: torch.device | str = "cpu", progress: bool = True,
             max_batches: int | None = None, amp_dtype: torch.dtype | None = None) -> tuple[dict[str, float], list[dict]]:
    """COCO box AP plus backbone FLOPs and speed over ``loader`` (all ranks under torchrun).

    Args:
        detector: eval-mode detector (DDP wrapper allowed; its module is used).
        loader: over ``dataset`` (possibly a shard of it).
        dataset: the :class:`~sact.detection.CocoDetection` (ground truth, label mapping).
        device, progress, max_batches, amp_dtype: see :func:`predict`.

    Returns:
        ``(metrics, coco_results)``: metrics ``AP, AP50, AP75, APs, APm, APl,
        backbone_gflops_mean, backbone_gflops_std, ponder_cost_mean, images_per_s,
        num_images`` (``images_per_s`` counts the model's forward passes only, on this
        process); results as COCO json dicts.
    """
    dets, stats = predict(_unwrap(detector), loader, device=device, progress=progress, max_batches=max_batches,
                          amp_dtype=amp_dtype)
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


def score_detections(results_file: str | Path, image_dir: str | Path, ann_file: str | Path) -> dict[str, float]:
    """COCO box AP of a ready-made COCO results json (``sact detect eval --detections``).

    Raises:
        InputError: the file is not readable JSON, not a list, or names unknown images / categories.
    """
    import json

    from ..errors import InputError
    from .coco import CocoDetection

    dataset = CocoDetection(image_dir, ann_file)
    try:
        results = json.loads(Path(results_file).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read {results_file}: {e}") from e
    if not isinstance(results, list):
        raise InputError(f"{results_file} must hold a list of COCO result dicts")
    try:
        return coco_evaluate(dataset.coco, results, verbose=True)
    except ValueError as e:
        raise InputError(f"{results_file}: {e}") from e


def evaluate_detector(detector: nn.Module, image_dir: str | Path, ann_file: str | Path, *,
                      device: torch.device, batch_size: int = 8, workers: int = 0, in_chans: int | None = None,
                      use_sparse: bool = False, max_batches: int | None = None, amp_dtype: torch.dtype | None = None,
                      rank: int = 0, world_size: int = 1, progress: bool = True) -> tuple[dict, list[dict]]:
    """Evaluate a detector (e.g. from :func:`~sact.detection.load_detector`) on this rank's
    share of a COCO-format set (``sact detect eval``).

    Args:
        detector: the detector, on ``device``.
        image_dir, ann_file: the evaluation images and ``instances_*.json``.
        device: where to run.
        batch_size, workers: the loader's.
        in_chans: image channels (default: the checkpoint's).
        use_sparse: run the backbone through the sparse engine (:func:`~sact.detection.sparse_detector`).
        max_batches: stop after this many batches.
        amp_dtype: autocast dtype or None.
        rank, world_size: the shard of this process (``torchrun``).
        progress: tqdm bar.

    Returns:
        ``(metrics, coco_results)`` as :func:`evaluate`.
    """
    from ..engine.datasets import eval_loader
    from .coco import CocoDetection, collate

    dataset = CocoDetection(image_dir, ann_file, in_chans=in_chans or detector.backbone.in_chans)
    if use_sparse:
        from .sparse import sparse_detector

        detector = sparse_detector(detector)
    loader = eval_loader(dataset, batch_size, rank=rank, world_size=world_size, workers=workers, collate_fn=collate)
    return evaluate(detector, loader, dataset, device=device, progress=progress, max_batches=max_batches,
                    amp_dtype=amp_dtype)


def run_evaluation(*, checkpoint: str | Path | None = None, detections: str | Path | None = None,
                   watch: str | Path | None = None, data_dir: str | Path | None = None, val_split: str = "test",
                   val_images: str | Path | None = None, val_ann: str | Path | None = None, device: str = "auto",
                   amp: str = "none", batch_size: int = 8, workers: int = 0, in_chans: int | None = None,
                   use_sparse: bool = False, max_batches: int | None = None, out: str | Path | None = None,
                   overwrite: bool = False, poll_s: float = 30.0, watch_timeout_s: float | None = None) -> dict | None:
    """``sact detect eval``: score one of a saved detector (``checkpoint``, under ``torchrun``
    too), a COCO results json (``detections``) or each new checkpoint of a run (``watch``).

    The evaluation set is :func:`~sact.detection.task.coco_paths` of ``data_dir`` /
    ``val_split`` / ``val_images`` / ``val_ann``. Rank 0 writes ``out/metrics.json`` (and
    ``out/detections.json`` of a checkpoint); ``watch`` writes ``metrics_step<STEP>.json``
    into ``out`` (default ``watch/eval``, :func:`~sact.engine.watch.watch_checkpoints`).

    Returns:
        The metrics to report: None with ``watch`` and on the ranks other than 0.

    Raises:
        InputError: not exactly one source, counts or times out of range, no evaluation set,
            an unusable device or ``amp``, or a detections file that does not fit the set.
        OutputExistsError: a file in ``out`` exists and not ``overwrite`` (checked before any work).
        CheckpointError: a checkpoint that is not a detector saved by sact.
    """
    import contextlib

    from ..engine.amp import amp_dtype
    from ..engine.distributed import cleanup_distributed, is_rank_zero, local_rank, resolve_device, setup_distributed
    from ..errors import InputError
    from ..io.files import atomic_write_bytes, dumps_json, prepare_outputs
    from .coco import split_paths
    from .detector import load_detector

    if sum(x is not None for x in (checkpoint, detections, watch)) != 1:
        raise InputError("give exactly one of --checkpoint, --detections and --watch RUN_DIR")
    if batch_size < 1 or workers < 0 or (max_batches is not None and max_batches < 1):
        raise InputError(f"--batch-size and --max-batches must be >= 1 and --workers >= 0, got {batch_size}, "
                         f"{max_batches}, {workers}")
    if not poll_s > 0 or (watch_timeout_s is not None and not watch_timeout_s > 0):
        raise InputError(f"--poll and --watch-timeout must be > 0 seconds, got {poll_s}, {watch_timeout_s}")
    if watch is None and watch_timeout_s is not None:
        raise InputError("--watch-timeout needs --watch")
    images, ann = split_paths(data_dir, val_split, val_images, val_ann, split_key="val")
    out = None if out is None else Path(out)
    names = ("metrics.json", "detections.json") if checkpoint is not None else ("metrics.json",)
    writes = out is not None and watch is None and is_rank_zero()
    with prepare_outputs(out, files=names, overwrite=overwrite) if writes else contextlib.nullcontext():
        if detections is not None:
            metrics = score_detections(detections, images, ann)
            if out is not None:
                record = {"metrics": metrics, "detections": str(detections), "annotations": str(ann)}
                atomic_write_bytes(out / "metrics.json", dumps_json(record, indent=2).encode())
            return metrics
        run_device = resolve_device(device, local_rank())
        options = dict(device=run_device, batch_size=batch_size, workers=workers, in_chans=in_chans,
                       use_sparse=use_sparse, max_batches=max_batches, amp_dtype=amp_dtype(amp, run_device))
        if watch is not None:
            from ..engine.watch import watch_checkpoints

            def one(path: Path) -> tuple[dict, dict]:
                detector = load_detector(path, map_location=run_device)
                metrics, _ = evaluate_detector(detector, images, ann, progress=False, **options)
                return {"metrics": metrics, "checkpoint": str(path), "annotations": str(ann),
                        "use_sparse": bool(use_sparse)}, detector.checkpoint_meta

            watch_checkpoints(watch, one, out_dir=out or Path(watch) / "eval", poll_s=poll_s,
                              timeout_s=watch_timeout_s)
            return None
        info = setup_distributed(run_device)
        try:
            detector = load_detector(checkpoint, map_location=run_device)
            metrics, results = evaluate_detector(detector, images, ann, rank=info.rank, world_size=info.world_size,
                                                 progress=info.is_main, **options)
            if not info.is_main:
                return None
            if out is not None:
                record = {"metrics": metrics, "checkpoint": str(checkpoint), "annotations": str(ann),
                          "use_sparse": bool(use_sparse), "world_size": info.world_size}
                atomic_write_bytes(out / "metrics.json", dumps_json(record, indent=2).encode())
                atomic_write_bytes(out / "detections.json", dumps_json(results).encode())
            return metrics
        finally:
            cleanup_distributed(info)
