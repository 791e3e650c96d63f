"""``sact convert-tf``: convert a reference TensorFlow checkpoint into an sact checkpoint."""

from __future__ import annotations

import argparse

HELP = """\
Convert a checkpoint of the reference TensorFlow code (github.com/mfigurnov/sact) into an
sact checkpoint (safetensors + JSON). Needs TensorFlow: pip install tensorflow-cpu.

examples:
  sact convert-tf models/imagenet_101_sact_5e-3 --model resnet101_v2 --mode sact --tau 0.005 --out ckpt/imagenet_101_sact
  sact convert-tf models/imagenet_101 --model resnet101_v2 --mode vanilla --out ckpt/imagenet_101
  sact convert-tf models/cifar10_resnet_5_sact_1e-2 --model resnet32_cifar --mode sact --tau 0.01 --out ckpt/cifar32_sact
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert-tf",
        help="convert a reference TensorFlow checkpoint (.index + .data-*) to an sact checkpoint",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT_PREFIX",
                   help="TF checkpoint prefix (e.g. models/x/model.ckpt-1000), its .index file, or a folder")
    p.add_argument("--model", required=True, help="resnet50_v2 | resnet101_v2 | resnet152_v2 | resnet{20,32,56,110}_cifar")
    p.add_argument("--mode", required=True, choices=("vanilla", "act", "sact"), help="mode the checkpoint was trained in")
    p.add_argument("--out", required=True, help="output folder (writes OUT/model.safetensors + OUT/model.json)")
    p.add_argument("--tau", type=float, default=None, help="ponder cost weight it was trained with (stored in meta)")
    p.add_argument("--scope", default=None,
                   help="top-level TF variable scope (default: resnet_v2 / resnet_residual, or the only one found)")
    p.add_argument("--num-classes", type=int, default=None, help="default: read from the checkpoint")
    p.add_argument("--fresh-halting", action="store_true",
                   help="allow missing halting branches (fresh init), e.g. --mode sact from a vanilla checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..tools.convert_tf import convert_to_folder

    model = convert_to_folder(args.checkpoint, model=args.model, mode=args.mode, out=args.out, tau=args.tau,
                              scope=args.scope, num_classes=args.num_classes, fresh_halting=args.fresh_halting,
                              overwrite=args.overwrite)
    src = model.checkpoint_meta["source"]
    n = sum(p.numel() for p in model.parameters())
    print(f"converted {src['prefix']} (scope {src['scope']!r}, {src['ignored_variables']} optimizer/EMA variables "
          f"ignored) -> {args.out}/model.safetensors: {args.model} ({args.mode}), {n:,} parameters")
    if src["fresh_halting"]:
        print(f"  {len(src['fresh_halting'])} halting-branch tensors were not in the checkpoint and keep their "
              "fresh initialisation")
    return 0
