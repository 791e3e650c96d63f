"""Models: :func:`create_model`, and the registry's :func:`list_models` and :func:`register_model`.

The registry (:mod:`sact.models.registry`) holds every builder
``builder(*, mode, **kwargs) -> AdaptiveResNet`` and builds them, checking the keyword
arguments against the builder's signature and recording ``model.sact_config`` (what
checkpoints store to rebuild the model). :func:`create_model` also loads ``pretrained``
weights (:mod:`sact.models.pretrained`) and makes ``features_only`` models, as timm's
``create_model``. Checkpoints are read and written by :mod:`sact.models.loading`.
"""

from __future__ import annotations

import os
import weakref
from typing import Callable, Sequence

import torch
from torch import nn

from ..flops import count_model_flops

from . import registry
from .base import AdaptiveResNet, FeatureInfo
from .cifar import CifarResNet
from .pretrained import load_pretrained, pretrained_kwargs
from .registry import _REGISTRY, check_model_args, list_models, register_model  # noqa: F401 (_REGISTRY: cli)
from .resnet import BasicBlock, ResNet, load_torchvision_weights

__all__ = [
    "model_summaries",
    "AdaptiveResNet",
    "BasicBlock",
    "CifarResNet",
    "FeatureInfo",
    "ResNet",
    "create_model",
    "list_models",
    "register_model",
    "vanilla_flops",
    "load_torchvision_weights",
]


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
    check_model_args(name, mode, kwargs)
    if not features_only and out_indices is not None:
        raise ValueError(f"out_indices={out_indices!r} needs features_only=True")
    pretrained = None if pretrained is False else pretrained
    if pretrained is not None:
        kwargs = pretrained_kwargs(name, pretrained, mode, kwargs)  # a checkpoint's stored arguments
    model = registry.build_model(name, mode=mode, **kwargs)
    if pretrained is not None:
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


#: model -> (its vanilla network on the meta device, {(H, W): FLOPs}); entries go with the model
_VANILLA: "weakref.WeakKeyDictionary[nn.Module, tuple[nn.Module, dict]]" = weakref.WeakKeyDictionary()


def vanilla_flops(model: nn.Module, size: tuple[int, int]) -> int | None:
    """FLOPs of the vanilla network of ``model``'s architecture on one ``size = (H, W)`` image.

    The reference to state a model's FLOPs against ("58% of the vanilla network"): the
    same registered model and arguments in ``mode="vanilla"`` (every unit at every
    position, no halting branches). Counted without computing anything: the vanilla
    model is built on the ``meta`` device and run under ``torch.utils.flop_counter.
    FlopCounterMode``, which equals sact's convention (2 x multiply-adds of convolutions
    and linear layers) on vanilla networks; a model that cannot run on ``meta`` is run
    once on the CPU instead. Counts are cached per model and size.

    Returns:
        The count, or None for a model not built by :func:`sact.create_model` (no ``sact_config``).
    """
    config = getattr(model, "sact_config", None)
    if not isinstance(config, dict):
        return None
    if model not in _VANILLA:
        kwargs = {k: v for k, v in config.get("kwargs", {}).items() if k != "mode"}
        try:
            with torch.device("meta"):
                vanilla = create_model(config["name"], mode="vanilla", **kwargs).eval()
        except (KeyError, TypeError, ValueError):
            return None
        _VANILLA[model] = (vanilla, {})
    vanilla, counts = _VANILLA[model]
    key = (int(size[0]), int(size[1]))
    if key not in counts:
        try:
            counts[key] = count_model_flops(vanilla, torch.empty(1, vanilla.in_chans, *key, device="meta"))
        except (RuntimeError, NotImplementedError):  # an op without a meta kernel: count on real tensors
            real = vanilla.to_empty(device="cpu")
            with torch.no_grad():
                counts[key] = int(real(torch.zeros(1, real.in_chans, *key)).flops[0].item())
    return counts[key]


def model_summaries(image_size: int | None = None, pattern: Sequence[str] | None = None) -> list[tuple[str, int, int, int]]:
    """``(name, parameters, vanilla FLOPs of one image, input side)`` of the registered models
    (those matching the shell patterns ``pattern``, :func:`list_models`; ``image_size`` default: 32 for
    ``*_cifar``, else 224).

    Nothing is computed: each model is built on PyTorch's ``meta`` device and its FLOPs
    are counted by :func:`vanilla_flops` (``FlopCounterMode`` over a meta forward), which
    equals a real forward's ``out.flops`` (tests/test_cli_help.py).
    """
    rows = []
    for name in list_models(list(pattern) if pattern else None):
        size = image_size or (32 if name.endswith("_cifar") else 224)
        with torch.device("meta"):
            model = create_model(name, mode="vanilla").eval()
        rows.append((name, sum(p.numel() for p in model.parameters()), vanilla_flops(model, (size, size)), size))
    return rows
