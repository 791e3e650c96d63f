"""Convolutions and products with prepacked oneDNN weights: the engine's dense parts at runtime speed.

OpenVINO and ONNX Runtime run a ResNet's convolutions with weights reordered *once* into
the blocked layout their kernels read, and fuse the bias, the ReLU and the residual addition
into the convolution. ``F.conv2d`` on a channels-last tensor and ``mkldnn._linear_pointwise``
with a plain weight reorder the weight on every call: measured here (2 threads, batch 1;
``python benchmarks/dnn_kernels.py --threads 2 --rounds 7 --tag 2threads``), a 512->512 3x3
convolution on a 7x7 map costs 0.76 ms through ``F.conv2d`` and 0.41 ms with the weight packed;
an ``(8 x 4608) @ (4608 x 512)`` row product (stage 4's conv2 on a few active rows) 0.18 ms
plain and 0.11 ms packed.

:class:`PackedConv` is a convolution with its (BN-folded) bias whose weight is packed once
per input shape, run through ``torch.ops.mkldnn._convolution_pointwise`` with the ReLU fused,
and ``add_`` its in-place form (``out = act(out + conv(x))``: a unit's last convolution
adding into the row buffer, no copy). :func:`packed_linear_weight` packs an ``(out, in)``
weight for ``_linear_pointwise`` (the sparse kernels' products). Both are used for
float32 CPU features when torch has the ops (:func:`available`); everything else (other
dtypes, CUDA, builds without oneDNN) runs the plain torch ops, with the same results up to
float rounding.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["available", "usable", "set_enabled", "PackedConv", "packed_linear_weight"]

_state: dict = {"ok": None, "enabled": True}


def available() -> bool:
    """True when torch has oneDNN's fused convolution ops and weight packing."""
    if _state["ok"] is None:
        try:
            mk = torch.ops.mkldnn
            _state["ok"] = bool(torch.backends.mkldnn.is_available()) and all(
                hasattr(mk, n) for n in ("_convolution_pointwise", "_convolution_pointwise_",
                                         "_reorder_convolution_weight", "_linear_pointwise",
                                         "_reorder_linear_weight"))
        except Exception:  # noqa: BLE001 - any failure means: do not use it
            _state["ok"] = False
    return _state["ok"]


def set_enabled(flag: bool) -> bool:
    """Use the packed oneDNN paths where they apply (default ``True``); returns the previous setting.

    ``False`` runs the plain torch ops everywhere (for comparisons; the results are equal up to rounding)."""
    old = _state["enabled"]
    _state["enabled"] = bool(flag)
    return old


def usable(x: Tensor) -> bool:
    """True when the packed paths run for features ``x``: float32 on the CPU, oneDNN available, enabled."""
    return _state["enabled"] and x.device.type == "cpu" and x.dtype == torch.float32 and available()


def packed_linear_weight(wt: Tensor) -> Tensor:
    """``(out, in)`` float32 CPU weight -> oneDNN's packed copy for ``_linear_pointwise`` (``wt`` if it does not apply)."""
    if not (wt.device.type == "cpu" and wt.dtype == torch.float32 and available()):
        return wt
    return torch.ops.mkldnn._reorder_linear_weight(wt.contiguous())


class PackedConv:
    """``conv(x) + bias`` with the weight packed for oneDNN once per input shape (the last few kept).

    Args:
        weight: ``[O, I, kh, kw]`` (batch norm folded in), the features' dtype; kept as given (a
            kernel's own weight buffer or a view of it: no copy), packed copies are made from it.
        bias: ``[O]``.
        stride, padding: as in ``F.conv2d`` (square).

    ``x`` is ``[B, I, H, W]``, best channels-last (a row buffer's view); results are
    channels-last. Not an ``nn.Module``: its kernel module keeps the plain weights as
    buffers and rebuilds it in ``refresh``; inputs the packed path does not take
    (:func:`usable`) run ``F.conv2d`` on ``weight``.
    """

    MAX_SHAPES = 4

    def __init__(self, weight: Tensor, bias: Tensor, *, stride: int = 1, padding: int = 0) -> None:
        self.weight = weight
        self.bias = bias
        self.stride = stride
        self.padding = padding
        self._packs: OrderedDict = OrderedDict()

    def _packed(self, x: Tensor) -> Tensor:
        key = tuple(x.shape)
        p = self._packs.get(key)
        if p is None:
            p = torch.ops.mkldnn._reorder_convolution_weight(
                self.weight, [self.padding] * 2, [self.stride] * 2, [1, 1], 1, list(key))
            self._packs[key] = p
            while len(self._packs) > self.MAX_SHAPES:
                self._packs.popitem(last=False)
        else:
            self._packs.move_to_end(key)
        return p

    def _fast(self, x: Tensor) -> bool:
        return usable(x) and self.weight.device == x.device and self.weight.dtype == x.dtype

    def __call__(self, x: Tensor, *, relu: bool = False) -> Tensor:
        """``act(conv(x) + bias)`` as a new channels-last tensor."""
        if self._fast(x):
            return torch.ops.mkldnn._convolution_pointwise(
                x, self._packed(x), self.bias, [self.padding] * 2, [self.stride] * 2, [1, 1], 1,
                "relu" if relu else "none", [], "")
        y = F.conv2d(x, self.weight, self.bias, stride=self.stride, padding=self.padding)
        return y.relu_() if relu else y

    def add_(self, out: Tensor, x: Tensor, *, relu: bool = False) -> Tensor:
        """``out = act(out + conv(x) + bias)`` in place (``out`` channels-last contiguous, e.g. a row buffer's view)."""
        if self._fast(x) and out.is_contiguous(memory_format=torch.channels_last):
            return torch.ops.mkldnn._convolution_pointwise_.binary(
                out, x, self._packed(x), self.bias, [self.padding] * 2, [self.stride] * 2, [1, 1], 1,
                "add", 1.0, "relu" if relu else None, [], None)
        out.add_(F.conv2d(x, self.weight, self.bias, stride=self.stride, padding=self.padding))
        return out.relu_() if relu else out
