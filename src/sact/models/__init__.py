"""Model registry: :func:`create_model` and :func:`list_models`."""

from __future__ import annotations

import inspect
from typing import Callable

from torch import nn

from .base import AdaptiveResNet
from .cifar import CifarResNet
from .resnet import ResNet, load_torchvision_weights

__all__ = [
    "AdaptiveResNet",
    "CifarResNet",
    "ResNet",
    "create_model",
    "list_models",
    "register_model",
    "load_torchvision_weights",
]

_REGISTRY: dict[str, Callable[..., AdaptiveResNet]] = {}


def register_model(name: str, builder: Callable[..., AdaptiveResNet] | None = None):
    """Register ``builder(**kwargs) -> model`` under ``name`` (usable as a decorator)."""

    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco(builder) if builder is not None else deco


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return sorted(_REGISTRY)


def create_model(name: str, *, mode: str = "sact", **kwargs) -> AdaptiveResNet:
    """Build a registered model.

    Args:
        name: one of :func:`list_models` (e.g. ``"resnet32_cifar"``, ``"resnet101"``).
        mode: ``"vanilla"``, ``"act"`` or ``"sact"``.
        **kwargs: keyword arguments of the model class (``num_classes``, ``in_chans``,
            ``eps``, ...).

    Returns:
        The model; ``model.sact_config`` holds ``{"name", "kwargs"}`` to rebuild it.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    from ..stage import MODES

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    builder = _REGISTRY[name]
    params = inspect.signature(builder).parameters
    bad = [k for k in kwargs if k not in params]
    if bad:
        raise ValueError(f"{name} does not accept {bad}; accepted: {sorted(p for p in params if p != 'mode')}")
    model = builder(mode=mode, **kwargs)
    model.sact_config = {"name": name, "kwargs": {"mode": mode, **kwargs}}
    return model


def _cifar(n: int) -> Callable[..., CifarResNet]:
    def build(*, mode: str = "sact", num_classes: int = 10, in_chans: int = 3, base_channels: int = 16, eps: float = 0.01):
        return CifarResNet(layers=(n, n, n), mode=mode, num_classes=num_classes, in_chans=in_chans,
                           base_channels=base_channels, eps=eps)

    return build


def _imagenet(layers: tuple[int, int, int, int]) -> Callable[..., ResNet]:
    def build(*, mode: str = "sact", num_classes: int = 1000, in_chans: int = 3, base_width: int = 64,
              eps: float = 0.01, zero_init_residual: bool = False):
        return ResNet(layers=layers, mode=mode, num_classes=num_classes, in_chans=in_chans, base_width=base_width,
                      eps=eps, zero_init_residual=zero_init_residual)

    return build


for _depth, _n in ((20, 3), (32, 5), (56, 9), (110, 18)):
    register_model(f"resnet{_depth}_cifar", _cifar(_n))
for _depth, _layers in ((50, (3, 4, 6, 3)), (101, (3, 4, 23, 3)), (152, (3, 8, 36, 3))):
    register_model(f"resnet{_depth}", _imagenet(_layers))

# Reference-faithful ImageNet pre-activation ResNet-v2 family (sact.models.resnet_v2).
from .resnet_v2 import V2_LAYERS as _V2_LAYERS, PreActBottleneck, ResNetV2, build_resnet_v2 as _build_v2  # noqa: E402

__all__ += ["ResNetV2", "PreActBottleneck"]
for _depth, _layers in _V2_LAYERS.items():
    register_model(f"resnet{_depth}_v2", _build_v2(_layers))
