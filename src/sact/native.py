"""The native CPU kernels (C++/OpenMP) of ``sact/csrc``, compiled on first use: one extension
for the sparse engine's row and stage kernels (:mod:`sact.sparse.native` wraps them) and the
fused halting unit of training (:mod:`sact.halting_fused`).

The row kernels of :mod:`sact.sparse.unit_kernels` and :mod:`sact.sparse.halting_kernels` have two implementations: pure PyTorch (the
reference, used on CUDA and wherever the native kernels are unavailable) and the fused
C++ kernels of ``csrc/rows.cpp``, which gather, multiply, apply the epilogue and scatter
per chunk of rows without returning to Python (one chunk per thread with single-threaded
GEMMs when there are enough rows). They are compiled with
:func:`torch.utils.cpp_extension.load` the first time a sparse model runs on the CPU
(about a minute; the build is cached in ``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``) and need a C++ compiler and ``ninja``. When the build fails
the engine warns once and uses the pure-PyTorch kernels.

``SACT_NATIVE=0`` in the environment, or :func:`set_enabled` ``(False)``, turns them off.
``python -m sact.native`` builds them ahead of time.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["available", "enabled", "set_enabled", "build", "use_for", "load_error"]

_CSRC = Path(__file__).resolve().parent / "csrc"
# one extension: row kernels, CIFAR stages, the fused halting unit of training
_SOURCES = (_CSRC / "rows.cpp", _CSRC / "basic_stage.cpp", _CSRC / "halting_train.cpp")
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_lock = threading.Lock()
_state: dict = {"loaded": False, "error": None, "tried": False, "enabled": os.environ.get("SACT_NATIVE", "1") != "0"}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _build_name() -> str:
    # -march=native code is specific to this CPU: the build name carries the source, the
    # torch version and the CPU, so a shared cache never hands one machine another's binary.
    h = hashlib.sha1()
    for src in _SOURCES:
        h.update(src.read_bytes())
    h.update(torch.__version__.encode())
    h.update(_cpu_model().encode())
    return f"sact_native_{h.hexdigest()[:12]}"


def build(*, verbose: bool = False) -> None:
    """Compile (or load the cached build of) the native kernels; raises on failure."""
    # Importing cpp_extension logs "No CUDA runtime is found" on CPU-only machines; these
    # kernels are CPU-only, so the line is noise.
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import load
    finally:
        log.setLevel(level)

    flags = ["-O3", "-fopenmp"]
    if platform.machine() in ("x86_64", "AMD64"):
        flags.append("-march=native")
    load(
        name=_build_name(),
        sources=[str(src) for src in _SOURCES],
        extra_cflags=flags,
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=verbose,
    )


def available() -> bool:
    """True when the native kernels are loaded (building them on the first call)."""
    if _state["loaded"] or _state["tried"]:
        return _state["loaded"]
    with _lock:
        if not _state["tried"]:
            _state["tried"] = True
            try:
                build()
                _state["loaded"] = True
            except Exception as err:  # no compiler, no ninja, unsupported platform...
                _state["error"] = f"{type(err).__name__}: {err}"
                warnings.warn(
                    "sact: the native sparse kernels could not be built; using the pure-PyTorch kernels "
                    f"(slower). Reason: {_state['error'][:500]}",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return _state["loaded"]


def load_error() -> str | None:
    """Why the build failed (``None`` if it did not fail or was not tried)."""
    return _state["error"]


def enabled() -> bool:
    """Whether the engine may use the native kernels (``SACT_NATIVE=0`` / :func:`set_enabled`)."""
    return _state["enabled"]


def set_enabled(flag: bool) -> bool:
    """Turn the native kernels on or off for this process; returns the previous setting."""
    prev = _state["enabled"]
    _state["enabled"] = bool(flag)
    return prev


def use_for(x: Tensor) -> bool:
    """Use the native kernels for rows ``x``: enabled, on the CPU, a float dtype, and built."""
    return _state["enabled"] and x.device.type == "cpu" and x.dtype in _DTYPES and available()


if __name__ == "__main__":  # python -m sact.native: build ahead of time
    build(verbose=True)
    print("sact native kernels built:", _build_name())
