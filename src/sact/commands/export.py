"""``sact export``: write a checkpoint's dense masked model as ONNX or a torch.export program."""

from __future__ import annotations

import argparse

def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a checkpoint to ONNX or torch.export (.pt2)",
        description="Export the dense masked model of a checkpoint: images [B, C, H, W] -> (logits [B, K], "
        "ponder_cost [B], ponder_map [B, H, W]), dynamic batch, fixed H and W. See docs/export.md.",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint NAME, NAME.safetensors or folder")
    p.add_argument("--format", choices=("onnx", "torch-export"), default=None,
                   help="output format (default: from the --out suffix, .onnx or .pt2)")
    p.add_argument("--out", required=True, help="output file (.onnx or .pt2)")
    p.add_argument("--image-size", type=int, default=None,
                   help="input side H = W, at most 6324 (default: the size the checkpoint was trained at; else 32 for "
                   "*_cifar, 224)")
    p.add_argument("--opset", type=int, default=None,
                   help="ONNX opset, from 18 to the highest the installed onnx defines (default: "
                   "sact.tools.export.DEFAULT_OPSET, 18)")
    p.add_argument("--verify", action="store_true",
                   help="reload the export and compare it with the eager model on random batches of 1 and 3")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..tools.export import export_checkpoint

    done = export_checkpoint(args.checkpoint, args.out, fmt=args.format, image_size=args.image_size, opset=args.opset,
                             overwrite=args.overwrite, verify=args.verify)
    c, h, w = done.doc["input_size"]
    print(f"wrote {done.path} ({done.fmt}, {done.path.stat().st_size / 1e6:.1f} MB): {done.doc['model']['name']} "
          f"mode={done.doc['mode']}, input [batch, {c}, {h}, {w}] -> logits, ponder_cost, ponder_map")
    for batch, diffs in done.differences.items():
        print(f"verify batch {batch}: max abs difference " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    return 0
