"""Checkpoint evaluation as ``sact eval`` runs it: a checkpoint (or each new one of a run
folder) -> its metrics.

The data config takes the generation settings of the checkpoint's training config
(dataset kind, Cluttered Fashion-MNIST canvases, label offset, held-out share) and the
folders from the user only: a checkpoint is someone else's file, and a folder it names
could be anything (docs/trust.md). The metrics are those of :func:`sact.classification.evaluate.evaluate`
plus what was evaluated (checkpoint, model, mode, dataset, tau, device, engine).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..io.checkpoint import CheckpointError, checkpoint_paths
from ..errors import InputError
from ..engine.config import ConfigError, TrainConfig

__all__ = ["EvalOptions", "MAX_BATCH_BYTES", "MAX_EVAL_SAMPLES", "check_options", "default_out", "eval_config",
           "evaluate_checkpoint", "evaluate_to_file", "watch_run"]

# What an evaluation takes from the checkpoint's training config: the kind of dataset and
# how the built-in Cluttered Fashion-MNIST test canvases are generated. Never a folder.
_FROM_CHECKPOINT = ("dataset", "eval_samples", "data_seed", "clutter", "image_size", "label_offset", "val_fraction")

#: Most images one evaluation takes (``--num-samples``, or the checkpoint's ``eval_samples``):
#: Cluttered Fashion-MNIST canvases are generated, so only this bounds their number.
MAX_EVAL_SAMPLES = 10_000_000
#: Largest input batch (``--batch-size`` images of the evaluation size, float32), refused before it is allocated.
MAX_BATCH_BYTES = 2**31


@dataclass(frozen=True)
class EvalOptions:
    """The user's choices for an evaluation, named as ``sact eval``'s flags; ``None``: the checkpoint's setting.

    ``dataset``, ``data_dir``, ``num_samples`` (images), ``val_fraction``, ``tau``, ``strict``
    and ``max_pixels`` (image folders) override the data config; ``batch_size``, ``workers``,
    ``device``, ``amp``, ``sparse`` (run through :func:`sact.to_sparse`) and ``progress``
    say how to run.
    """

    dataset: str | None = None
    data_dir: str | None = None
    num_samples: int | None = None
    val_fraction: float | None = None
    tau: float | None = None
    strict: bool = False
    max_pixels: int | None = None
    batch_size: int = 100
    workers: int = 0
    device: str = "auto"
    amp: str = "none"
    sparse: bool = False
    progress: bool = True


def check_options(options: EvalOptions) -> None:
    """The options alone, before any work: ``tau``, ``num_samples``, ``max_pixels`` as ``sact train``
    checks them, and ``num_samples`` at most :data:`MAX_EVAL_SAMPLES`.

    Raises:
        InputError: a value is out of range (ConfigError, a subclass, for the config's checks).
    """
    flags = {"tau": options.tau, "eval_samples": options.num_samples, "max_pixels": options.max_pixels}
    TrainConfig().replace(**{k: v for k, v in flags.items() if v is not None})  # the checks of sact train's config
    _check_eval_samples(options.num_samples, options, None)


def _check_eval_samples(n: int | None, options: EvalOptions, checkpoint) -> None:
    if n is not None and n > MAX_EVAL_SAMPLES:
        what = f"--num-samples {n}" if options.num_samples is not None else \
            f"{checkpoint}: its eval_samples {n} (pass --num-samples)"
        raise InputError(f"{what}: at most {MAX_EVAL_SAMPLES:,} images are evaluated")


def eval_config(meta: dict, options: EvalOptions, checkpoint) -> TrainConfig:
    """The evaluation data config of ``checkpoint`` (its ``meta``): generation settings from the
    checkpoint, folders from ``options`` only.

    Raises:
        CheckpointError: the checkpoint's config values are malformed.
        InputError: the dataset needs a folder and none was given, or too many images.
    """
    saved = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    taken = {k: saved[k] for k in _FROM_CHECKPOINT if k in saved}
    if "label_offset" in meta:  # converted 1001-class reference models: index 0 is background
        taken["label_offset"] = meta["label_offset"]
    try:
        config = TrainConfig.from_dict(taken)
    except ConfigError as e:
        raise CheckpointError(f"{checkpoint}: its training config is malformed: {e}") from e
    changes = {"dataset": options.dataset, "eval_samples": options.num_samples, "strict_data": options.strict or None,
               "max_pixels": options.max_pixels, "val_fraction": options.val_fraction, "tau": options.tau}
    config = config.replace(data_dir=options.data_dir, **{k: v for k, v in changes.items() if v is not None})
    _check_eval_samples(config.eval_samples, options, checkpoint)
    if config.dataset != "cluttered" and options.data_dir is None:
        raise InputError(f"the checkpoint was trained on {config.dataset}: pass --data-dir with that dataset's folder "
                         "(a folder named inside a checkpoint is never opened)")
    return config


def default_out(checkpoint: str | Path) -> Path:
    """Where ``sact eval CHECKPOINT`` writes without ``--out``: next to the checkpoint,
    ``NAME.eval.json`` (``RUN/model.eval.json`` for a run folder)."""
    weights, _ = checkpoint_paths(checkpoint)
    return weights.with_suffix(".eval.json")


def _device(options: EvalOptions):
    """``(device, AMP dtype)`` of the options, after the loader options are checked (InputError)."""
    from ..engine.amp import amp_dtype
    from ..engine.distributed import resolve_device

    if options.batch_size < 1 or options.workers < 0:
        raise InputError(f"--batch-size must be >= 1 and --workers >= 0, got {options.batch_size}, {options.workers}")
    device = resolve_device(options.device)
    return device, amp_dtype(options.amp, device)


def evaluate_checkpoint(path, options: EvalOptions, device, amp, datasets: dict) -> tuple[dict, dict]:
    """``(metrics, checkpoint meta)`` of the checkpoint at ``path``.

    Args:
        path: checkpoint (NAME, NAME.safetensors or a run folder).
        options: the user's choices.
        device, amp: where to run and the autocast dtype (None: full precision).
        datasets: a cache of evaluation sets by data config, filled here (one per :func:`watch_run`).

    Raises:
        CheckpointError: unreadable checkpoint, malformed config or tau in it.
        InputError: more classes in the data than model outputs, a batch over :data:`MAX_BATCH_BYTES`,
            ``sparse`` with AMP, or any error of :func:`eval_config` / the dataset.
    """
    from ..models.loading import load_checkpoint
    from ..engine.datasets import eval_loader
    from .data import build_datasets
    from .evaluate import evaluate

    model = load_checkpoint(path, map_location=device)
    meta = model.checkpoint_meta
    config = eval_config(meta, options, path)
    pre = meta.get("preprocess") if isinstance(meta.get("preprocess"), dict) else None
    if pre is None and model.in_chans in (1, 3):  # image folders: as many channels as the model takes
        config = config.replace(model_kwargs={"in_chans": model.in_chans})
    key = json.dumps([config.to_dict(), pre], sort_keys=True)
    if key not in datasets:
        datasets[key] = build_datasets(config, train=False, eval_preprocess=pre)  # the preprocessing training used
    data = datasets[key]
    outputs = model.sact_config["kwargs"].get("num_classes")
    if isinstance(outputs, int) and data.num_classes > outputs:
        raise InputError(f"the data has {len(data.classes)} classes (labels up to {data.num_classes - 1}) but the "
                         f"model {path} has {outputs} outputs: is --data-dir the dataset it was trained on?")
    tau = options.tau if options.tau is not None else meta.get("tau", config.tau)
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (math.isfinite(tau) and tau >= 0):
        raise CheckpointError(f"{path}: tau={tau!r} in the checkpoint is not a finite number >= 0; pass --tau")
    batch_bytes = min(options.batch_size, len(data.eval)) * math.prod(data.input_size or (0,)) * 4
    if batch_bytes > MAX_BATCH_BYTES:
        c, h, w = data.input_size
        raise InputError(f"--batch-size {options.batch_size}: a batch of {c}x{h}x{w} images takes "
                         f"{batch_bytes / 2**30:.1f} GiB before the model runs (at most "
                         f"{MAX_BATCH_BYTES / 2**30:.0f}); pass a smaller one")
    loader = eval_loader(data.eval, options.batch_size, workers=options.workers)
    runner = model
    if options.sparse:
        if amp is not None:
            raise InputError("--sparse runs in the model's float precision: drop --amp (or pass --amp none)")
        from ..sparse import to_sparse

        runner = to_sparse(model)
    metrics = evaluate(runner, loader, device=device, tau=float(tau), amp_dtype=amp, progress=options.progress)
    metrics = {"checkpoint": str(path), "model": model.sact_config["name"], "mode": model.mode,
               "model_config": model.sact_config, "dataset": config.dataset, "tau": float(tau), "device": str(device),
               "engine": "sparse" if options.sparse else "dense", **metrics}
    return metrics, meta


def evaluate_to_file(checkpoint, options: EvalOptions, *, out: str | Path | None = None,
                     overwrite: bool = False) -> tuple[dict, Path]:
    """Evaluates ``checkpoint`` and writes its metrics (JSON, atomically) to ``out``
    (default :func:`default_out`); ``out`` is checked before any work.

    Returns:
        ``(metrics, out)``.

    Raises:
        OutputExistsError: ``out`` exists and ``overwrite`` is false.
        InputError, CheckpointError: as :func:`evaluate_checkpoint`.
    """
    from ..io.files import atomic_write_bytes, dumps_json, prepare_outputs

    out = Path(out or default_out(checkpoint))
    with prepare_outputs(None, files=[out], overwrite=overwrite, what="--out"):  # before any work
        device, amp = _device(options)
        metrics, _ = evaluate_checkpoint(checkpoint, options, device, amp, {})
        atomic_write_bytes(out, dumps_json(metrics, indent=2).encode())
    return metrics, out


def watch_run(run_dir: str | Path, options: EvalOptions, *, out_dir: str | Path | None = None, poll_s: float = 30.0,
              timeout_s: float | None = None) -> list[Path]:
    """Evaluates each new checkpoint of the run folder ``run_dir`` as it appears
    (:func:`sact.engine.watch.watch_checkpoints`; ``out_dir`` default ``RUN_DIR/eval``).

    Returns:
        The metrics files written.

    Raises:
        InputError: bad loader options or device (before any work), or as ``watch_checkpoints``.
    """
    from ..engine.watch import watch_checkpoints

    device, amp = _device(options)
    datasets: dict = {}  # evaluation sets by config, built once
    return watch_checkpoints(run_dir, lambda path: evaluate_checkpoint(path, options, device, amp, datasets),
                             out_dir=out_dir or Path(run_dir) / "eval", poll_s=poll_s, timeout_s=timeout_s)
