"""Shared pieces of the tests: a harmless pickle payload, tiny Fashion-MNIST files, CLI helpers."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np


class Payload:
    """Unpickling this object calls ``open(marker, "w")``: the marker file existing
    afterwards proves that the unpickler ran code named by the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def malicious_pickle(marker: Path, protocol: int = 2) -> bytes:
    return pickle.dumps({b"data": Payload(marker), b"labels": [0]}, protocol=protocol)


def tiny_fashion_mnist(folder: Path, n_train: int = 40, n_test: int = 20) -> Path:
    """Random Fashion-MNIST-format files (enough for cluttered canvases)."""
    from sact.data import write_idx

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", (np.arange(n) % 10).astype(np.uint8))
    return folder


#: the checkout's entries a docs example may not see: runs, reports, the venv and caches
_UNLINKED = {".git", ".venv", "runs", "reports", "build", "dist", ".pytest_cache", "__pycache__"}


def linked_root(workdir: Path) -> Path:
    """Makes ``workdir`` a stand-in for the repository root: its top-level entries linked (so
    ``configs/``, ``docs/`` ... are there), while what a docs example writes lands in ``workdir``,
    never in the checkout."""
    root = Path(__file__).resolve().parents[1]
    for entry in root.iterdir():
        if entry.name not in _UNLINKED and not (workdir / entry.name).exists():
            (workdir / entry.name).symlink_to(entry)
    return workdir


def snapshot(folder: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``folder`` (to prove nothing changed)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def error_line(err: str, command: str) -> str:
    """The stderr of a failed command must be exactly one line ``sact <command>: ...``."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    assert lines[0].startswith(f"sact {command}: "), lines[0]
    assert "Traceback" not in err
    return lines[0]


TRAIN_FLAGS = ["--model", "resnet20_cifar", "--set", "model_kwargs={base_channels: 4}", "--set", "train_samples=16",
               "--set", "eval_samples=8", "--set", "clutter={canvas_size: 32, num_clutter: 2}", "--steps", "2",
               "--batch-size", "8", "--device", "cpu", "--no-tensorboard", "--set", "progress=false"]
