"""``sact models``: list the registered models with their FLOPs."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list registered models and their vanilla FLOPs")
    p.add_argument("pattern", nargs="*", help="only the names matching these shell patterns (e.g. 'resnet*_cifar')")
    p.add_argument("--image-size", type=int, default=None, help="input size (default: 32 for *_cifar, 224 otherwise)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import InputError

    if args.image_size is not None and args.image_size < 1:
        raise InputError(f"--image-size must be positive, got {args.image_size}")
    from ..models import model_summaries

    rows = model_summaries(args.image_size, args.pattern)
    if not rows:
        raise InputError(f"no registered model matches {' '.join(args.pattern)} (sact models lists them all)")
    print(f"{'model':<18} {'params':>12} {'vanilla GFLOPs':>15} {'input':>6}")
    for name, params, flops, size in rows:
        print(f"{name:<18} {params:>12,} {flops / 1e9:>15.3f} {size:>6}")
    return 0
