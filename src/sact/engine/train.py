"""The training loop: ``train_one_epoch``, ``main(config)`` (torchvision-references style).

One loop for every task: what differs between classification and detection (the data,
the network, the loss of a batch, the metrics) is a :class:`~sact.engine.tasks.Task`
picked by ``config.task``; everything else below is shared.

Loss (reference ``add_all_ponder_costs``): classification ``CE + tau * ponder_cost``
with the ponder term left out for vanilla models; detection ``sum(detection losses) +
tau * ponder_cost``. L2 regularisation is SGD weight decay on kernels.

Run folder ``config.out_dir``:

* ``model.safetensors`` + ``model.json`` -- the latest weights (:func:`sact.save_checkpoint`;
  meta: tau, step, metrics, preprocess, config, classes; a detector also carries its
  arguments, :func:`sact.detection.load_detector`);
* ``train_state.safetensors`` -- everything needed to continue exactly (:mod:`.state`);
* ``config.yaml``, ``metrics.json`` (final evaluation, strict JSON), ``tb/`` (TensorBoard).

A folder holding a previous run is never silently reused: :func:`main` refuses unless
``config.resume`` (continue it: the training state must exist and every setting outside
:data:`~sact.engine.config.RESUME_MAY_CHANGE` must match) or ``config.overwrite``
(its files, :data:`RUN_FILES` and ``tb/events.out.tfevents.*``, are removed first). One
process at a time writes a run folder (:func:`sact.io.files.prepare_outputs` holds its lock).

Progress: every ``log_every`` steps the means since the previous report
of the task's training scalars (:meth:`~sact.engine.tasks.Task.train_logs`: loss, top-1,
ponder cost, FLOPs and their ratio to the vanilla network's) and the learning rate go to
TensorBoard (``train/...``) and the progress bar, or, when no bar is shown
(``progress: false`` or stderr not a terminal), to a line on stderr (rank 0 only):
``step 150/3000  loss 1.234  top1 56.2%  ponder 3.41  flops 61.2%  lr 0.05  12.3 it/s``.

After every optimisation step the parameters and buffers are checked (on every rank):
a NaN / inf stops the run before anything is saved, so the checkpoint on disk is always
the last finite one.

Resume is exact (bitwise on CPU) with ``workers=0`` at any step, and with worker
processes at epoch boundaries: the data order is a pure function of (seed, epoch), the
DataLoader draws its seeds from its own generator, and the RNG states of torch, numpy
and Python are restored.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import DataError, InputError, OutputExistsError, RunFailure
from ..io.checkpoint import CheckpointError, read_safetensors_header
from ..io.files import atomic_write_bytes, check_output_folder, dumps_json, prepare_outputs
from ..models.loading import save_checkpoint
from .amp import amp_dtype as _amp_dtype
from .amp import grad_scaler, training_memory_format
from .config import TrainConfig
from .datasets import eval_loader, steps_per_epoch, train_loader
from .distributed import (DistInfo, all_reduce_sum, cleanup_distributed, is_rank_zero, local_rank, resolve_device,
                          setup_distributed)
from .optim import build_optimizer, build_scheduler
from .state import (LEGACY_STATE_FILE, STATE_FILE, legacy_state_message, load_train_state, rng_state,
                    save_train_state, set_rng_state)
from .tasks import Task, compute_loss, get_task

__all__ = ["NonFiniteLossError", "compute_loss", "train_one_epoch", "main", "Run", "RUN_FILES", "prepare_run_folder",
           "TrainLog", "format_logs"]

#: The files ``sact train`` writes into its run folder (besides ``tb/``).
RUN_FILES = ("model.safetensors", "model.json", STATE_FILE, LEGACY_STATE_FILE, "config.yaml", "metrics.json")


class NonFiniteLossError(RunFailure):
    """The loss or the weights became NaN or infinite; training stopped and nothing of
    the bad step was saved (exit 1)."""


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
    task: Task = None
    step: int = 0
    writer: object = None
    last_saved_step: int | None = None
    last_metrics: dict | None = None
    skipped: int = 0  # unreadable training images left out

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
        "input_size": list(run.data.input_size) if run.data.input_size else None,  # (C, H, W) trained at
        "config": run.config.to_dict(),
        "classes": run.data.classes,
        **run.task.meta(run.data),
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
    save_checkpoint(run.net, run.out_dir / "model", meta=_meta(run))
    run.last_saved_step = run.step


def check_resume_config(config: TrainConfig, saved: dict) -> None:
    """Refuses a resume whose settings differ from the saved run's.

    Raises:
        InputError: listing every differing field (``name: saved -> now``).
    """
    diffs = config.differences(saved)
    if diffs:
        raise InputError(
            f"cannot resume the run in {config.out_dir}: these settings differ from the saved run: {'; '.join(diffs)} "
            "(only steps, epochs, logging, evaluation, device, threads and workers may change on --resume; "
            "start a new run with another --out or --overwrite)"
        )


def _same_structure(fresh, loaded, where: str) -> None:
    """Scheduler / scaler states: the same keys as this run's, of plain value types."""
    if not isinstance(loaded, dict) or set(loaded) - set(fresh):
        raise CheckpointError(f"malformed {where} state in the training state: keys {sorted(map(str, loaded))}")
    for k, v in loaded.items():
        vals = v if isinstance(v, list) else [v]
        if not all(x is None or isinstance(x, (bool, int, float, str)) for x in vals):
            raise CheckpointError(f"malformed {where} state in the training state: {k}={v!r}")


