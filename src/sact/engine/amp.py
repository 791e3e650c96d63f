"""Mixed precision: which autocast dtype to use, and the fp16 gradient scaler.

``auto`` turns autocast on only where it reliably helps: CUDA (bf16 where the GPU
supports it, else fp16 with a ``GradScaler``). On CPU it stays off unless asked for
(``bf16``): with the narrow convolutions of the CIFAR-style models the casts cost
more than they save on most CPUs.

Under autocast the residual units run in the low-precision dtype, but the halting
branches run outside autocast in their weights' dtype (float32;
:func:`sact.halting.full_precision`), and the halting recurrence, the halting
distribution and the ponder cost are kept in float32 (:class:`sact.act.HaltingState`),
so the threshold ``>= 1 - eps`` is not moved by bfloat16 rounding; the weighted sum of
the unit outputs casts the weights to the features' dtype. The loss is computed on
float32 logits.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["amp_dtype", "autocast", "grad_scaler", "training_memory_format"]


def training_memory_format(value: str, device: torch.device, task: str = "classification") -> torch.memory_format:
    """The layout of weights and images in training for the config's ``memory_format``.

    ``"auto"``: channels-last for classification on the CPU (oneDNN's convolutions, and the
    halting branches' one-channel 3x3 convolutions above all, are much faster that way:
    ``benchmarks/train_step.py``), NCHW elsewhere.
    """
    if value == "channels_last" or (value == "auto" and device.type == "cpu" and task == "classification"):
        return torch.channels_last
    return torch.contiguous_format


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` (``"auto"|"none"|"bf16"|"fp16"``) on ``device``, or None.

    Raises:
        ValueError: ``fp16`` on CPU, or an unknown value.
    """
    if amp == "none":
        return None
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if device.type != "cuda":
            raise ValueError("amp='fp16' needs a CUDA device; use amp='bf16' or 'none' on CPU")
        return torch.float16
    raise ValueError(f"amp must be 'auto', 'none', 'bf16' or 'fp16', got {amp!r}")


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` for ``dtype``, or a no-op context when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """A ``GradScaler`` enabled only for fp16 (bf16 and fp32 need no loss scaling)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
