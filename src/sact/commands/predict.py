"""``sact predict``: top-k classes, FLOPs and ponder cost of image files (:func:`sact.predict`).

A table on stdout, one row per image (then one line per further class with ``--topk``);
``--out FILE`` also writes JSON Lines, one object per image (``Prediction.to_dict``),
refusing an existing file unless ``--overwrite``. Exit status 2 when a path does not
exist, no image is found, an image cannot be read, or the checkpoint cannot be loaded;
nothing is written then.
"""

from __future__ import annotations

import argparse

__all__ = ["register", "run", "format_table"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="what is in these images? top-k classes with probabilities, FLOPs and ponder cost per image",
        description="Classify image files with a checkpoint, decoded and preprocessed as in training. Prints a table; "
        "--out writes JSON Lines (one object per image).",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files, folders (searched recursively) and glob patterns (quoted: 'photos/*.jpg')")
    p.add_argument("--checkpoint", required=True, help="checkpoint written by sact.save_checkpoint / sact train")
    p.add_argument("--topk", type=int, default=5, help="classes shown per image (default 5)")
    p.add_argument("--out", default=None, help="also write the predictions as JSON Lines to this file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--sparse", action="store_true",
                   help="run through the sparse engine (sact.to_sparse: halted positions are skipped; the same "
                   "classes and FLOPs, docs/sparse.md)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--device", default="auto", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="refuse images above this many pixels, checked before decoding (default 40000000)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it is shown only on a terminal)")
    p.set_defaults(func=run)


def format_table(predictions: list) -> str:
    """The terminal table: image, class, probability, MFLOPs, ponder cost; further classes on their own lines."""
    rows = [("image", "class", "prob", "MFLOPs", "ponder")]
    for p in predictions:
        for rank, (index, name, prob) in enumerate(p.topk):
            first = rank == 0
            rows.append((str(p.image) if first else "", name if name is not None else str(index), f"{prob:.3f}",
                         f"{p.flops / 1e6:.2f}" if first else "", f"{p.ponder_cost:.3f}" if first else ""))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:>{widths[3]}}  "
                     f"{r[4]:>{widths[4]}}".rstrip() for r in rows)


def run(args: argparse.Namespace) -> int:
    import sys

    from .. import load_checkpoint
    from ..io.checkpoint import CheckpointError
    from ..engine.distributed import resolve_device
    from ..errors import InputError
    from ..io.files import atomic_write_bytes, check_output_file, dumps_json
    from ..tools.inference import find_images, predict

    for flag, value in (("--topk", args.topk), ("--batch-size", args.batch_size), ("--max-pixels", args.max_pixels)):
        if value is not None and value < 1:
            raise InputError(f"{flag} must be positive, got {value}")
    if args.out is not None:
        check_output_file(args.out, overwrite=args.overwrite)  # before any work
    files = find_images(args.images)
    device = resolve_device(args.device)
    try:
        model = load_checkpoint(args.checkpoint, map_location=device)
    except CheckpointError as e:
        raise CheckpointError(f"cannot load checkpoint {args.checkpoint}: {e}") from e
    if args.sparse:
        from ..sparse import to_sparse

        model = to_sparse(model)
    predictions = predict(model, files, topk=args.topk, batch_size=args.batch_size, max_pixels=args.max_pixels,
                          progress=False if args.no_progress else None)
    print(format_table(predictions))
    if args.out is not None:
        check_output_file(args.out, overwrite=args.overwrite)  # still free after the work
        atomic_write_bytes(args.out, "".join(dumps_json(p.to_dict()) + "\n" for p in predictions).encode())
        print(f"{len(predictions)} prediction(s) written to {args.out}", file=sys.stderr)
    return 0