def _restore(run: Run, state: dict, path: Path) -> None:
    check_resume_config(run.config, state["config"])
    try:
        run.net.load_state_dict(state["model"])
        own = dict(enumerate(p for g in run.optimizer.param_groups for p in g["params"]))
        opt = state["optimizer"]
        for pid, entry in opt.get("state", {}).items():
            for name, value in entry.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and (
                        pid not in own or value.shape != own[pid].shape):
                    raise ValueError(f"optimizer state {pid}.{name} has shape {tuple(value.shape)}")
        run.optimizer.load_state_dict(opt)
        _same_structure(run.scheduler.state_dict(), state["scheduler"], "scheduler")
        run.scheduler.load_state_dict(state["scheduler"])
        _same_structure(run.scaler.state_dict() or state["scaler"], state["scaler"], "gradient scaler")
        run.scaler.load_state_dict(state["scaler"])
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"training state {path} does not fit this run: {' '.join(str(e).split())}") from e
    run.step = int(state["step"])
    run.last_saved_step = run.step
    set_rng_state(state["rng"])


def _saved_config(path: Path) -> dict:
    """The config stored in a training state, read from its header only."""
    from .state import _decode

    meta = read_safetensors_header(path).get("__metadata__") or {}
    try:
        config = _decode(json.loads(meta["state"])["config"], {})
    except (KeyError, TypeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path} is not an sact training state: {e}") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: malformed config in the training state")
    return config


def _previous_run(out: Path) -> list[str]:
    found = [name for name in RUN_FILES if (out / name).exists()]
    tb = out / "tb"
    if tb.is_dir() and any(tb.glob("events.out.tfevents.*")):
        found.append("tb/")
    return found


def prepare_run_folder(config: TrainConfig, *, clear: bool = True) -> None:
    """Applies the run-folder rules before any work (rank 0 only; see the module docstring).

    Args:
        config: the run's config (``out_dir``, ``resume``, ``overwrite``).
        clear: with ``overwrite``, remove the previous run's files (False: only check).

    Raises:
        OutputExistsError: ``out_dir`` is a file, or holds a previous run without
            ``resume`` / ``overwrite``.
        InputError: ``resume`` without a training state, or settings that differ from it.
        CheckpointError: a legacy pickle state, or a malformed one.
    """
    out = Path(config.out_dir)
    check_output_folder(out)
    state = out / STATE_FILE
    if config.resume:
        if not state.exists():
            if (out / LEGACY_STATE_FILE).exists():
                raise CheckpointError(legacy_state_message(out / LEGACY_STATE_FILE))
            raise InputError(f"--resume, but {out} holds no training state ({STATE_FILE}); nothing to continue "
                             "(drop --resume to start a new run)")
        check_resume_config(config, _saved_config(state))
        return
    previous = _previous_run(out)
    if not previous:
        return
    if not config.overwrite:
        raise OutputExistsError(
            f"{out} holds a previous run ({', '.join(previous)}); pass --resume to continue it, --overwrite to "
            "replace it, or choose another --out"
        )
    if not clear:
        return
    for name in RUN_FILES:
        if (out / name).is_file():
            (out / name).unlink()
    for f in (out / "tb").glob("events.out.tfevents.*") if (out / "tb").is_dir() else ():
        if f.is_file():
            f.unlink()


