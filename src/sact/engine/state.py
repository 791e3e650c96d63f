"""Training state for exact resume: one file, written atomically.

``train_state.pt`` holds the model weights, optimiser, scheduler and gradient-scaler
states, the step and epoch, the RNG states of torch (CPU and CUDA), numpy and Python,
and the config. The model weights are kept here too (besides the user-facing
safetensors checkpoint) so that a crash between the two writes can never pair weights
of one step with an optimiser of another.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import CheckpointError, atomic_write_bytes

__all__ = ["rng_state", "set_rng_state", "save_train_state", "load_train_state", "STATE_FILE"]

STATE_FILE = "train_state.pt"


def rng_state() -> dict[str, Any]:
    """RNG states of torch (CPU, all CUDA devices), numpy and Python."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_train_state(path: str | Path, state: dict[str, Any]) -> None:
    """``torch.save`` of ``state`` to ``path`` through a temporary file (atomic)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_train_state(path: str | Path) -> dict[str, Any]:
    """Reads a training state written by :func:`save_train_state`.

    Raises:
        CheckpointError: missing or unreadable file, or not a training state.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"training state {path} not found")
    try:
        # numpy / python RNG states are plain containers; weights_only=False is needed for
        # them, and the file is one this library wrote into the run folder.
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several types on corrupt files
        raise CheckpointError(f"cannot read training state {path}: {e}") from e
    needed = {"model", "optimizer", "scheduler", "step", "epoch", "rng", "config"}
    if not isinstance(state, dict) or not needed <= set(state):
        raise CheckpointError(f"{path} is not an sact training state (needs keys {sorted(needed)})")
    return state
