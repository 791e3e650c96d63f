"""The model registry: :func:`register_model`, :func:`list_models` and :func:`build_model`.

Every registered name is a builder ``builder(*, mode, **kwargs) -> AdaptiveResNet``.
:func:`build_model` is the one place a registered model is built: it checks the keyword
arguments against the builder's signature and records ``model.sact_config`` (what
checkpoints store to rebuild the model). :func:`sact.create_model` adds ``pretrained``
weights and ``features_only`` around it; :mod:`sact.models.loading` builds checkpoints'
models with it.
"""

from __future__ import annotations

import fnmatch
import inspect
from typing import Any, Callable, Sequence

from ..stage import MODES
from .base import AdaptiveResNet

__all__ = ["register_model", "list_models", "check_model_args", "build_model"]

_REGISTRY: dict[str, Callable[..., AdaptiveResNet]] = {}


def _origin(fn) -> tuple[str | None, str | None]:
    return getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)


def register_model(name=None, builder: Callable[..., AdaptiveResNet] | None = None):
    """Register a model builder under a name; usable as ``@register_model``, ``@register_model("name")``
    or ``register_model("name", builder)``.

    The builder is called as ``builder(mode=..., **kwargs)`` by :func:`sact.create_model` and
    returns an :class:`AdaptiveResNet` subclass (the protocol is in
    :mod:`sact.models.base`; example in ``docs/custom_units.md``). Registering the same
    name again with a function of the same module and qualified name replaces it (a
    re-run notebook cell or script); any other duplicate is an error.

    Args:
        name: the name for :func:`sact.create_model` (default: the function's ``__name__``).
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
    """Names accepted by :func:`sact.create_model`, sorted.

    Args:
        pattern: a shell-style wildcard (``fnmatch``: ``"resnet*_cifar"``, ``"resnet?0"``), or
            a list of them (a name matching any is kept); ``None`` for every name.
    """
    names = sorted(_REGISTRY)
    if pattern is None:
        return names
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def check_model_args(name: str, mode: str, kwargs: dict[str, Any]) -> None:
    """Checks that ``name`` is registered, ``mode`` is one of :data:`sact.stage.MODES` and its
    builder takes every keyword of ``kwargs``.

    Raises:
        ValueError: naming the models, modes or arguments accepted.
    """
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown model {name!r}; available: {', '.join(list_models())} (a model of your own must be "
            "registered with sact.register_model first: import the module that registers it)"
        )
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    params = inspect.signature(_REGISTRY[name]).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        bad = [k for k in kwargs if k not in params]
        if bad:
            raise ValueError(f"{name} does not accept {bad}; accepted: {sorted(p for p in params if p != 'mode')}")


def build_model(name: str, *, mode: str = "sact", **kwargs) -> AdaptiveResNet:
    """The registered model ``name`` built with ``mode`` and ``kwargs`` (checked by :func:`check_model_args`).

    Returns:
        The model in train mode, ``model.sact_config`` set to ``{"name", "kwargs"}``.

    Raises:
        ValueError: unknown name or mode, arguments the builder does not take, bad values.
        TypeError: the builder did not return an :class:`AdaptiveResNet`.
    """
    check_model_args(name, mode, kwargs)
    model = _REGISTRY[name](mode=mode, **kwargs)
    if not isinstance(model, AdaptiveResNet):
        raise TypeError(
            f"builder of {name!r} returned a {type(model).__name__}; it must return a subclass of "
            "sact.models.AdaptiveResNet (docs/custom_units.md)"
        )
    model.sact_config = {"name": name, "kwargs": {"mode": mode, **kwargs}}
    return model
