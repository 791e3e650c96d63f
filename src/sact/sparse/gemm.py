"""Matrix products of the row kernels, through oneDNN where it is the faster library.

The row kernels compute 1x1 convolutions as products of row matrices ``(M, K)`` with
folded weights. ``torch.addmm`` goes to the BLAS torch was built with (MKL in the
official wheels), which on some CPUs (AMD ones in particular) runs its AVX2 code path:
measured here, about half the speed of oneDNN, the library torch's own CPU
convolutions use (e.g. ``(3136 x 256) @ (256 x 64)``: 0.50 ms vs 0.24 ms, 2 threads,
``benchmarks/gemm_backends.py``). The
functions below use oneDNN (``torch.ops.mkldnn._linear_pointwise``, with the bias,
ReLU or residual addition fused) for float32 / bfloat16 / float16 CPU rows when torch has
it, and ``addmm`` otherwise (float64, CUDA, builds without oneDNN).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["onednn_available", "use_onednn", "linear", "linear_add"]

_ONEDNN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_state: dict = {"ok": None}


def onednn_available() -> bool:
    """True when torch has oneDNN's linear (``torch.ops.mkldnn._linear_pointwise``)."""
    if _state["ok"] is None:
        try:
            _state["ok"] = bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        except Exception:  # noqa: BLE001 - any failure means: do not use it
            _state["ok"] = False
    return _state["ok"]


def use_onednn(x: Tensor) -> bool:
    """True when products with ``x`` (rows) go through oneDNN: CPU, float32 / bfloat16 / float16."""
    return x.device.type == "cpu" and x.dtype in _ONEDNN_DTYPES and onednn_available()


def linear(x: Tensor, wt: Tensor, b: Tensor, *, relu: bool = False) -> Tensor:
    """``x @ wt.T + b`` (then ReLU).

    Args:
        x: ``(M, K)`` rows (may be a row slice of a larger buffer).
        wt: ``(N, K)`` contiguous weight (a 1x1 convolution's ``[N, K, 1, 1]`` flattened).
        b: ``(N,)`` bias.

    Returns:
        A new ``(M, N)`` contiguous tensor.
    """
    if use_onednn(x):
        return torch.ops.mkldnn._linear_pointwise(x, wt, b, "relu" if relu else "none", [], "")
    y = torch.addmm(b, x, wt.t())
    return y.relu_() if relu else y


def linear_add(x: Tensor, other: Tensor, wt: Tensor, b: Tensor) -> Tensor:
    """``x @ wt.T + b + other`` (a 1x1 convolution plus a residual), as a new ``(M, N)`` tensor."""
    if use_onednn(x):
        return torch.ops.mkldnn._linear_pointwise.binary(x, other, wt, b, "add")
    return torch.addmm(other, x, wt.t()).add_(b)