def _all_finite(module: nn.Module) -> torch.Tensor:
    """0-dim bool tensor: every floating-point parameter and buffer of ``module`` is finite."""
    ts = [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
    if not ts:
        return torch.tensor(True)
    peaks = torch._foreach_norm([t.detach() for t in ts], math.inf)  # max |x|: NaN / inf if any entry is
    return torch.stack(peaks).isfinite().all()


def _log_scalars(run: Run, prefix: str, values: dict) -> None:
    if run.writer is None:
        return
    for k, v in values.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            run.writer.add_scalar(f"{prefix}/{k}", v, run.step)
        elif k == "stages" and isinstance(v, list):  # per-stage metrics, as the reference's per-block summaries
            for i, stage in enumerate(v):
                _log_scalars(run, f"{prefix}/stage{i + 1}", stage)


#: What the progress bar and the log lines show of the reported means: (key, label, format).
_SHOWN = (
    ("loss", "loss", "{:.3f}"),
    ("accuracy", "top1", "{:.1%}"),
    ("ponder_cost", "ponder", "{:.2f}"),
    ("flops_ratio", "flops", "{:.1%}"),
    ("lr", "lr", "{:.3g}"),
)


def format_logs(values: dict[str, float]) -> dict[str, str]:
    """``{label: text}`` of the entries of ``values`` that progress reports show, in their order
    (``{"loss": 1.2345, "accuracy": 0.5}`` -> ``{"loss": "1.234", "top1": "50.0%"}``)."""
    return {label: fmt.format(values[key]) for key, label, fmt in _SHOWN if key in values}


class TrainLog:
    """Running means of a task's training scalars, reported every ``log_every`` steps.

    :meth:`add` sums each step's 0-dim tensors where they are (no sync per step);
    :meth:`report` reads their means since the previous report in one transfer, adds the
    FLOPs ratio (``flops / vanilla_flops``, when both are known) and the learning rate,
    logs them to TensorBoard, shows them in the bar's postfix or, with ``lines``, prints
    ``step S/T  loss ...  12.3 it/s`` on stderr.

    Args:
        bar: the tqdm bar (updated every step) or None.
        vanilla_flops: FLOPs of one image through the vanilla network (None: no ratio).
        lines: print a line at each report (when no bar is shown).
    """

    def __init__(self, bar=None, *, vanilla_flops: int | None = None, lines: bool = False) -> None:
        self.bar, self.vanilla_flops, self.lines = bar, vanilla_flops, lines
        self._restart()

    def _restart(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.steps = 0
        self.since = time.perf_counter()

    def add(self, values: dict[str, Tensor]) -> None:
        """Adds one step's scalars (0-dim tensors)."""
        for k, v in values.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.steps += 1
        if self.bar is not None:
            self.bar.update(1)

    def means(self) -> dict[str, float]:
        """The means since the previous report, with ``flops_ratio`` (one device-to-host copy)."""
        if not self.steps:
            return {}
        means = dict(zip(self.sums, (torch.stack(list(self.sums.values())) / self.steps).tolist()))
        if self.vanilla_flops and "flops" in means:
            means["flops_ratio"] = means["flops"] / self.vanilla_flops
        return means

    def report(self, run: Run) -> None:
        """Logs, shows or prints the means since the previous report, and starts the next."""
        if not self.steps:
            return
        values = {**self.means(), "lr": run.optimizer.param_groups[0]["lr"]}
        rate = self.steps / max(time.perf_counter() - self.since, 1e-9)
        _log_scalars(run, "train", values)
        shown = format_logs(values)
        if self.bar is not None:
            self.bar.set_postfix(shown, refresh=False)
        if self.lines:
            fields = "  ".join(f"{label} {text}" for label, text in shown.items())
            print(f"step {run.step}/{run.total_steps}  {fields}  {rate:.1f} it/s", file=sys.stderr, flush=True)
        self._restart()


def run_eval(run: Run) -> dict:
    """Evaluates on the evaluation set (sharded over ranks); logs and returns the metrics."""
    if run.info.enabled:  # every shard uses rank 0's BatchNorm statistics (the checkpoint's)
        import torch.distributed as dist

        for b in run.net.buffers():
            dist.broadcast(b, 0)
    loader = eval_loader(run.data.eval, run.config.eval_batch_size, rank=run.info.rank, world_size=run.info.world_size,
                         workers=run.config.workers, collate_fn=run.task.collate)
    metrics = run.task.evaluate(run.net, loader, config=run.config, data=run.data, device=run.device, amp=run.amp,
                                info=run.info, progress=run.config.progress and run.info.is_main)
    metrics["step"] = run.step
    metrics["world_size"] = run.info.world_size
    run.last_metrics = metrics
    _log_scalars(run, "eval", {k: v for k, v in metrics.items() if k not in ("step", "world_size")})
    return metrics


def train_one_epoch(run: Run, loader, *, log: TrainLog | None = None,
                    step_callback: Callable[[int, nn.Module], None] | None = None) -> None:
    """Trains on ``loader``'s batches until it ends or ``run.total_steps`` is reached.

    ``log`` (rank 0's) receives every step's :meth:`~sact.engine.tasks.Task.train_logs`
    and reports them every ``log_every`` steps.

    Raises:
        NonFiniteLossError: the loss of a step is NaN/inf on any rank (checked before
            the update), or the weights are after the update (checked on every rank
            before anything is saved): the last checkpoint on disk stays the last
            finite one.
    """
    cfg, model, task = run.config, run.model, run.task
    model.train()
    for batch in loader:
        if run.step >= run.total_steps:
            break
        run.skipped += getattr(batch, "skipped", 0)  # unreadable images, each named in a warning
        size = len(batch[0])
        if size == 0 or (getattr(batch, "skipped", 0) and size < 2):
            # nothing (or, after skipping, one image: BatchNorm needs two) left to train on
            if run.info.enabled:  # the other ranks would wait for this one's gradients
                raise DataError(f"the unreadable images of a batch (named above) left fewer than 2 at step "
                                f"{run.step + 1}")
            continue
        step = task.step(model, batch, cfg, device=run.device, amp=run.amp)
        loss = step.loss
        bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=run.device)
        if all_reduce_sum(bad, run.info).item() > 0:
            raise NonFiniteLossError(
                f"non-finite loss ({loss.item()}) at step {run.step + 1} of {run.total_steps}; training stopped "
                f"before the update; {_last_good(run)}. Lower the learning rate or check the data."
            )
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.scheduler.step()
        bad = (~_all_finite(run.net)).float().reshape(1).to(run.device)
        if all_reduce_sum(bad, run.info).item() > 0:
            raise NonFiniteLossError(
                f"non-finite weights (NaN or inf) after step {run.step + 1} of {run.total_steps}; training stopped "
                f"and nothing of this step was saved; {_last_good(run)}. Lower the learning rate or check the data."
            )
        run.step += 1
        if step_callback is not None:
            step_callback(run.step, run.net)
        if log is not None:
            log.add(task.train_logs(step))
            if run.step % cfg.log_every == 0:
                log.report(run)
        if run.writer is not None and cfg.image_every and run.step % cfg.image_every == 0 and cfg.mode != "vanilla":
            for name, picture in task.images(step).items():
                run.writer.add_image(name, picture, run.step, dataformats="HWC")
        del step, loss  # free the graph's outputs before evaluation / the next batch
        if cfg.eval_every and run.step % cfg.eval_every == 0 and run.step < run.total_steps:
            run_eval(run)
            model.train()
        if cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0:
            save(run)


def _last_good(run: Run) -> str:
    if run.last_saved_step is None:
        return "no checkpoint was written yet"
    return f"the last good checkpoint is {run.out_dir / 'model.safetensors'} (step {run.last_saved_step})"


def main(
    config: TrainConfig,
    *,
    train_set=None,
    eval_set=None,
    step_callback: Callable[[int, nn.Module], None] | None = None,
) -> dict:
    """Trains (or resumes) the run described by ``config`` and evaluates the result.

    Args:
        config: the run's configuration (``config.task`` picks the task).
        train_set: replaces the training dataset of ``config`` (items as the task's
            ``collate`` takes: ``(image, label)`` pairs, or ``(image, target)`` for detection).
        eval_set: replaces the evaluation dataset.
        step_callback: called on every rank after each optimisation step with
            ``(step, bare model)`` (tests, custom monitoring).

    Returns:
        The final evaluation metrics (also in ``out_dir/metrics.json`` and the checkpoint).

    Raises:
        NonFiniteLossError: see :func:`train_one_epoch`.
        OutputExistsError, InputError: see :func:`prepare_run_folder`.
        sact.CheckpointError: unreadable, forged or mismatched warm-start / resume files.
    """
    config = config.validate()
    device = resolve_device(config.device, local_rank())
    writer = is_rank_zero()  # other ranks follow (torchrun stops them if the writer fails)
    if writer:
        prepare_run_folder(config, clear=False)  # refuse before anything is created
    # the lock is taken before the folder is inspected again: no other sact writes it meanwhile
    with prepare_outputs(config.out_dir, lock="train") if writer else contextlib.nullcontext():
        if writer:
            prepare_run_folder(config)
        return _main(config, device, train_set=train_set, eval_set=eval_set, step_callback=step_callback)


def _main(config: TrainConfig, device: torch.device, *, train_set, eval_set, step_callback) -> dict:
    from tqdm.auto import tqdm

    info = setup_distributed(device)
    try:
        if config.threads:
            torch.set_num_threads(config.threads)
        torch.manual_seed(config.seed)
        np.random.seed(config.seed)
        random.seed(config.seed)
        task = get_task(config.task)
        data = task.data(config, train_set=train_set, eval_set=eval_set)
        # on resume every weight comes from the state
        model = task.model(config, data, warm_start=not config.resume)
        state_path = Path(config.out_dir) / STATE_FILE
        model.to(device)
        model.to(memory_format=training_memory_format(config.memory_format, device, config.task))
        amp = _amp_dtype(config.amp, device)
        if info.enabled:
            model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        optimizer = build_optimizer(model, config)
        spe = steps_per_epoch(data.train, config, info.world_size)
        total = config.steps or config.epochs * spe
        run = Run(config, model, optimizer, build_scheduler(optimizer, total_steps=total, steps_per_epoch=spe, config=config),
                  grad_scaler(device, amp), device, amp, info, total, spe, data, task)
        if config.resume:
            _restore(run, load_train_state(state_path), state_path)
        if info.is_main:
            import yaml

            atomic_write_bytes(run.out_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False).encode())
            if config.tensorboard:
                from ..tb import summary_writer

                run.writer = summary_writer(run.out_dir / "tb")
        what = f"{config.model} {config.mode}" + (" detector" if config.task == "detection" else "")
        show_bar = config.progress and info.is_main and sys.stderr.isatty()
        pbar = tqdm(total=total, initial=run.step, desc=f"train {what}", disable=not show_bar)
        log = None
        if info.is_main:
            from ..models import vanilla_flops

            size = data.input_size[1:] if data.input_size else None
            log = TrainLog(pbar if show_bar else None, lines=not show_bar,
                           vanilla_flops=vanilla_flops(run.net, size) if size else None)
        while run.step < total:
            epoch = run.step // spe
            loader = train_loader(data.train, config, rank=info.rank, world_size=info.world_size, epoch=epoch,
                                  skip_batches=run.step - epoch * spe, collate_fn=task.collate)
            train_one_epoch(run, loader, log=log, step_callback=step_callback)
            if run.step % spe == 0 or run.step >= total:
                save(run)  # epoch end: always resumable, whatever checkpoint_every says
        pbar.close()
        if run.skipped:
            warnings.warn(f"{run.skipped} unreadable training image(s) were skipped (each named above)", stacklevel=2)
        metrics = run_eval(run)
        if info.is_main:
            save(run)
            atomic_write_bytes(run.out_dir / "metrics.json", dumps_json(metrics, indent=2).encode())
            if run.writer is not None:
                run.writer.close()
        return metrics
    finally:
        cleanup_distributed(info)
