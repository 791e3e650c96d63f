"""How the engine's kernels hold modules of the model they wrap."""

from __future__ import annotations

from torch import nn

__all__ = ["keep_ref"]


def keep_ref(module: nn.Module, name: str, value: nn.Module) -> None:
    """``module.name = value`` without registering ``value`` as a submodule: the wrapped model
    owns it (its parameters are not listed, moved or saved twice)."""
    object.__setattr__(module, name, value)
