"""``sact predict``: top-k classes, FLOPs and ponder cost of image files (:func:`sact.predict`).

A table on stdout, one row per image (then one line per further class with ``--topk``);
``--out FILE`` also writes JSON Lines, one object per image (``Prediction.to_dict``),
refusing an existing file unless ``--overwrite``. Exit status 2 when a path does not
exist, no image is found, an image cannot be read, or the checkpoint cannot be loaded;
nothing is written then.
"""

from __future__ import annotations

import argparse

__all__ = ["register", "run"]


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


def run(args: argparse.Namespace) -> int:
    import sys

    from ..tools.inference import format_table, predict_checkpoint

    predictions = predict_checkpoint(args.checkpoint, args.images, topk=args.topk, batch_size=args.batch_size,
                                     max_pixels=args.max_pixels, device=args.device, sparse=args.sparse, out=args.out,
                                     overwrite=args.overwrite, progress=False if args.no_progress else None)
    print(format_table(predictions))
    if args.out is not None:
        print(f"{len(predictions)} prediction(s) written to {args.out}", file=sys.stderr)
    return 0
