"""Continuous evaluation: evaluate each new checkpoint of a run folder as it appears.

The reference evaluated its training runs with a separate process that waited for each
new checkpoint (``eval_interval_secs``) and evaluated it. :func:`watch_checkpoints` is
that loop for ``sact eval --watch RUN_DIR`` and ``sact detect eval --watch RUN_DIR``:

* it polls ``RUN_DIR/model.safetensors`` every ``poll_s`` seconds; a file whose size,
  modification time or inode changed is a candidate;
* a candidate is evaluated only if it passes every checkpoint check, its data hash
  included (:func:`sact.checkpoint.read_verified_state`): ``sact train`` writes by atomic
  rename, so a half-written file never appears under that name, and one copied there by
  other means is refused until it is complete (it is tried again when it changes);
* each result goes to ``OUT/metrics_step<STEP>.json`` (the step from the checkpoint's
  meta, zero-padded), written atomically; a step whose file exists is not evaluated
  again, so earlier results are never overwritten and a restarted watcher continues;
* it stops on Ctrl-C (after discarding the evaluation in progress, which wrote nothing)
  or when no new checkpoint appeared for ``timeout_s`` seconds.

Training replaces ``model.safetensors`` at every save: a checkpoint replaced before the
watcher looked at it is not evaluated (poll more often than ``checkpoint_every``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

from ..models.loading import read_checkpoint_meta
from ..io.checkpoint import CheckpointError, checkpoint_paths
from ..io.files import atomic_write_bytes, dumps_json, prepare_outputs

__all__ = ["watch_checkpoints", "metrics_name"]


def metrics_name(step: int | None, data_sha256: str | None = None) -> str:
    """``metrics_step000001234.json``; a checkpoint without a step is named by its data hash."""
    if isinstance(step, int) and not isinstance(step, bool) and step >= 0:
        return f"metrics_step{step:09d}.json"
    return f"metrics_sha{(data_sha256 or 'unknown')[:16]}.json"


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def watch_checkpoints(
    run_dir: str | Path,
    evaluate: Callable[[Path], tuple[dict, dict]],
    *,
    out_dir: str | Path,
    poll_s: float = 30.0,
    timeout_s: float | None = None,
    name: str = "model",
    log: Callable[[str], None] = print,
    sleep: Callable[[float], None] = time.sleep,
) -> list[Path]:
    """Evaluates every new checkpoint ``run_dir/<name>.safetensors`` until stopped.

    Args:
        run_dir: the training run's folder (it need not exist yet).
        evaluate: ``weights path -> (metrics, meta)``: the metrics (a JSON-serialisable
            dict) and the ``checkpoint_meta`` of the model it loaded (its step names the
            file). It must load the file with the usual checks (:func:`sact.load_checkpoint`
            or :func:`sact.detection.load_detector`): their :class:`CheckpointError` means
            "not a complete checkpoint (yet)" and the file is retried when it changes.
        out_dir: folder of the ``metrics_step<STEP>.json`` files (created with the first one).
        poll_s: seconds between looks at the folder.
        timeout_s: stop when no new checkpoint appeared for this long (None: never).
        name: the checkpoint's name in ``run_dir``.
        log: where progress lines go.
        sleep: the waiting function (tests replace it).

    Returns:
        The metrics files written, in order.

    Raises:
        InputError: ``run_dir`` or ``out_dir`` is an existing file; bad ``poll_s`` / ``timeout_s``.
    """
    from ..errors import InputError

    if not poll_s > 0:
        raise InputError(f"the poll interval must be > 0 seconds, got {poll_s}")
    if timeout_s is not None and not timeout_s > 0:
        raise InputError(f"the watch timeout must be > 0 seconds, got {timeout_s}")
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if run_dir.is_file():
        raise InputError(f"--watch needs a run folder, {run_dir} is a file")
    # the folder is created by the first metrics file: a refused watch leaves no empty folder
    with prepare_outputs(out_dir):
        weights, _ = checkpoint_paths(run_dir / name)
        written: list[Path] = []
        seen = None  # signature of the last file handled (evaluated, skipped or refused)
        last_new = time.monotonic()
        log(f"watching {weights} every {poll_s:g} s" + (f" (stop after {timeout_s:g} s without a new checkpoint)"
                                                        if timeout_s is not None else " (Ctrl-C stops)"))
        try:
            while True:
                sig = _signature(weights)
                if sig is not None and sig != seen:
                    last_new = time.monotonic()
                    result = _handle(weights, evaluate, out_dir, log)
                    seen = sig
                    if result is not None:
                        written.append(result)
                if timeout_s is not None and time.monotonic() - last_new >= timeout_s:
                    log(f"no new checkpoint for {timeout_s:g} s; stopping")
                    break
                sleep(poll_s)
        except KeyboardInterrupt:
            log("interrupted; stopping (the evaluation in progress, if any, wrote nothing)")
        log(f"{len(written)} checkpoint(s) evaluated -> {out_dir}")
        return written


def _handle(weights: Path, evaluate: Callable[[Path], tuple[dict, dict]], out_dir: Path, log) -> Path | None:
    """Evaluates one candidate; returns the metrics file written, or None."""
    try:
        doc = read_checkpoint_meta(weights)
    except CheckpointError as e:
        log(f"not evaluated, retried when the file changes: {e}")
        return None
    target = out_dir / metrics_name((doc.get("meta") or {}).get("step"), doc.get("data_sha256"))
    if target.exists():
        log(f"{target.name} exists; not evaluated again")
        return None
    try:
        metrics, meta = evaluate(weights)
    except CheckpointError as e:  # cut short, being replaced, or not a checkpoint at all
        log(f"not evaluated, retried when the file changes: {e}")
        return None
    # name the result after what was loaded: the file may have been replaced since its header was read
    step = (meta or {}).get("step")
    target = out_dir / metrics_name(step, doc.get("data_sha256"))
    if target.exists():  # written meanwhile (another watcher, or the replaced file's step)
        log(f"{target.name} exists; not replaced")
        return None
    atomic_write_bytes(target, dumps_json({"step": step, **metrics}, indent=2).encode())
    log(f"step {step}: -> {target}")
    return target
