"""Checkpoints and models: building the model a checkpoint describes, and saving one.

The file format is :mod:`sact.io.checkpoint`'s; this module adds what needs the model
registry. Loading never unpickles and validates before it allocates: the model name and
its arguments (registered, typed, within bounds: :func:`validate_model_spec`), the size
of the architecture (:func:`meta_state`, at most :data:`MAX_MODEL_ELEMENTS`) and every
tensor's dtype and shape in the safetensors header against it (built on the ``meta``
device), then the hashes; weights holding NaN / inf are refused unless asked for. See
``docs/trust.md``.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..io.checkpoint import (CheckpointError, checkpoint_paths, read_checkpoint_document, read_verified_state,
                             state_signature, write_checkpoint)
from ..stage import MODES
from . import registry
from .registry import _REGISTRY, list_models

__all__ = ["save_checkpoint", "load_checkpoint", "read_checkpoint_state", "read_checkpoint_meta", "validate_model_spec", "meta_state",
           "expected_state", "MAX_MODEL_ELEMENTS"]

# Bounds of the model builders' arguments a checkpoint may ask for: (type, low, high).
# Generous for real networks (ImageNet-21k has 21843 classes; the widest ResNet in use
# has base width 128), small enough that a forged header cannot ask for a giant model.
_KWARG_BOUNDS: dict[str, tuple[type, float, float]] = {
    "num_classes": (int, 0, 100_000),  # 0: a headless model (features, timm's convention)
    "in_chans": (int, 1, 64),
    "base_channels": (int, 2, 1024),
    "base_width": (int, 1, 1024),
    "stem_width": (int, 1, 1024),
    "eps": (float, 0.0, 1.0),
    "zero_init_residual": (bool, 0, 1),
}
_OTHER_BOUND = 4096  # numeric arguments of builders not listed above

#: Most elements (parameters and buffers) of a model built from a file's header: 4 GB in
#: float32, 16 times the largest registered model (ResNet-152: 61 M; a Faster R-CNN over
#: ResNet-50: 42 M). The bounds above alone allow far more (ResNet-152 at base width 1024:
#: 15 G), and a detector's sizes multiply (FPN and box head 5000 wide: 1.9 G).
MAX_MODEL_ELEMENTS = 1_000_000_000


def save_checkpoint(model: nn.Module, path: str | Path, *, meta: dict[str, Any] | None = None) -> Path:
    """Save ``model`` (built by :func:`sact.create_model`) to ``path`` (+ ``.safetensors`` / ``.json``).

    Args:
        model: the model; must carry ``sact_config`` (set by ``create_model``); a
            detector also ``detector_config`` (set by ``build_detector``). A
            ``DistributedDataParallel`` / ``torch.compile`` wrapper is unwrapped.
        path: ``NAME``, ``NAME.safetensors`` or a folder (then ``folder/model``): an
            existing folder, or a string ending in ``/`` (the folder is created).
        meta: JSON-serialisable extras (tau, metrics, preprocessing, config);
            non-finite floats are stored as ``null`` (the files are strict JSON).

    Returns:
        The path of the weights file.
    """
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    config = getattr(model, "sact_config", None)
    if config is None:
        raise CheckpointError("model has no sact_config; build it with sact.create_model(name) (a model of your own: "
                              "register its builder with sact.register_model first, docs/custom_units.md)")
    return write_checkpoint(model.state_dict(), path, model=config, meta=meta,
                            detector=getattr(model, "detector_config", None))


def read_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """The checkpoint's document ``{"format", "version", "model", "meta"}`` (validated).

    Read from the safetensors header; from the JSON sidecar for files without one.

    Raises:
        CheckpointError: missing or unreadable files, not an sact checkpoint, a model
            name or arguments that are not allowed (see :func:`validate_model_spec`).
    """
    doc, source = read_checkpoint_document(path)
    try:
        validate_model_spec(doc["model"]["name"], doc["model"]["kwargs"])
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from e
    return doc


def validate_model_spec(name: Any, kwargs: dict[str, Any]) -> None:
    """Checks a model name and builder arguments before anything is built.

    The name must be registered, every argument accepted by its builder, of the right
    type and within bounds (``0 <= num_classes <= 100000``, ``in_chans`` <= 64,
    ``base_channels`` / ``base_width`` / ``stem_width`` <= 1024, ``0 < eps < 1``,
    ``mode`` one of vanilla / act / sact; other numeric arguments within +-4096).

    Raises:
        ValueError: listing every problem (the argument, the value, what is allowed).
    """
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    params = inspect.signature(_REGISTRY[name]).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    problems = []
    for key, value in kwargs.items():
        if key == "mode":
            if value not in MODES:
                problems.append(f"mode={value!r} (expected one of {', '.join(MODES)})")
            continue
        if key not in params and not takes_any:
            problems.append(f"{key}={value!r} (not an argument of {name}; accepted: "
                            f"{', '.join(sorted(p for p in params if p != 'mode'))})")
            continue
        if key in _KWARG_BOUNDS:
            typ, lo, hi = _KWARG_BOUNDS[key]
            if typ is float:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and lo < value < hi
                want = f"a number in ({lo:g}, {hi:g})"
            elif typ is bool:
                ok, want = isinstance(value, bool), "true or false"
            else:
                ok = type(value) is int and lo <= value <= hi
                want = f"an int in [{lo}, {hi}]"
        else:
            ok = value is None or isinstance(value, (bool, str)) or (
                isinstance(value, (int, float)) and math.isfinite(value) and abs(value) <= _OTHER_BOUND)
            want = f"a number within +-{_OTHER_BOUND}, a bool, a string or null"
        if not ok:
            problems.append(f"{key}={value!r} (expected {want})")
    if problems:
        raise ValueError(f"model {name}: invalid arguments: {'; '.join(problems)}")


def meta_state(build: Callable[[], nn.Module]) -> dict[str, tuple[str, list[int]]]:
    """:func:`state_signature` of the module ``build()`` makes on the ``meta`` device (nothing is allocated).

    The one size check of everything built from a file's header (or a config): call it
    before building for real.

    Raises:
        ValueError: the module has more than :data:`MAX_MODEL_ELEMENTS` parameters and
            buffers (and what ``build`` raises).
    """
    with torch.device("meta"):
        module = build()
    signature = state_signature(module)
    n = sum(math.prod(shape) for _, shape in signature.values())
    if n > MAX_MODEL_ELEMENTS:
        raise ValueError(f"the model would have {n:,} parameters and buffers ({4 * n / 1e9:.1f} GB in float32), "
                         f"above sact's cap of {MAX_MODEL_ELEMENTS:,} (sact.models.loading.MAX_MODEL_ELEMENTS)")
    return signature


def expected_state(name: str, kwargs: dict[str, Any]) -> dict[str, tuple[str, list[int]]]:
    """``{key: (safetensors dtype, shape)}`` of the registered model ``name(**kwargs)`` (:func:`meta_state`)."""
    kwargs = dict(kwargs)
    mode = kwargs.pop("mode", "sact")
    return meta_state(lambda: registry.build_model(name, mode=mode, **kwargs))


def load_checkpoint(path: str | Path, *, map_location: str | torch.device | None = None,
                    device: str | torch.device | None = None, eval_mode: bool = True,
                    allow_non_finite: bool = False) -> nn.Module:
    """Rebuild the model of a checkpoint and load its weights.

    Nothing is allocated before the header is validated: the model name and arguments
    (:func:`validate_model_spec`), then every tensor's dtype and shape against the
    architecture (built on the ``meta`` device) and the file's hashes.

    Args:
        path: ``NAME``, ``NAME.safetensors``, ``NAME.json`` or a folder holding ``model.*``.
        map_location: device for the weights (default ``"cpu"``).
        device: the same as ``map_location`` (the name ``nn.Module.to`` uses); give one of the two.
        eval_mode: return the model in eval mode (default).
        allow_non_finite: load weights holding NaN / inf (refused by default: such a
            model computes nothing useful, and evaluating it writes NaN metrics).

    Returns:
        The model, with ``model.checkpoint_meta`` set to the sidecar's ``meta``.

    Raises:
        CheckpointError: missing files, corrupt, forged or mismatched weights, unknown
            model, arguments out of bounds, non-finite weights.
    """
    if device is not None and map_location is not None and torch.device(device) != torch.device(map_location):
        raise ValueError(f"load_checkpoint: device={device!r} and map_location={map_location!r} differ; pass one")
    target = device if device is not None else (map_location if map_location is not None else "cpu")
    doc, state = read_checkpoint_state(path, allow_non_finite=allow_non_finite)
    cfg = doc["model"]
    kwargs = dict(cfg["kwargs"])
    mode = kwargs.pop("mode", "sact")
    weights, _ = checkpoint_paths(path)
    try:
        model = registry.build_model(cfg["name"], mode=mode, **kwargs)
        model.load_state_dict(state)
    except (ValueError, RuntimeError) as e:
        raise CheckpointError(f"{weights} does not fit model {cfg['name']} ({mode}): {e}") from e
    model.to(target)
    model.checkpoint_meta = doc.get("meta", {})
    return model.eval() if eval_mode else model


def read_checkpoint_state(path: str | Path, *, allow_non_finite: bool = False) -> tuple[dict[str, Any], dict]:
    """``(document, state dict)`` of an sact checkpoint, every tensor checked (dtype and shape
    against the architecture on the ``meta`` device, hashes, finite values) without building
    the model: what :func:`load_checkpoint` loads.

    Raises:
        CheckpointError: as :func:`load_checkpoint`.
    """
    doc = read_checkpoint_meta(path)
    weights, _ = checkpoint_paths(path)
    if not weights.is_file():
        raise CheckpointError(f"checkpoint weights not found: {weights}")
    if "detector" in doc:
        raise CheckpointError(f"{weights} holds a detector (Faster R-CNN over a {doc['model']['name']}): load it with "
                              "sact.detection.load_detector, evaluate it with sact detect eval")
    cfg = doc["model"]
    kwargs = dict(cfg["kwargs"])
    mode = kwargs.pop("mode", "sact")
    label = f"{cfg['name']} ({mode})"
    try:
        expected = expected_state(cfg["name"], {"mode": mode, **kwargs})
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{weights}: cannot build {label}: {e}") from e
    return doc, read_verified_state(weights, doc, expected=expected, label=label, allow_non_finite=allow_non_finite)
