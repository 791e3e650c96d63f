"""Model registry: :func:`create_model`, :func:`list_models`, :func:`register_model`.

Every registered name is a builder ``builder(*, mode, **kwargs) -> AdaptiveResNet``;
:func:`create_model` checks the keyword arguments against the builder's signature,
records ``model.sact_config`` (what checkpoints store to rebuild the model), loads
``pretrained`` weights and makes ``features_only`` models, as timm's ``create_model``.
"""

from __future__ import annotations

import fnmatch
import inspect
import os
from typing import Callable, Sequence

from .base import AdaptiveResNet, FeatureInfo
from .cifar import CifarResNet
from .resnet import BasicBlock, ResNet, load_torchvision_weights

__all__ = [
    "AdaptiveResNet",
    "BasicBlock",
    "CifarResNet",
    "FeatureInfo",
    "ResNet",
    "create_model",
    "list_models",
    "register_model",
    "load_torchvision_weights",
]

_REGISTRY: dict[str, Callable[..., AdaptiveResNet]] = {}


def _origin(fn) -> tuple[str | None, str | None]:
    return getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)


def register_model(name=None, builder: Callable[..., AdaptiveResNet] | None = None):
    """Register a model builder under a name; usable as ``@register_model``, ``@register_model("name")``
    or ``register_model("name", builder)``.

    The builder is called as ``builder(mode=..., **kwargs)`` by :func:`create_model` and
    returns an :class:`AdaptiveResNet` subclass (the protocol is in
    :mod:`sact.models.base`; example in ``docs/custom_units.md``). Registering the same
    name again with a function of the same module and qualified name replaces it (a
    re-run notebook cell or script); any other duplicate is an error.

    Args:
        name: the name for :func:`create_model` (default: the function's ``__name__``).
        builder: the builder (omit to use this as a decorator).

    Raises:
        ValueError: the name is taken by another builder, or the builder takes no ``mode``.
    """
    if callable(name) and builder is None:  # bare @register_model
        return register_model(name.__name__, name)

    def deco(fn):
        key = name if name is not None else fn.__name__
        if not isinstance(key, str) or not key:
            raise ValueError(f"model name must be a non-empty string, got {key!r}")
        params = inspect.signature(fn).parameters
        if "mode" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            raise ValueError(f"builder {fn.__qualname__} of {key!r} must take a 'mode' keyword argument")
        if key in _REGISTRY and _origin(_REGISTRY[key]) != _origin(fn):
            raise ValueError(f"model {key!r} is already registered (by {_REGISTRY[key].__module__})")
        _REGISTRY[key] = fn
        return fn

    return deco(builder) if builder is not None else deco


