"""Native CPU kernels of the sparse engine (C++/OpenMP), compiled on first use.

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
``python -m sact.sparse.native`` builds them ahead of time.
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

_SOURCE = Path(__file__).resolve().parent / "csrc" / "rows.cpp"
_SOURCES = (_SOURCE, _SOURCE.with_name("basic_stage.cpp"))  # one extension: row kernels, CIFAR stages
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


def bottleneck_rows(X, S, t1, idx, dil, nbr, m1, b1, m2, b2, m3, b3, hw: int, chunk: int, min_rows: int, *,
                    pre_scale: Tensor | None = None, pre_shift: Tensor | None = None, final_relu: bool = True,
                    wt: tuple[Tensor, Tensor, Tensor] | None = None) -> None:
    """Fused sparse bottleneck (see ``csrc/rows.cpp``): updates ``X`` at ``idx`` and ``S`` in place.

    ``pre_scale`` / ``pre_shift`` (``[C]``): a pre-activation unit's BN, applied with a ReLU to
    the rows conv1 reads; ``final_relu=False`` for pre-activation units (no ReLU after the sum).
    ``wt``: the three weights as ``(out, in)`` matrices: the products then run through oneDNN
    (:mod:`sact.sparse.gemm`) with the bias and ReLU fused; ``None``: ``m1, m2, m3`` with at::mm.
    """
    empty = X.new_empty(0)
    wt1, wt2, wt3 = wt if wt is not None else (empty, empty, empty)
    torch.ops.sact_native.bottleneck_rows(X, S, t1, idx, dil, nbr, m1, b1, m2, b2, m3, b3,
                                          empty if pre_scale is None else pre_scale,
                                          empty if pre_shift is None else pre_shift, final_relu, wt1, wt2, wt3,
                                          hw, chunk, min_rows)


def halting_rows(X, idx, dil, nbr, wz, cz, scale, shift, slope: float, identity: bool, glob, hw: int) -> Tensor:
    """SACT halting probabilities at the rows ``idx`` (see ``csrc/rows.cpp``)."""
    return torch.ops.sact_native.halting_rows(X, idx, dil, nbr, wz, cz, scale, shift, slope, identity, glob, hw)


def dilate_rows(idx: Tensor, nbr: Tensor) -> Tensor:
    """Sorted rows of the 3x3-dilated set of the rows ``idx``."""
    return torch.ops.sact_native.dilate_rows(idx, nbr)


def accumulate_rows(out: Tensor, X: Tensor, idx: Tensor, w: Tensor) -> None:
    """``out[idx] += w[:, None] * X[idx]`` in place."""
    torch.ops.sact_native.accumulate_rows(out, X, idx, w)


def halting_step_rows(state, dist: Tensor, O: Tensor, X: Tensor, idx: Tensor | None, proba: Tensor | None, eps: float,
                      *, first: bool) -> Tensor:
    """:func:`sact.act.halting_step` at the running rows ``idx`` (``None``: all), in place on the full
    :class:`~sact.act.HaltingState` ``state``, fused with the stage output accumulation (see
    ``csrc/rows.cpp``). Returns the rows still running."""
    empty = dist.new_empty(0)
    return torch.ops.sact_native.halting_step_rows(
        state.cumsum, state.remainder, state.ponder_cost, state.num_units, state.finished, dist, O, X,
        idx if idx is not None else torch.empty(0, dtype=torch.long), idx is None,
        empty if proba is None else proba, float(eps), first)


if __name__ == "__main__":  # python -m sact.sparse.native: build ahead of time
    build(verbose=True)
    print("sact native kernels built:", _build_name())
