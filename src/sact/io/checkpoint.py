"""The sact checkpoint format: safetensors weights plus a JSON document, written atomically.

A checkpoint ``NAME`` is two files:

* ``NAME.safetensors`` -- the model's state dict;
* ``NAME.json`` -- ``{"format": "sact-checkpoint", "version": 1, "model": {"name", "kwargs"},
  "weights_sha256", "meta": {...}}``; ``meta`` holds whatever the writer adds (tau,
  metrics, preprocessing, the training config).

A detector (:class:`sact.detection.SACTFasterRCNN`) is stored in the same format: ``model``
is its backbone's spec and an extra ``detector`` entry holds the arguments of
:func:`sact.detection.build_detector`, so the header alone rebuilds it.

The same document (without the hash) is also stored in the safetensors header, so the
weights file alone is a complete checkpoint. Each file is written to a temporary name in
the same folder and renamed into place, so a crash never leaves a half-written file; the
reader trusts the header and uses the sidecar only for files without one.

This module is the format only and imports no model code: it writes and reads the files,
checks the document's structure (:func:`read_checkpoint_document`) and the tensors in a
safetensors header against a signature, and verifies the hashes
(:func:`read_verified_state`). Checking a model name and its arguments, bounding the size
of the architecture and building the model are :mod:`sact.models.loading`'s
(:func:`sact.load_checkpoint`, :func:`sact.save_checkpoint`). See ``docs/trust.md``.

A file that is not an sact checkpoint (a torchvision ``.pth``, a plain ``.safetensors``
state dict) is named as such (:func:`file_kind`); :func:`read_state_dict` reads one
without running code, for ``create_model(name, pretrained=...)`` and ``--init``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from .files import atomic_write_bytes, dumps_json, finite_or_none, loads_json

__all__ = ["checkpoint_paths", "write_checkpoint", "read_checkpoint_document", "trained_input_size",
           "non_finite_tensors", "read_safetensors_header", "read_verified_state", "state_signature", "file_kind",
           "not_a_checkpoint", "read_state_dict", "header_document", "atomic_write_bytes", "CheckpointError",
           "FORMAT", "VERSION"]

FORMAT = "sact-checkpoint"
VERSION = 1
#: Largest safetensors header read (the format's own limit is 100 MB).
MAX_HEADER_BYTES = 100_000_000


class CheckpointError(InputError):
    """A checkpoint is missing, corrupt, forged, or does not match the model it describes (exit 2)."""


def checkpoint_paths(path: str | Path, default_name: str = "model") -> tuple[Path, Path]:
    """``(NAME.safetensors, NAME.json)`` for ``NAME``, either file, or a folder (``folder/default_name``).

    A folder is an existing directory or a string ending in ``/`` (``"runs/new/"`` ->
    ``runs/new/model.safetensors``, also before the folder exists).
    """
    p = Path(path)
    if p.is_dir() or (isinstance(path, str) and path.endswith(("/", os.sep))):
        p = p / default_name
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


def write_checkpoint(state: dict[str, torch.Tensor], path: str | Path, *, model: dict[str, Any],
                     meta: dict[str, Any] | None = None, detector: dict[str, Any] | None = None) -> Path:
    """Write ``state`` as the checkpoint ``path`` (+ ``.safetensors`` / ``.json``), each file atomically.

    Args:
        state: the state dict (copied to the CPU).
        path: ``NAME``, ``NAME.safetensors`` or a folder (then ``folder/model``): an
            existing folder, or a string ending in ``/`` (the folder is created).
        model: the document's ``model`` entry, ``{"name", "kwargs"}`` (``sact_config``).
        meta: JSON-serialisable extras (tau, metrics, preprocessing, config);
            non-finite floats are stored as ``null`` (the files are strict JSON).
        detector: the document's ``detector`` entry (a detector's arguments), or None.

    Returns:
        The path of the weights file.
    """
    from safetensors.torch import save

    weights, sidecar = checkpoint_paths(path)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    # The header also carries the hash of the tensor bytes, so corruption of the data
    # section is caught from the weights file alone (the data section does not depend on
    # the metadata, so serialising without it first gives the same bytes).
    data_sha = hashlib.sha256(_data_section(save(state))).hexdigest()
    doc = {"format": FORMAT, "version": VERSION, "model": model, "meta": meta or {}, "data_sha256": data_sha}
    if detector is not None:
        doc["detector"] = detector
    header = dumps_json(doc, sort_keys=True, default=_json_default)
    blob = save(state, metadata={"sact": header})
    doc = {**json.loads(header), "weights_file": weights.name, "weights_sha256": hashlib.sha256(blob).hexdigest()}
    text = dumps_json(doc, indent=2, sort_keys=True)
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
        return finite_or_none(obj.tolist())
    if hasattr(obj, "item"):
        return finite_or_none(obj.item())
    if hasattr(obj, "to_dict"):
        return finite_or_none(obj.to_dict())
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_safetensors_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, read without touching the tensor data.

    Returns:
        ``{name: {"dtype", "shape", "data_offsets"}}`` plus ``"__metadata__"`` if present.

    Raises:
        CheckpointError: not a safetensors file (too short, header length out of range,
            header not a JSON object, entries without dtype/shape/offsets, offsets
            outside the file).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 2 <= n <= min(MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(f"{path} is not a safetensors file (header length {n}, file size {size})")
            header = loads_json(f.read(n))
    except (OSError, ValueError) as e:  # ValueError: not JSON, not UTF-8, nested too deeply
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    data_size = size - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise CheckpointError(f"{path}: safetensors metadata must map names to strings")
            continue
        ok = (isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
              and isinstance(entry.get("shape"), list) and all(type(d) is int and d >= 0 for d in entry["shape"])
              and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
              and all(type(o) is int for o in entry["data_offsets"])
              and 0 <= entry["data_offsets"][0] <= entry["data_offsets"][1] <= data_size)
        if not ok:
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed safetensors header entry")
    return header


def _header_doc(weights: Path) -> dict | None:
    meta = read_safetensors_header(weights).get("__metadata__") or {}
    if "sact" not in meta:
        return None
    return header_document(meta["sact"], weights)


def header_document(text: str, weights: Path) -> Any:
    """The sact document ``text`` of ``weights``'s header, decoded (:func:`sact.io.files.loads_json`).

    Raises:
        CheckpointError: not JSON, or nested too deeply (a corrupt checkpoint).
    """
    try:
        return loads_json(text)
    except ValueError as e:
        raise CheckpointError(f"{weights}: corrupt checkpoint: the sact document in its header is not valid "
                              f"JSON: {e}") from e


_TORCH_ZIP_PICKLE = re.compile(r"[^/]+/data\.pkl")  # torch.save's zip layout: ARCHIVE/data.pkl


def file_kind(path: str | Path) -> tuple[str, Path]:
    """What ``path`` (as :func:`sact.load_checkpoint` takes it) holds, from its first bytes and header only.

    Returns:
        ``(kind, file)``: ``"sact"`` (a checkpoint: a safetensors header or a sidecar
        naming it), ``"safetensors"`` (a plain state dict), ``"train-state"`` (an sact
        training state), ``"torch"`` (a ``torch.save`` file: zip or legacy pickle),
        ``"unknown"`` (another file) or ``"missing"``; ``file`` the file it looked at.

    Raises:
        CheckpointError: a ``.safetensors`` file whose header is malformed.
    """
    weights, sidecar = checkpoint_paths(path)
    if weights.is_file():
        meta = read_safetensors_header(weights).get("__metadata__") or {}
        if "sact" in meta or sidecar.is_file():
            return "sact", weights
        return ("train-state" if meta.get("format") == "sact-train-state" else "safetensors"), weights
    if sidecar.is_file():
        return "sact", sidecar
    p = Path(path)
    if not p.is_file():
        return "missing", p
    try:
        with open(p, "rb") as f:
            head = f.read(2)
        if zipfile.is_zipfile(p):
            with zipfile.ZipFile(p) as z:
                return ("torch" if any(_TORCH_ZIP_PICKLE.fullmatch(n) for n in z.namelist()) else "unknown"), p
    except (OSError, zipfile.BadZipFile):
        return "unknown", p
    legacy = len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5  # a pickle (torch.save before 1.6)
    return ("torch" if legacy else "unknown"), p


def read_checkpoint_document(path: str | Path) -> tuple[dict[str, Any], Path]:
    """The checkpoint's document ``{"format", "version", "model", "meta"}``, its structure checked.

    Read from the safetensors header; from the JSON sidecar for files without one. The
    model name and arguments are checked for their types only (a string, an object); what
    they may be is :func:`sact.models.loading.validate_model_spec`'s to say.

    Returns:
        ``(document, file)``: ``file`` the one it was read from (for messages).

    Raises:
        CheckpointError: missing or unreadable files, not an sact checkpoint, another
            version, a malformed ``model``, ``meta`` or ``detector`` entry.
    """
    weights, sidecar = checkpoint_paths(path)
    doc = _header_doc(weights) if weights.is_file() else None
    source = weights
    if doc is None:
        source = sidecar
        if not sidecar.is_file():
            raise CheckpointError(not_a_checkpoint(path))
        try:
            doc = loads_json(sidecar.read_bytes())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint sidecar {sidecar} is not valid JSON: {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        fmt = doc.get("format") if isinstance(doc, dict) else None
        raise CheckpointError(f"{source} is not an sact checkpoint (format={fmt!r})")
    if doc.get("version") != VERSION:
        raise CheckpointError(f"{source} has version {doc.get('version')!r}; this sact reads version {VERSION}")
    model = doc.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("name"), str) or not isinstance(model.get("kwargs"), dict):
        raise CheckpointError(f"{source} lacks the model name and arguments")
    if not isinstance(doc.get("meta", {}), dict):
        raise CheckpointError(f"{source}: 'meta' must be a JSON object")
    if not isinstance(doc.get("detector", {}), dict):
        raise CheckpointError(f"{source}: 'detector' must be a JSON object")
    return doc, source


def not_a_checkpoint(path: str | Path) -> str:
    """Why ``path`` cannot be read as an sact checkpoint: missing, or what the file is and how to use it."""
    kind, file = file_kind(path)
    weights, sidecar = checkpoint_paths(path)
    use = (f"use it as a warm start with `sact train --init {file}`, or in Python "
           f"`sact.create_model(name, pretrained='{file}')`")
    if kind == "torch":
        return (f"{file} is a PyTorch state dict file (torch.save), not an sact checkpoint: {use} (or "
                f"`sact.load_torchvision_weights(model, torch.load('{file}', weights_only=True))`)")
    if kind == "safetensors":
        return f"{file} is a plain safetensors state dict, not an sact checkpoint (no sact header): {use}"
    if kind == "train-state":
        return (f"{file} is an sact training state (for `sact train --resume`), not a model checkpoint: the run's "
                f"model is {file.parent / 'model.safetensors'}")
    if kind == "unknown":
        return f"{file} is not an sact checkpoint (neither safetensors nor a PyTorch state dict file)"
    if Path(path).suffix not in ("", ".safetensors", ".json"):
        return f"checkpoint not found: {path}"
    return f"checkpoint not found: neither {weights} (with an sact header) nor {sidecar} exists"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a plain state dict file, read without running code.

    A ``.safetensors`` file (its header checked first), or a ``torch.save`` file read with
    ``torch.load(weights_only=True)`` (tensors and containers only); as timm's
    ``load_checkpoint``, a ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper is
    unwrapped and a ``module.`` prefix (DataParallel) removed.

    Args:
        path: the file (a ``NAME`` whose ``NAME.safetensors`` exists is that file).

    Raises:
        CheckpointError: a missing or unreadable file, or one that holds no state dict of tensors.
    """
    from safetensors.torch import load_file

    file = file_kind(path)[1]
    try:
        if file.suffix == ".safetensors":
            sd = load_file(file)
        else:
            sd = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors, zip and unpickling errors come in several types
        raise CheckpointError(f"cannot read {file} as a state dict: {' '.join(str(e).split())[:300]}") from e
    for key in ("state_dict", "model"):  # training scripts' wrappers (timm, torchvision references, Lightning)
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not sd or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                      for k, v in sd.items()):
        raise CheckpointError(f"{file} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


_FLOAT_CODES = {"F16", "BF16", "F32", "F64"}


def _fits(got: tuple[str, list[int]], want: tuple[str, list[int]]) -> bool:
    """Same shape, and the same dtype or both floating point (loading casts, as ``load_state_dict`` does:
    a model saved in float64 or bfloat16 loads into the float32 architecture)."""
    return got[1] == want[1] and (got[0] == want[0] or {got[0], want[0]} <= _FLOAT_CODES)


def _check_tensors(weights: Path, header: dict, expected: dict, label: str) -> None:
    got = {k: (v["dtype"], v["shape"]) for k, v in header.items() if k != "__metadata__"}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(f"{k}: {got[k][0]}{got[k][1]} vs {expected[k][0]}{expected[k][1]}"
                   for k in set(got) & set(expected) if not _fits(got[k], expected[k]))
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{weights} does not fit model {label}: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong dtype/shape {wrong[:5]}" + (f" (and {len(missing) + len(unexpected) + len(wrong) - 15} more)"
                                                if len(missing) + len(unexpected) + len(wrong) > 15 else "")
        )


