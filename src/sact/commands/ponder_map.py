"""``sact ponder-map``: ponder-cost maps of image files and folders, with an HTML gallery
(written by :mod:`sact.tools.gallery`).

Two passes: the first computes every map (and writes the image, the raw ``.npy`` map,
the per-stage figure and a JSON line per image); the second draws the summed maps with
one colour range -- shared across all inputs (0.1..99.9 percentiles of all maps, as the
reference ``draw_ponder_maps.py``) or per image (min..max) -- and writes ``index.html``.

Exit status: 0 when every input was processed, 1 when some input was skipped (missing,
not an image, cannot be decoded, above the pixel cap, fails in the model) or nothing was
found, 2 when the checkpoint cannot be loaded or ``--out`` cannot be used.

``--out`` holding an earlier gallery (``index.html``, ``results.jsonl``) is refused
unless ``--overwrite``, which first removes that gallery's own files (named in its
``results.jsonl``); two runs at once into one folder are refused (a lock file), so a
gallery never mixes two runs.
"""

from __future__ import annotations

import argparse

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ponder-map",
        help="ponder-cost maps (where the network spent its computation) of images and folders",
        description="Write, for every image: <name>_image.png, <name>_ponder.png (viridis, colour bar), "
        "<name>_overlay.png, <name>_stages.png, <name>_ponder.npy (summed map, float32); results.jsonl and "
        "an index.html gallery. Exit status 1 if any input was skipped.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files and folders (searched recursively)")
    p.add_argument("--checkpoint", required=True, help="checkpoint written by sact.save_checkpoint / sact train")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--max-side", type=int, default=None, help="resize (bicubic, aspect kept) so the longer side is N")
    p.add_argument("--range", choices=("shared", "per-image"), default="shared",
                   help="colour range: shared = 0.1..99.9 percentiles over all maps (default); per-image = min..max")
    p.add_argument("--device", default="auto", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--crop", action="store_true",
                   help="apply the checkpoint preprocess's central crop / resize instead of keeping the whole image")
    p.add_argument("--no-upscale", action="store_true",
                   help="skip images smaller than the network's total stride instead of upscaling them")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="skip images above this many pixels, checked before decoding (default 40000000)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier gallery in --out (its own files only)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from ..errors import RunFailure
    from ..tools.gallery import make_gallery

    records, skipped, ignored = make_gallery(
        args.paths, args.checkpoint, args.out, overwrite=args.overwrite, device=args.device, max_side=args.max_side,
        upscale=not args.no_upscale, crop=args.crop, max_pixels=args.max_pixels, color_range=args.range)
    print(f"{len(records)} image(s) written to {args.out} (index.html); {len(skipped)} skipped"
          + (f"; {ignored} folder entries without an image extension ignored" if ignored else ""), file=sys.stderr)
    if not records and not skipped:
        raise RunFailure("no images found in the given paths")
    return 1 if skipped else 0
