"""The training loop: ``train_one_epoch``, ``main(config)`` (torchvision-references style).

Loss (reference ``add_all_ponder_costs``): ``CE + tau * ponder_cost`` with the ponder
term left out for vanilla models; L2 regularisation is SGD weight decay on kernels.

Run folder ``config.out_dir``:

* ``model.safetensors`` + ``model.json`` -- the latest weights (:func:`sact.save_checkpoint`;
  meta: tau, step, metrics, preprocess, config, classes);
* ``train_state.pt`` -- everything needed to continue exactly (:mod:`.state`);
* ``config.yaml``, ``metrics.json`` (final evaluation), ``tb/`` (TensorBoard).

Resume is exact (bitwise on CPU) with ``workers=0`` at any step, and with worker
processes at epoch boundaries: the data order is a pure function of (seed, epoch), the
DataLoader draws its seeds from its own generator, and the RNG states of torch, numpy
and Python are restored.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import checkpoint as ckpt
from ..output import ModelOutput, ponder_loss
from .amp import amp_dtype as _amp_dtype
from .amp import autocast, grad_scaler
from .config import TrainConfig
from .datasets import build_datasets, eval_loader, spec_from_sets, steps_per_epoch, train_loader
from .distributed import DistInfo, all_reduce_sum, cleanup_distributed, resolve_device, setup_distributed
from .evaluate import evaluate
from .optim import build_optimizer, build_scheduler
from .state import STATE_FILE, load_train_state, rng_state, save_train_state, set_rng_state
from .warm_start import warm_start

__all__ = ["NonFiniteLossError", "compute_loss", "train_one_epoch", "main", "Run"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped before the bad update."""


def compute_loss(out: ModelOutput, labels: torch.Tensor, *, tau: float, mode: str, label_smoothing: float = 0.0):
    """``(total, cross_entropy)``: ``CE + tau * ponder_cost`` (no ponder term for vanilla).

    Args:
        out: model output (logits ``[B, K]``, ponder cost ``[B]``).
        labels: ``[B]`` int64.
    """
    ce = F.cross_entropy(out.logits.float(), labels, label_smoothing=label_smoothing)
    if mode == "vanilla":
        return ce, ce
    return ce + ponder_loss(out, tau), ce


@dataclass
class Run:
    """Mutable state of a run shared by the loop's helpers."""

    config: TrainConfig
    model: nn.Module  # possibly DDP-wrapped
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    device: torch.device
    amp: torch.dtype | None
    info: DistInfo
    total_steps: int
    steps_per_epoch: int
    data: object  # DataSpec
    step: int = 0
    writer: object = None
    last_saved_step: int | None = None
    last_metrics: dict | None = None

    @property
    def net(self) -> nn.Module:
        """The bare model (DDP unwrapped)."""
        return getattr(self.model, "module", self.model)

    @property
    def out_dir(self) -> Path:
        return Path(self.config.out_dir)


def _meta(run: Run) -> dict:
    return {
        "tau": run.config.tau if run.config.mode != "vanilla" else 0.0,
        "step": run.step,
        "metrics": run.last_metrics or {},
        "preprocess": run.data.preprocess,
        "config": run.config.to_dict(),
        "classes": run.data.classes,
    }


def save(run: Run) -> None:
    """Writes the training state, then the model checkpoint (rank 0 only)."""
    if not run.info.is_main:
        return
    state = {
        "model": run.net.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "step": run.step,
        "epoch": run.step // run.steps_per_epoch,
        "world_size": run.info.world_size,
        "rng": rng_state(),
        "config": run.config.to_dict(),
    }
    save_train_state(run.out_dir / STATE_FILE, state)
    ckpt.save_checkpoint(run.net, run.out_dir / "model", meta=_meta(run))
    run.last_saved_step = run.step


def _restore(run: Run, state: dict) -> None:
    saved = state["config"]
    for key in ("model", "mode", "model_kwargs", "dataset", "batch_size", "seed"):
        if saved.get(key) != getattr(run.config, key):
            raise ckpt.CheckpointError(
                f"cannot resume: {key}={getattr(run.config, key)!r} but the training state in {run.out_dir} has "
                f"{saved.get(key)!r}"
            )
    try:
        run.net.load_state_dict(state["model"])
    except RuntimeError as e:
        raise ckpt.CheckpointError(f"training state in {run.out_dir} does not fit the model: {e}") from e
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    run.step = int(state["step"])
    run.last_saved_step = run.step
    set_rng_state(state["rng"])


def _log_scalars(run: Run, prefix: str, values: dict) -> None:
    if run.writer is None:
        return
    for k, v in values.items():
        if isinstance(v, (int, float)) and math.isfinite(v):
            run.writer.add_scalar(f"{prefix}/{k}", v, run.step)


def run_eval(run: Run) -> dict:
    """Evaluates on the evaluation set (sharded over ranks); logs and returns the metrics."""
    if run.info.enabled:  # every shard uses rank 0's BatchNorm statistics (the checkpoint's)
        import torch.distributed as dist

        for b in run.net.buffers():
            dist.broadcast(b, 0)
    loader = eval_loader(run.data.eval, run.config.eval_batch_size, rank=run.info.rank, world_size=run.info.world_size,
                         workers=run.config.workers)
    metrics = evaluate(run.net, loader, device=run.device, tau=run.config.tau, amp_dtype=run.amp, info=run.info,
                       progress=run.config.progress)
    metrics["step"] = run.step
    run.last_metrics = metrics
    _log_scalars(run, "eval", {k: v for k, v in metrics.items() if k != "stages"})
    return metrics


