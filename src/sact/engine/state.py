"""Training state for exact resume: one safetensors file, written atomically, no pickle.

``train_state.safetensors`` holds the model weights, the optimiser's tensors (momentum
buffers) and the torch RNG states as tensors; everything else -- step, epoch, world
size, the optimiser's parameter groups, the scheduler and gradient-scaler states, the
numpy and Python RNG states, the config -- is JSON in the file's metadata. Loading it
runs no code (safetensors + JSON), so a state file handed over by someone else can at
worst fail to load. The model weights are kept here too (besides the user-facing
checkpoint) so that a crash between the two writes can never pair weights of one step
with an optimiser of another.

The JSON encoding keeps exactly what Python pickling would: ints and floats round-trip
bitwise (``repr``), tuples and integer dict keys are tagged, non-finite floats are
tagged, and a tensor anywhere in the structure is replaced by a reference to a tensor
of the file.

A ``train_state.pt`` of earlier versions (a pickle) is never opened.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..io.checkpoint import CheckpointError, read_safetensors_header
from ..io.files import atomic_write_bytes

__all__ = ["rng_state", "set_rng_state", "save_train_state", "load_train_state", "STATE_FILE", "LEGACY_STATE_FILE"]

STATE_FILE = "train_state.safetensors"
#: The pickle file of sact versions before 0.2; refused, never unpickled.
LEGACY_STATE_FILE = "train_state.pt"
_FORMAT = "sact-train-state"
_VERSION = 1
_NEEDED = ("model", "optimizer", "scheduler", "scaler", "step", "epoch", "rng", "config")


def rng_state() -> dict[str, Any]:
    """RNG states of torch (CPU, all CUDA devices), numpy and Python."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores :func:`rng_state` (numpy's state may come back as a list: it is rebuilt).

    Raises:
        CheckpointError: a state of the wrong form.
    """
    try:
        torch.set_rng_state(state["torch"])
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((str(kind), np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
        version, internal, gauss = state["python"]
        random.setstate((int(version), tuple(int(x) for x in internal), gauss if gauss is None else float(gauss)))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"malformed RNG state in the training state: {e}") from e


# --- a small tagged JSON encoding of nested Python values with tensors --------------


def _encode(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"$tensor": path}
    if isinstance(obj, np.ndarray):
        return {"$ndarray": obj.dtype.str, "shape": list(obj.shape), "data": obj.ravel().tolist()}
    if isinstance(obj, (bool, str)) or obj is None:
        return obj
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else {"$float": repr(f)}
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else {"$tuple": items}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: _encode(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        for k in obj:
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise TypeError(f"training state: dict key {k!r} at {path} is neither str nor int")
        return {"$dict": [[k, _encode(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
    raise TypeError(f"training state: cannot store {type(obj).__name__} at {path}")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "$tensor" in obj:
        return tensors[obj["$tensor"]]
    if "$float" in obj:
        return float(obj["$float"])  # only "nan", "inf", "-inf" are written
    if "$tuple" in obj:
        return tuple(_decode(v, tensors) for v in obj["$tuple"])
    if "$ndarray" in obj:
        return np.asarray(obj["data"], dtype=np.dtype(obj["$ndarray"])).reshape(obj["shape"])
    if "$dict" in obj:
        return {k: _decode(v, tensors) for k, v in obj["$dict"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def save_train_state(path: str | Path, state: dict[str, Any]) -> None:
    """Writes ``state`` (tensors, numbers, strings, lists, tuples, dicts) to ``path`` atomically.

    Tensors go into the safetensors data, the rest into its metadata as JSON.
    """
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    doc = _encode(state, tensors, "state")
    meta = {"format": _FORMAT, "version": str(_VERSION), "state": json.dumps(doc, allow_nan=False)}
    atomic_write_bytes(path, save(tensors, metadata=meta))


def legacy_state_message(path: Path) -> str:
    return (f"{path} is a training state of an earlier sact (a Python pickle). It is not loaded: unpickling a file "
            "can run arbitrary code. Start the run again (--overwrite), or continue it with the sact version that "
            "wrote it")


def load_train_state(path: str | Path) -> dict[str, Any]:
    """Reads a training state written by :func:`save_train_state` (no code runs).

    Raises:
        CheckpointError: missing, truncated, forged or malformed file, or a legacy
            pickle ``train_state.pt`` (refused without being opened).
    """
    from safetensors.torch import load

    path = Path(path)
    if path.suffix == ".pt":
        raise CheckpointError(legacy_state_message(path))
    if not path.is_file():
        raise CheckpointError(f"training state {path} not found")
    header = read_safetensors_header(path)  # validates the layout before reading the data
    meta = header.get("__metadata__") or {}
    if meta.get("format") != _FORMAT or meta.get("version") != str(_VERSION) or "state" not in meta:
        raise CheckpointError(f"{path} is not an sact training state (format {meta.get('format')!r}, "
                              f"version {meta.get('version')!r})")
    try:
        tensors = load(path.read_bytes())
        doc = json.loads(meta["state"])
        state = _decode(doc, tensors)
    except Exception as e:  # safetensors / json / a forged structure raise several types
        raise CheckpointError(f"cannot read training state {path}: {e}") from e
    if not isinstance(state, dict) or not set(_NEEDED) <= set(state):
        raise CheckpointError(f"{path} is not an sact training state (needs keys {sorted(_NEEDED)})")
    types = {"model": dict, "optimizer": dict, "scheduler": dict, "scaler": dict, "rng": dict, "config": dict}
    bad = [k for k, t in types.items() if not isinstance(state[k], t)]
    bad += [k for k in ("step", "epoch") if type(state[k]) is not int or state[k] < 0]
    if bad or not all(isinstance(v, torch.Tensor) for v in state["model"].values()):
        raise CheckpointError(f"{path} is a malformed training state (bad {sorted(bad) or ['model']})")
    return state
