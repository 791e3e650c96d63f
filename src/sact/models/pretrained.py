"""``create_model(name, pretrained=...)``: weights from an sact checkpoint, a local file or a URL.

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
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from ..checkpoint import CheckpointError, load_checkpoint

__all__ = ["load_pretrained", "download_checkpoint", "DOWNLOAD_TIMEOUT_S"]

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


def load_pretrained(model: nn.Module, source: str | os.PathLike, *, progress: bool = True) -> nn.Module:
    """Load the weights of an sact checkpoint (path or URL) into ``model`` (built by ``create_model``).

    The checkpoint must hold the same architecture (``sact_config["name"]``), in any mode
    and with any number of classes, as a fine-tuning start (timm's ``pretrained``): every
    tensor is loaded except halting branches of another mode (they stay fresh) and a
    classifier of another size (it stays fresh). Without those differences the model equals
    the saved one, and ``model.checkpoint_meta`` is the checkpoint's ``meta``; otherwise it
    keeps only the ``preprocess`` the weights expect.

    Args:
        model: the model, with ``sact_config``.
        source: ``NAME`` / ``NAME.safetensors`` / ``NAME.json`` / a folder (see
            :func:`sact.load_checkpoint`), or an ``http(s)://`` URL of ``NAME.safetensors``.
        progress: progress bar while downloading.

    Returns:
        ``model``, with ``model.pretrained_cfg`` naming the ``file`` (and ``url``).

    Raises:
        CheckpointError: missing, corrupt or unfit checkpoint, or a failed download.
    """
    if isinstance(source, bool):
        raise CheckpointError(
            "sact hosts no default weights: pass pretrained=<path or URL of an sact checkpoint>; torchvision's "
            "ImageNet weights load with sact.load_torchvision_weights (docs/api.md)"
        )
    url = str(source) if _is_url(source) else None
    path = download_checkpoint(url, progress=progress) if url else Path(source)
    src = load_checkpoint(path)
    name = model.sact_config["name"]
    if src.sact_config["name"] != name:
        raise CheckpointError(f"{source} holds a {src.sact_config['name']}, not a {name}")
    state, own = src.state_dict(), model.state_dict()
    dropped = []
    if src.mode != model.mode:
        dropped += [k for k in state if ".halting." in k]
    head = f"{model.classifier_name}."
    if src.num_classes != model.num_classes:
        dropped += [k for k in state if k.startswith(head)]
    state = {k: v for k, v in state.items() if k not in set(dropped)}
    fresh = lambda k: (src.mode != model.mode and ".halting." in k) or (  # noqa: E731
        src.num_classes != model.num_classes and k.startswith(head))
    missing = sorted(k for k in own if k not in state and not fresh(k))
    unexpected = sorted(k for k in state if k not in own)
    shapes = sorted(f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state
                    if k in own and state[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{source} ({name}, {src.mode}, {src.sact_config['kwargs']}) does not fit the model ({model.mode}, "
            f"{model.sact_config['kwargs']}): missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shapes {shapes[:5]}"
        )
    model.load_state_dict(state, strict=False)
    meta = getattr(src, "checkpoint_meta", None) or {}
    model.checkpoint_meta = dict(meta) if not dropped else ({"preprocess": meta["preprocess"]} if "preprocess" in meta else {})
    model._pretrained_source = {"file": str(path), **({"url": url} if url else {})}
    return model
