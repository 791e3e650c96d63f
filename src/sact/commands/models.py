"""``sact models``: list the registered models with their FLOPs."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list registered models and their vanilla FLOPs")
    p.add_argument("pattern", nargs="*", help="only the names matching these shell patterns (e.g. 'resnet*_cifar')")
    p.add_argument("--image-size", type=int, default=None, help="input size (default: 32 for *_cifar, 224 otherwise)")
    p.set_defaults(func=run)


def model_rows(image_size: int | None = None, pattern: list[str] | None = None) -> list[tuple[str, int, int, int]]:
    """``(name, parameters, vanilla FLOPs of one image, input side)`` of the registered models
    (those matching ``pattern``, :func:`sact.list_models`).

    Nothing is computed: each model is built on PyTorch's ``meta`` device and its FLOPs
    are counted by :func:`sact.tools.ponder.vanilla_flops` (``FlopCounterMode`` over a meta
    forward), which equals a real forward's ``out.flops`` (tests/test_cli_help.py).
    """
    import torch

    from .. import create_model, list_models
    from ..models import vanilla_flops

    rows = []
    for name in list_models(pattern or None):
        size = image_size or (32 if name.endswith("_cifar") else 224)
        with torch.device("meta"):
            model = create_model(name, mode="vanilla").eval()
        rows.append((name, sum(p.numel() for p in model.parameters()), vanilla_flops(model, (size, size)), size))
    return rows


def run(args: argparse.Namespace) -> int:
    from ..errors import InputError

    if args.image_size is not None and args.image_size < 1:
        raise InputError(f"--image-size must be positive, got {args.image_size}")
    rows = model_rows(args.image_size, args.pattern)
    if not rows:
        raise InputError(f"no registered model matches {' '.join(args.pattern)} (sact models lists them all)")
    print(f"{'model':<18} {'params':>12} {'vanilla GFLOPs':>15} {'input':>6}")
    for name, params, flops, size in rows:
        print(f"{name:<18} {params:>12,} {flops / 1e9:>15.3f} {size:>6}")
    return 0
