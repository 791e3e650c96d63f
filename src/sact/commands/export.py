"""``sact export``: write a checkpoint's dense masked model as ONNX or a torch.export program."""

from __future__ import annotations

import argparse

_SUFFIX_FORMATS = {".onnx": "onnx", ".pt2": "torch-export"}


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
    from pathlib import Path

    import torch

    from ..models.loading import load_checkpoint
    from ..errors import InputError, RunFailure
    from ..tools.export import (DEFAULT_OPSET, MAX_IMAGE_SIZE, ExportableModel, check_opset, export_model, load_exported,
                          metadata_path)
    from ..io.files import check_output_file, prepare_outputs

    fmt = args.format or _SUFFIX_FORMATS.get(Path(args.out).suffix.lower())
    if fmt is None:
        raise InputError(f"cannot infer the format from --out {args.out!r}; pass --format onnx|torch-export")
    if args.image_size is not None and not 1 <= args.image_size <= MAX_IMAGE_SIZE:
        raise InputError(f"--image-size must be from 1 to {MAX_IMAGE_SIZE} (a {MAX_IMAGE_SIZE}^2 image is at the "
                         f"pixel cap), got {args.image_size}")
    if fmt != "onnx" and args.opset is not None:
        raise InputError(f"--opset is for ONNX exports; --format {fmt} has none")
    opset = check_opset(DEFAULT_OPSET if args.opset is None else args.opset)  # ValueError: exit 2
    out = Path(args.out)
    with prepare_outputs(None, files=[out], overwrite=args.overwrite, what="--out"):  # before any work
        if fmt == "torch-export":
            check_output_file(metadata_path(out), overwrite=args.overwrite, what="--out metadata")
        model = load_checkpoint(args.checkpoint)
        out = export_model(model, out, format=fmt, image_size=args.image_size, opset=opset)
    run_exported, doc = load_exported(out, trusted=True)  # the file this command just wrote
    c, h, w = doc["input_size"]
    print(f"wrote {out} ({fmt}, {out.stat().st_size / 1e6:.1f} MB): {doc['model']['name']} mode={doc['mode']}, "
          f"input [batch, {c}, {h}, {w}] -> logits, ponder_cost, ponder_map")
    if not args.verify:
        return 0
    wrapper = ExportableModel(model).eval()
    worst = 0.0
    for batch in (1, 3):
        x = torch.randn(batch, c, h, w)
        with torch.no_grad():
            ref = wrapper(x)
        got = run_exported(x)
        diffs = {name: (r - g).abs().max().item() for name, r, g in zip(("logits", "ponder_cost", "ponder_map"), ref, got)}
        worst = max(worst, *diffs.values())
        print(f"verify batch {batch}: max abs difference " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    if worst > 1e-3:
        raise RunFailure(f"the export differs from the eager model by {worst:.3g}")
    return 0
