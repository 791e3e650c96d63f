"""``create_model(name, pretrained=...)``: weights from an sact checkpoint, a plain state dict or a URL.

An sact checkpoint also gives the architecture's arguments (:func:`pretrained_kwargs`); a
plain state dict (a torchvision ``.pth``, a ``.safetensors`` of ``model.state_dict()``) is
read without running code (:func:`sact.io.checkpoint.read_state_dict`) and needs the
arguments from the caller. torchvision's ResNets name their tensors as sact's do, so both
load by name (:func:`load_pretrained`).

A URL must name the weights file of an sact checkpoint (``NAME.safetensors``: its header
holds the whole checkpoint document). It is downloaded once with torch.hub's helper into
torch.hub's cache, ``torch.hub.get_dir()/checkpoints/`` (``$TORCH_HOME/hub``, by default
``~/.cache/torch/hub``), and read from there afterwards without the network; a file name
``NAME-<hex>.safetensors`` is checked against that SHA-256 prefix (torch.hub's
convention). Every failure, including no network, raises one
:class:`~sact.CheckpointError` whose message says what to do.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from ..io.checkpoint import CheckpointError, file_kind, read_state_dict
from .loading import expected_state, read_checkpoint_meta, read_checkpoint_state
from .registry import _REGISTRY

__all__ = ["load_pretrained", "pretrained_kwargs", "download_checkpoint", "DOWNLOAD_TIMEOUT_S"]

#: seconds without an answer after which a download gives up (connect and each read)
DOWNLOAD_TIMEOUT_S = 30.0


def _is_url(source) -> bool:
    return isinstance(source, str) and source.split("://", 1)[0].lower() in ("http", "https")


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    # torch.hub's downloader opens its URL without a timeout; a default timeout makes a
    # silent network fail instead of hanging. Set only if the user has set none.
    old = socket.getdefaulttimeout()
    if old is None:
        socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        if old is None:
            socket.setdefaulttimeout(None)


def download_checkpoint(url: str, *, progress: bool = True) -> Path:
    """The local copy of the sact checkpoint at ``url`` (downloaded into torch.hub's cache once).

    Args:
        url: ``http(s)://.../NAME.safetensors``.
        progress: show a progress bar on stderr while downloading.

    Returns:
        ``torch.hub.get_dir()/checkpoints/NAME.safetensors``.

    Raises:
        CheckpointError: not a ``.safetensors`` URL, or the download failed (no network,
            HTTP error, hash mismatch); nothing is left in the cache then.
    """
    name = os.path.basename(urlparse(url).path)
    if not name.endswith(".safetensors"):
        raise CheckpointError(f"pretrained URL must name an sact checkpoint's .safetensors file, got {url!r}")
    dst = Path(torch.hub.get_dir()) / "checkpoints" / name
    if dst.is_file():
        return dst
    match = torch.hub.HASH_REGEX.search(name)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            torch.hub.download_url_to_file(url, str(dst), match.group(1) if match else None, progress=progress)
    except Exception as e:  # urllib, socket, hash and file-system errors all mean the same here
        reason = getattr(e, "reason", None) or e
        raise CheckpointError(
            f"cannot download pretrained weights from {url} ({type(e).__name__}: {reason}); check the network, "
            f"or download the file elsewhere and pass its path: pretrained='path/to/{name}'"
        ) from None
    return dst


def _local(source: Any, progress: bool) -> tuple[Path, str | None]:
    """``(local path, URL or None)`` of a ``pretrained`` argument (a URL is downloaded once)."""
    if isinstance(source, bool):
        raise CheckpointError(
            "sact hosts no default weights: pass pretrained=<path or URL of an sact checkpoint, or a state dict "
            "file>; torchvision's ImageNet weights load from their .pth (docs/api.md)"
        )
    url = str(source) if _is_url(source) else None
    return (download_checkpoint(url, progress=progress) if url else Path(source)), url


def pretrained_kwargs(name: str, source: str | os.PathLike, mode: str, kwargs: dict[str, Any], *,
                      progress: bool = True) -> dict[str, Any]:
    """The builder arguments of ``create_model(name, mode=mode, pretrained=source, **kwargs)``.

    An sact checkpoint stores the arguments it was built with: they are used, so they
    need not be given again; one given that differs (from the stored value, or the
    builder's default the checkpoint was built with) is an error, except ``num_classes``
    (the classifier then stays fresh). A plain state dict stores none: ``kwargs`` as given.

    Raises:
        CheckpointError: an unreadable or forged file, another architecture, arguments
            that differ, or a model above :data:`sact.models.loading.MAX_MODEL_ELEMENTS`
            (checked on the ``meta`` device, before anything is built).
    """
    path, _ = _local(source, progress)
    if file_kind(path)[0] in ("torch", "safetensors"):
        return dict(kwargs)
    doc = read_checkpoint_meta(path)  # validated: registered name, arguments within bounds
    saved = doc["model"]["name"]
    if saved != name:
        raise CheckpointError(f"{source} holds a {saved}, not a {name}")
    stored = {k: v for k, v in doc["model"]["kwargs"].items() if k != "mode"}
    params = inspect.signature(_REGISTRY[name]).parameters
    empty = inspect.Parameter.empty

    def saved_with(k: str) -> Any:  # the stored value, else the builder's default the checkpoint was built with
        return stored[k] if k in stored else (params[k].default if k in params else empty)

    differ = [f"{k}={v!r} (saved with {saved_with(k)!r})" for k, v in kwargs.items()
              if k != "num_classes" and saved_with(k) is not empty and v != saved_with(k)]
    if differ:
        raise CheckpointError(f"{source} does not fit the arguments given: {', '.join(differ)}; leave them out, "
                              "create_model takes the checkpoint's")
    merged = {**stored, **kwargs}
    try:
        expected_state(name, {"mode": mode, **merged})  # bounded on the meta device before the real build
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{source}: cannot build {name}: {e}") from e
    return merged


def load_pretrained(model: nn.Module, source: str | os.PathLike, *, progress: bool = True) -> nn.Module:
    """Load the weights of an sact checkpoint or a plain state dict (path or URL) into ``model``.

    As a fine-tuning start (timm's ``pretrained``), two parts of ``model`` may differ from
    the file and then stay fresh: the halting branches (another mode's, or none: a
    torchvision or vanilla state dict) and the classifier (another size, or none). Every
    other tensor must be in the file, by name and with ``model``'s shape, and the file
    must hold nothing else. An sact checkpoint must hold the same architecture
    (``sact_config["name"]``); without such differences the model equals the saved one
    and ``model.checkpoint_meta`` is the checkpoint's ``meta``; otherwise it keeps only
    the ``preprocess`` the weights expect.

    Args:
        model: the model, built by :func:`sact.create_model`.
        source: an sact checkpoint ``NAME`` / ``NAME.safetensors`` / ``NAME.json`` / a
            folder (see :func:`sact.load_checkpoint`), a plain state dict file
            (``.safetensors``, or ``torch.save``'s ``.pth`` / ``.pt``, read with
            ``weights_only=True``; see :func:`sact.io.checkpoint.read_state_dict`), or an
            ``http(s)://`` URL of an sact checkpoint's ``NAME.safetensors``.
        progress: progress bar while downloading.

    Returns:
        ``model``, with ``model.pretrained_cfg`` naming the ``file`` (and ``url``).

    Raises:
        CheckpointError: missing, corrupt or unfit file, or a failed download.
    """
    path, url = _local(source, progress)
    name = model.sact_config["name"]
    kind, file = file_kind(path)
    if kind in ("torch", "safetensors"):
        state, meta, what = read_state_dict(file), {}, f"{source} (a state dict)"
    else:
        doc, state = read_checkpoint_state(path)  # checked like load_checkpoint's, no second model built
        saved = doc["model"]
        if saved["name"] != name:
            raise CheckpointError(f"{source} holds a {saved['name']}, not a {name}")
        meta = doc.get("meta") or {}
        what = f"{source} ({name}, {saved['kwargs'].get('mode', 'sact')}, {saved['kwargs']})"
    differ = _load_fitting(model, state, what)
    keep = meta if not differ else {k: v for k, v in meta.items() if k == "preprocess"}  # what the weights expect
    model.checkpoint_meta = dict(keep)
    model._pretrained_source = {"file": str(file if kind in ("torch", "safetensors") else path),
                                **({"url": url} if url else {})}
    return model


def _load_fitting(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> list[str]:
    """Load ``state`` into ``model``, the halting branches and the classifier fresh where they differ.

    Returns:
        The parts (``"halting branches"``, ``"classifier"``) whose tensors in ``state``
        differ from ``model``'s in names or shapes: those of ``state`` are not loaded.

    Raises:
        CheckpointError: any other tensor missing, unexpected or of another shape (a few of each listed).
    """
    own = model.state_dict()
    head = f"{model.classifier_name}."
    parts = {"halting branches": lambda k: ".halting." in k, "classifier": lambda k: k.startswith(head)}
    differ = []
    for part, inside in parts.items():
        if ({k: v.shape for k, v in state.items() if inside(k)} != {k: v.shape for k, v in own.items() if inside(k)}):
            differ.append(part)
            state = {k: v for k, v in state.items() if not inside(k)}
            own = {k: v for k, v in own.items() if not inside(k)}
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    shapes = sorted(f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state
                    if k in own and state[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{what} does not fit the model ({model.sact_config['name']}, {model.mode}, "
            f"{model.sact_config['kwargs']}): missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shapes "
            f"{shapes[:5]} ({len(missing)}, {len(unexpected)} and {len(shapes)} in all)"
        )
    model.load_state_dict(state, strict=False)
    return differ
