"""``sact models``: list the registered models with their FLOPs."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list registered models and their vanilla FLOPs")
    p.add_argument("--image-size", type=int, default=None, help="input size (default: 32 for *_cifar, 224 otherwise)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from .. import create_model, list_models
    from ..errors import InputError

    if args.image_size is not None and args.image_size < 1:
        raise InputError(f"--image-size must be positive, got {args.image_size}")
    print(f"{'model':<18} {'params':>12} {'vanilla GFLOPs':>15} {'input':>6}")
    for name in list_models():
        size = args.image_size or (32 if name.endswith("_cifar") else 224)
        model = create_model(name, mode="vanilla").eval()
        with torch.no_grad():
            flops = model(torch.zeros(1, model.in_chans, size, size)).flops.item()
        params = sum(p.numel() for p in model.parameters())
        print(f"{name:<18} {params:>12,} {flops / 1e9:>15.3f} {size:>6}")
    return 0