def list_models(pattern: str | Sequence[str] | None = None) -> list[str]:
    """Names accepted by :func:`create_model`, sorted.

    Args:
        pattern: a shell-style wildcard (``fnmatch``: ``"resnet*_cifar"``, ``"resnet?0"``), or
            a list of them (a name matching any is kept); ``None`` for every name.
    """
    names = sorted(_REGISTRY)
    if pattern is None:
        return names
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def create_model(
    name: str,
    *,
    mode: str = "sact",
    pretrained: bool | str | os.PathLike | None = None,
    features_only: bool = False,
    out_indices: Sequence[int] | None = None,
    **kwargs,
) -> AdaptiveResNet:
    """Build a registered model (timm's ``create_model``).

    Args:
        name: one of :func:`list_models` (e.g. ``"resnet32_cifar"``, ``"resnet18"``).
        mode: ``"vanilla"``, ``"act"`` or ``"sact"`` (the default: a SACT model).
        pretrained: weights to start from: an sact checkpoint of the same architecture,
            a path (``NAME``, ``NAME.safetensors``, its folder) or an ``http(s)://`` URL of
            its ``.safetensors`` file (cached by torch.hub; offline, a
            :class:`~sact.CheckpointError` says so), whose stored arguments are used
            (``kwargs`` need not repeat them; one that differs is an error, except
            ``num_classes``); or a plain state dict file (a torchvision ``.pth``, a
            ``.safetensors`` of a ``state_dict()``; read without running code). Halting
            branches of another mode (or none) and a classifier of another size stay fresh
            (:func:`sact.models.pretrained.load_pretrained`). ``None``/``False``: none.
        features_only: return the stages' feature maps instead of logits (timm): the
            model's ``forward`` returns a list of ``[B, C_s, H_s, W_s]``, described by
            ``model.feature_info``; ``forward_features`` still gives ponder maps and FLOPs.
            A checkpoint of it holds the whole network: :func:`sact.load_checkpoint`
            returns the classifier; ``create_model(name, features_only=True,
            pretrained=path)`` the backbone again.
        out_indices: stages returned with ``features_only`` (default: all; negative ok).
        **kwargs: keyword arguments of the builder (``num_classes`` (0: no classifier),
            ``in_chans``, ``eps``, ``base_width`` / ``base_channels``, ...).

    Returns:
        The model in train mode; ``model.sact_config`` holds ``{"name", "kwargs"}`` to
        rebuild it, ``model.pretrained_cfg`` what its weights expect.

    Raises:
        ValueError: unknown name or mode, arguments the builder does not take, bad values.
        TypeError: the builder did not return an :class:`AdaptiveResNet`.
        sact.CheckpointError: ``pretrained`` cannot be read, downloaded or does not fit.
    """
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown model {name!r}; available: {', '.join(list_models())} (a model of your own must be "
            "registered with sact.register_model first: import the module that registers it)"
        )
    from ..stage import MODES

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not features_only and out_indices is not None:
        raise ValueError(f"out_indices={out_indices!r} needs features_only=True")
    builder = _REGISTRY[name]
    params = inspect.signature(builder).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        bad = [k for k in kwargs if k not in params]
        if bad:
            raise ValueError(f"{name} does not accept {bad}; accepted: {sorted(p for p in params if p != 'mode')}")
    pretrained = None if pretrained is False else pretrained
    if pretrained is not None:
        from .pretrained import pretrained_kwargs

        kwargs = pretrained_kwargs(name, pretrained, mode, kwargs)  # a checkpoint's stored arguments
    model = builder(mode=mode, **kwargs)
    if not isinstance(model, AdaptiveResNet):
        raise TypeError(
            f"builder of {name!r} returned a {type(model).__name__}; it must return a subclass of "
            "sact.models.AdaptiveResNet (docs/custom_units.md)"
        )
    model.sact_config = {"name": name, "kwargs": {"mode": mode, **kwargs}}
    if pretrained is not None:
        from .pretrained import load_pretrained

        load_pretrained(model, pretrained)
    if features_only:
        model.set_features_only(out_indices)  # not in sact_config: checkpoints hold the whole network
    return model


def _cifar(n: int) -> Callable[..., CifarResNet]:
    def build(*, mode: str = "sact", num_classes: int = 10, in_chans: int = 3, base_channels: int = 16, eps: float = 0.01):
        return CifarResNet(layers=(n, n, n), mode=mode, num_classes=num_classes, in_chans=in_chans,
                           base_channels=base_channels, eps=eps)

    return build


def _imagenet(layers: tuple[int, int, int, int], block: str) -> Callable[..., ResNet]:
    def build(*, mode: str = "sact", num_classes: int = 1000, in_chans: int = 3, base_width: int = 64,
              eps: float = 0.01, zero_init_residual: bool = False):
        return ResNet(layers=layers, block=block, mode=mode, num_classes=num_classes, in_chans=in_chans,
                      base_width=base_width, eps=eps, zero_init_residual=zero_init_residual)

    return build


for _depth, _n in ((20, 3), (32, 5), (56, 9), (110, 18)):
    register_model(f"resnet{_depth}_cifar", _cifar(_n))
for _depth, _layers, _block in ((18, (2, 2, 2, 2), "basic"), (34, (3, 4, 6, 3), "basic"),
                                (50, (3, 4, 6, 3), "bottleneck"), (101, (3, 4, 23, 3), "bottleneck"),
                                (152, (3, 8, 36, 3), "bottleneck")):
    register_model(f"resnet{_depth}", _imagenet(_layers, _block))

# Reference-faithful ImageNet pre-activation ResNet-v2 family (sact.models.resnet_v2).
from .resnet_v2 import V2_LAYERS as _V2_LAYERS, PreActBottleneck, ResNetV2, build_resnet_v2 as _build_v2  # noqa: E402

__all__ += ["ResNetV2", "PreActBottleneck"]
for _depth, _layers in _V2_LAYERS.items():
    register_model(f"resnet{_depth}_v2", _build_v2(_layers))
