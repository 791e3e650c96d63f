"""Model checkpoints: safetensors weights plus a JSON sidecar, written atomically.

A checkpoint ``NAME`` is two files:

* ``NAME.safetensors`` -- the model's state dict;
* ``NAME.json`` -- ``{"format": "sact-checkpoint", "version": 1, "model": {"name", "kwargs"},
  "weights_sha256", "meta": {...}}``; ``meta`` holds whatever the writer adds (tau,
  metrics, preprocessing, the training config).

The same document (without the hash) is also stored in the safetensors header, so the
weights file alone is a complete checkpoint. Each file is written to a temporary name in
the same folder and renamed into place, so a crash never leaves a half-written file; the
loader trusts the header and uses the sidecar only for files without one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["checkpoint_paths", "save_checkpoint", "load_checkpoint", "read_checkpoint_meta", "atomic_write_bytes", "CheckpointError"]

FORMAT = "sact-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not match the model it describes."""


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def checkpoint_paths(path: str | Path, default_name: str = "model") -> tuple[Path, Path]:
    """``(NAME.safetensors, NAME.json)`` for ``NAME``, either file, or a folder (``folder/default_name``)."""
    p = Path(path)
    if p.is_dir():
        p = p / default_name
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


def save_checkpoint(model: nn.Module, path: str | Path, *, meta: dict[str, Any] | None = None) -> Path:
    """Save ``model`` (built by :func:`sact.create_model`) to ``path`` (+ ``.safetensors`` / ``.json``).

    Args:
        model: the model; must carry ``sact_config`` (set by ``create_model``). A
            ``DistributedDataParallel`` / ``torch.compile`` wrapper is unwrapped.
        path: ``NAME``, ``NAME.safetensors`` or a folder (then ``folder/model``).
        meta: JSON-serialisable extras (tau, metrics, preprocessing, config).

    Returns:
        The path of the weights file.
    """
    from safetensors.torch import save

    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    config = getattr(model, "sact_config", None)
    if config is None:
        raise CheckpointError("model has no sact_config; build it with sact.create_model(name) (a model of your own: "
                              "register its builder with sact.register_model first, docs/custom_units.md)")
    weights, sidecar = checkpoint_paths(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # The header also carries the hash of the tensor bytes, so corruption of the data
    # section is caught from the weights file alone (the data section does not depend on
    # the metadata, so serialising without it first gives the same bytes).
    data_sha = hashlib.sha256(_data_section(save(state))).hexdigest()
    doc = {"format": FORMAT, "version": VERSION, "model": config, "meta": meta or {}, "data_sha256": data_sha}
    header = json.dumps(doc, sort_keys=True, default=_json_default)
    blob = save(state, metadata={"sact": header})
    doc = {**json.loads(header), "weights_file": weights.name, "weights_sha256": hashlib.sha256(blob).hexdigest()}
    text = json.dumps(doc, indent=2, sort_keys=True)
    atomic_write_bytes(weights, blob)
    atomic_write_bytes(sidecar, text.encode())
    return weights


def _data_section(blob: bytes) -> bytes:
    """The tensor bytes of a serialised safetensors file (after the length and the JSON header)."""
    n = int.from_bytes(blob[:8], "little")
    return blob[8 + n :]


def _json_default(obj):
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _header_doc(weights: Path) -> dict | None:
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # corrupt header: safetensors raises several types
        raise CheckpointError(f"cannot read {weights}: {e}") from e
    return json.loads(meta["sact"]) if "sact" in meta else None


def read_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """The checkpoint's document ``{"format", "version", "model", "meta"}`` (validated).

    Read from the safetensors header; from the JSON sidecar for files without one.
    """
    weights, sidecar = checkpoint_paths(path)
    doc = _header_doc(weights) if weights.exists() else None
    if doc is None:
        if not sidecar.exists():
            raise CheckpointError(f"checkpoint not found: neither {weights} (with an sact header) nor {sidecar} exists")
        try:
            doc = json.loads(sidecar.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"checkpoint sidecar {sidecar} is not valid JSON: {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{sidecar} is not an sact checkpoint sidecar (format={doc.get('format') if isinstance(doc, dict) else None!r})")
    if doc.get("version") != VERSION:
        raise CheckpointError(f"{sidecar} has version {doc.get('version')!r}; this sact reads version {VERSION}")
    model = doc.get("model")
    if not isinstance(model, dict) or "name" not in model or not isinstance(model.get("kwargs"), dict):
        raise CheckpointError(f"{sidecar} lacks the model name and arguments")
    return doc


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu", eval_mode: bool = True) -> nn.Module:
    """Rebuild the model of a checkpoint and load its weights.

    Args:
        path: ``NAME``, ``NAME.safetensors``, ``NAME.json`` or a folder holding ``model.*``.
        map_location: device for the weights.
        eval_mode: return the model in eval mode (default).

    Returns:
        The model, with ``model.checkpoint_meta`` set to the sidecar's ``meta``.

    Raises:
        CheckpointError: missing files, corrupt or mismatched weights, unknown model.
    """
    from safetensors.torch import load

    from .models import create_model

    doc = read_checkpoint_meta(path)
    weights, sidecar = checkpoint_paths(path)
    if not weights.exists():
        raise CheckpointError(f"checkpoint weights not found: {weights}")
    blob = weights.read_bytes()
    if "weights_sha256" in doc and doc["weights_sha256"] != hashlib.sha256(blob).hexdigest():
        raise CheckpointError(f"{weights} does not match its sidecar {sidecar}: the pair is from different saves")
    if "data_sha256" in doc and len(blob) >= 8 and doc["data_sha256"] != hashlib.sha256(_data_section(blob)).hexdigest():
        raise CheckpointError(f"{weights} is corrupt: its tensor data does not match the hash in its header")
    try:
        state = load(blob)
    except Exception as e:  # safetensors raises several types on corrupt data
        raise CheckpointError(f"cannot read {weights}: {e}") from e
    cfg = doc["model"]
    kwargs = dict(cfg["kwargs"])
    mode = kwargs.pop("mode", "sact")
    try:
        model = create_model(cfg["name"], mode=mode, **kwargs)
    except ValueError as e:
        raise CheckpointError(f"{sidecar}: {e}") from e
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in set(own) & set(state)
                    if state[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{weights} does not fit model {cfg['name']} ({mode}): missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shapes {shapes[:5]}"
        )
    model.load_state_dict(state)
    model.to(map_location)
    model.checkpoint_meta = doc.get("meta", {})
    return model.eval() if eval_mode else model