def trained_input_size(meta: dict[str, Any] | None) -> tuple[int, int, int] | None:
    """``(C, H, W)`` of the images a checkpoint's model was trained on, from its ``meta``.

    ``meta["input_size"]`` (written by ``sact train`` and the demo); for older checkpoints,
    the preprocessing's ``in_chans`` and ``image_size``, or the canvas of a Cluttered
    Fashion-MNIST training config. ``None`` when the checkpoint does not say.
    """
    if not isinstance(meta, dict):
        return None
    size = meta.get("input_size")
    if isinstance(size, list) and len(size) == 3 and all(type(v) is int and v > 0 for v in size):
        return tuple(size)
    pre = meta.get("preprocess") if isinstance(meta.get("preprocess"), dict) else {}
    chans = pre.get("in_chans") if type(pre.get("in_chans")) is int else None
    if chans and type(pre.get("image_size")) is int and pre["image_size"] > 0:
        return chans, pre["image_size"], pre["image_size"]
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    if config.get("dataset") == "cluttered":
        clutter = config.get("clutter") if isinstance(config.get("clutter"), dict) else {}
        canvas = clutter.get("canvas_size", 64)
        if type(canvas) is int and canvas > 0:
            return 1, canvas, canvas
    return None


def non_finite_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of floating-point tensors of ``state`` holding a NaN or an infinity."""
    return [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def read_verified_state(weights: Path, doc: dict, *, expected: dict[str, tuple[str, list[int]]], label: str,
                        allow_non_finite: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of ``weights``, after every check a checkpoint gets before it is used.

    In order: each tensor's dtype and shape in the header against ``expected``, the
    file's hash against ``doc["weights_sha256"]`` (sidecar documents), the tensor data's
    hash against ``doc["data_sha256"]`` (the header's; so a file cut short or being
    replaced is refused), then the values (NaN / inf refused unless ``allow_non_finite``).

    Args:
        weights: the ``.safetensors`` file.
        doc: its checkpoint document (:func:`read_checkpoint_document`).
        expected: ``{key: (safetensors dtype, shape)}`` of the model it should fit.
        label: the model's name in messages.
        allow_non_finite: accept NaN / inf weights.

    Raises:
        CheckpointError: any check failing (the message says which).
    """
    from safetensors.torch import load

    _check_tensors(weights, read_safetensors_header(weights), expected, label)
    blob = weights.read_bytes()
    if "weights_sha256" in doc and doc["weights_sha256"] != hashlib.sha256(blob).hexdigest():
        raise CheckpointError(f"{weights} does not match its sidecar {checkpoint_paths(weights)[1]}: the pair is from "
                              "different saves")
    if "data_sha256" in doc and len(blob) >= 8 and doc["data_sha256"] != hashlib.sha256(_data_section(blob)).hexdigest():
        raise CheckpointError(f"{weights} is corrupt: its tensor data does not match the hash in its header")
    try:
        state = load(blob)
    except Exception as e:  # safetensors raises several types on corrupt data
        raise CheckpointError(f"cannot read {weights}: {e}") from e
    del blob
    bad = non_finite_tensors(state)
    if bad and not allow_non_finite:
        raise CheckpointError(
            f"{weights} holds non-finite weights (NaN or inf) in {len(bad)} tensor(s), e.g. {bad[:3]}; such a model "
            "computes nothing useful (load it with allow_non_finite=True to inspect it)"
        )
    return state


def state_signature(module: nn.Module) -> dict[str, tuple[str, list[int]]]:
    """``{key: (safetensors dtype, shape)}`` of a module's state dict (what :func:`read_verified_state` expects)."""
    return {k: (_DTYPES.get(v.dtype, str(v.dtype)), list(v.shape)) for k, v in module.state_dict().items()}