def train_one_epoch(run: Run, loader, *, pbar=None, step_callback: Callable[[int, nn.Module], None] | None = None) -> None:
    """Trains on ``loader``'s batches until it ends or ``run.total_steps`` is reached.

    Raises:
        NonFiniteLossError: the loss of a step is NaN/inf on any rank (checked before
            the update, so the weights and the last checkpoint stay good).
    """
    cfg, model = run.config, run.model
    model.train()
    for images, labels in loader:
        if run.step >= run.total_steps:
            break
        images = images.to(run.device, non_blocking=True)
        labels = labels.to(run.device, non_blocking=True)
        with autocast(run.device, run.amp):
            out = model(images)
        loss, ce = compute_loss(out, labels, tau=cfg.tau, mode=cfg.mode, label_smoothing=cfg.label_smoothing)
        bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=run.device)
        if all_reduce_sum(bad, run.info).item() > 0:
            where = (f"the last good checkpoint is {run.out_dir / 'model.safetensors'} (step {run.last_saved_step})"
                     if run.last_saved_step is not None else "no checkpoint was written yet")
            raise NonFiniteLossError(
                f"non-finite loss ({loss.item()}) at step {run.step + 1} of {run.total_steps}; training stopped "
                f"before the update; {where}. Lower the learning rate or check the data."
            )
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.scheduler.step()
        run.step += 1
        if step_callback is not None:
            step_callback(run.step, run.net)
        if pbar is not None:
            pbar.update(1)
        if run.writer is not None and run.step % cfg.log_every == 0:
            acc = (out.logits.argmax(1) == labels).float().mean().item()
            _log_scalars(run, "train", {
                "loss": loss.item(), "cross_entropy": ce.item(), "accuracy": acc,
                "ponder_cost": out.ponder_cost.mean().item(), "flops": out.flops.double().mean().item(),
                "lr": run.optimizer.param_groups[0]["lr"],
            })
            if pbar is not None:
                pbar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.2f}")
        if (run.writer is not None and cfg.image_every and run.step % cfg.image_every == 0 and cfg.mode != "vanilla"):
            from ..viz import ponder_overlay_grid

            run.writer.add_image("ponder_maps", ponder_overlay_grid(images.float(), out.stages), run.step,
                                 dataformats="HWC")
        if cfg.eval_every and run.step % cfg.eval_every == 0 and run.step < run.total_steps:
            run_eval(run)
            model.train()
        if cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0:
            save(run)


def _build_model(config: TrainConfig, data) -> nn.Module:
    from ..models import create_model

    kwargs = {"num_classes": len(data.classes), "in_chans": data.in_chans, **config.model_kwargs}
    return create_model(config.model, mode=config.mode, **kwargs)


def main(
    config: TrainConfig,
    *,
    train_set=None,
    eval_set=None,
    step_callback: Callable[[int, nn.Module], None] | None = None,
) -> dict:
    """Trains (or resumes) the run described by ``config`` and evaluates the result.

    Args:
        config: the run's configuration.
        train_set: replaces the training dataset of ``config`` (items as :func:`collate` takes).
        eval_set: replaces the evaluation dataset.
        step_callback: called on every rank after each optimisation step with
            ``(step, bare model)`` (tests, custom monitoring).

    Returns:
        The final evaluation metrics (also in ``out_dir/metrics.json`` and the checkpoint).

    Raises:
        NonFiniteLossError: see :func:`train_one_epoch`.
        sact.CheckpointError: unreadable or mismatched warm-start / resume files.
    """
    from tqdm.auto import tqdm

    config = config.validate()
    device = resolve_device(config.device, int(os.environ.get("LOCAL_RANK", "0")))
    info = setup_distributed(device)
    try:
        if config.threads:
            torch.set_num_threads(config.threads)
        torch.manual_seed(config.seed)
        np.random.seed(config.seed)
        random.seed(config.seed)
        if train_set is not None and eval_set is not None:
            data = spec_from_sets(train_set, eval_set, config)
        else:
            data = build_datasets(config, train=train_set is None)
            data.train = train_set if train_set is not None else data.train
            data.eval = eval_set if eval_set is not None else data.eval
        model = _build_model(config, data)
        if config.init:
            warm_start(model, config.init)
        model.to(device)
        amp = _amp_dtype(config.amp, device)
        if info.enabled:
            model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        optimizer = build_optimizer(model, config)
        spe = steps_per_epoch(data.train, config, info.world_size)
        total = config.steps or config.epochs * spe
        run = Run(config, model, optimizer, build_scheduler(optimizer, total_steps=total, steps_per_epoch=spe, config=config),
                  grad_scaler(device, amp), device, amp, info, total, spe, data)
        state_path = run.out_dir / STATE_FILE
        if config.resume and state_path.exists():
            _restore(run, load_train_state(state_path))
        if info.is_main:
            import yaml

            ckpt.atomic_write_bytes(run.out_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False).encode())
            if config.tensorboard:
                from ..tb import summary_writer

                run.writer = summary_writer(run.out_dir / "tb")
        pbar = tqdm(total=total, initial=run.step, desc=f"train {config.model} {config.mode}",
                    disable=not (config.progress and info.is_main))
        while run.step < total:
            epoch = run.step // spe
            loader = train_loader(data.train, config, rank=info.rank, world_size=info.world_size, epoch=epoch,
                                  skip_batches=run.step - epoch * spe)
            train_one_epoch(run, loader, pbar=pbar, step_callback=step_callback)
            if run.step % spe == 0 or run.step >= total:
                save(run)  # epoch end: always resumable, whatever checkpoint_every says
        pbar.close()
        metrics = run_eval(run)
        if info.is_main:
            save(run)
            ckpt.atomic_write_bytes(run.out_dir / "metrics.json", json.dumps(metrics, indent=2).encode())
            if run.writer is not None:
                run.writer.close()
        return metrics
    finally:
        cleanup_distributed(info)
