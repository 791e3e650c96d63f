"""``sact ponder-map``: ponder-cost maps of image files and folders, with an HTML gallery.

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
import re
from pathlib import Path

__all__ = ["register", "run", "collect_inputs", "unique_names", "load_image", "write_gallery"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ponder-map",
        help="ponder-cost maps (where the network spent its computation) of images and folders",
        description="Write, for every image: <name>_image.png, <name>_ponder.png (viridis, colour bar), "
        "<name>_overlay.png (with colour bar), <name>_stages.png, <name>_ponder.npy (summed map, float32); "
        "results.jsonl and an index.html gallery. Exit status 1 if any input was skipped.",
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


def collect_inputs(paths: list[str], *, exclude: Path | None = None) -> tuple[list[Path], list[tuple[str, str]], int]:
    """Files to process.

    A file named on the command line is always tried; inside a folder (recursively,
    sorted, hidden entries skipped) only files with an extension Pillow registers.

    Returns:
        ``(files, problems, ignored)``: files in order without duplicates,
        ``(path, reason)`` for paths that do not exist, and how many folder entries were
        ignored for their extension.
    """
    from PIL import Image

    known = {ext.lower() for ext in Image.registered_extensions()}
    files, problems, seen, ignored = [], [], set(), 0
    exclude = exclude.resolve() if exclude is not None else None

    def add(f: Path) -> None:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            files.append(f)

    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for f in sorted(path.rglob("*")):
                rel = f.relative_to(path).parts
                if not f.is_file() or any(part.startswith(".") for part in rel):
                    continue
                if exclude is not None and f.resolve().is_relative_to(exclude):
                    continue  # our own outputs, when --out is inside an input folder
                if f.suffix.lower() in known:
                    add(f)
                else:
                    ignored += 1
        elif path.is_file():
            add(path)
        else:
            problems.append((str(path), "no such file or folder"))
    return files, problems, ignored


def unique_names(files: list[Path]) -> list[str]:
    """Output name per file: its stem made file-system safe, ``-2``, ``-3``... on clashes
    (compared case-insensitively, so ``a/x.jpg`` and ``b/X.png`` get ``x`` and ``X-2``)."""
    names, taken = [], set()
    for f in files:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", f.stem).strip("._") or "image"
        name, n = base, 1
        while name.lower() in taken:
            n += 1
            name = f"{base}-{n}"
        taken.add(name.lower())
        names.append(name)
    return names


def load_image(path: Path, *, max_pixels: int | None = None):
    """Decode an image fully (so corrupt data fails here) with EXIF orientation applied;
    multi-frame files give their first frame.

    Raises:
        sact.data.images.UnreadableImage: corrupt, not an image, or above ``max_pixels``
            (default :data:`sact.data.images.DEFAULT_MAX_PIXELS`).
    """
    from PIL import ImageOps

    from ..data.images import DEFAULT_MAX_PIXELS, open_image

    im = open_image(path, max_pixels=max_pixels or DEFAULT_MAX_PIXELS)
    return ImageOps.exif_transpose(im)


_PANELS = (("image", "image"), ("ponder", "ponder map"), ("overlay", "overlay"), ("stages", "stages"))


def write_gallery(out: Path, records: list[dict], skipped: list[tuple[str, str]], *, checkpoint: str,
                  color_range: str, shared: tuple[float, float] | None) -> None:
    """``out/index.html``: one card per image (only files that exist are linked), then
    the skipped inputs with their reasons. All names are HTML-escaped and URL-quoted."""
    from html import escape
    from urllib.parse import quote

    from ..checkpoint import atomic_write_bytes

    if color_range == "shared":
        rng = f"shared {shared[0]:.3f}..{shared[1]:.3f} (0.1..99.9 percentiles)" if shared else "shared"
    else:
        rng = "per image (min..max)"
    lines = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        "<title>Ponder-cost maps</title>",
        "<style>body{font-family:sans-serif;margin:1em}figure{display:inline-block;margin:4px;vertical-align:top}"
        "img{height:256px;width:auto}section{border-top:1px solid #ccc;padding:4px 0}</style>",
        "</head>",
        "<body>",
        "<h1>Ponder-cost maps</h1>",
        f"<p>checkpoint: <code>{escape(checkpoint)}</code>; colour range: {escape(rng)}; "
        f"{len(records)} image(s), {len(skipped)} skipped.</p>",
    ]
    for rec in records:
        cls = str(rec["predicted_class"]) + (f" ({rec['class_name']})" if "class_name" in rec else "")
        lines += [
            "<section>",
            f"<h2>{escape(rec['name'])}</h2>",
            f"<p><code>{escape(rec['file'])}</code>: {rec['width']}x{rec['height']} px, "
            f"ponder cost {rec['ponder_cost']:.3f}, {rec['flops'] / 1e6:.2f} MFLOPs{_relative(rec)}, "
            f"predicted class {escape(cls)}</p>",
        ]
        for suffix, caption in _PANELS:
            fname = f"{rec['name']}_{suffix}.png"
            if (out / fname).is_file():
                url = escape(quote(fname), quote=True)
                lines.append(f'<figure><a href="{url}"><img src="{url}" alt="{escape(caption, quote=True)}"></a>'
                             f"<figcaption>{escape(caption)}</figcaption></figure>")
        npy = f"{rec['name']}_ponder.npy"
        if (out / npy).is_file():
            lines.append(f'<p><a href="{escape(quote(npy), quote=True)}">raw map (.npy)</a></p>')
        lines.append("</section>")
    if skipped:
        lines += ["<h2>Skipped</h2>", "<ul>"]
        lines += [f"<li><code>{escape(path)}</code>: {escape(reason)}</li>" for path, reason in skipped]
        lines.append("</ul>")
    lines += ["</body>", "</html>", ""]
    atomic_write_bytes(out / "index.html", "\n".join(lines).encode("utf-8", errors="backslashreplace"))


_GALLERY = ("index.html", "results.jsonl", "results.jsonl.partial")
_OUTPUT_SUFFIXES = ("_image.png", "_ponder.png", "_overlay.png", "_stages.png", "_ponder.npy")


def _previous_gallery(out: Path) -> list[Path]:
    """The files of an earlier gallery in ``out``: its index, results and the per-image
    outputs named in its results (names are checked to be plain file names)."""
    import json

    found = [out / n for n in _GALLERY if (out / n).is_file()]
    for results in found:
        if not results.name.startswith("results.jsonl"):
            continue
        for line in results.read_text(errors="replace").splitlines():
            try:
                name = json.loads(line).get("name")
            except (json.JSONDecodeError, AttributeError):
                continue
            if isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9._-]+", name) and not name.startswith("."):
                found += [out / f"{name}{suffix}" for suffix in _OUTPUT_SUFFIXES if (out / f"{name}{suffix}").is_file()]
    return found


def _claim_out(out: Path, overwrite: bool) -> None:
    from ..errors import OutputExistsError

    previous = _previous_gallery(out)
    if previous and not overwrite:
        raise OutputExistsError(f"{out} holds an earlier ponder-map gallery ({previous[0].name}); pass --overwrite to "
                                "replace it (its own files only), or choose another --out")
    for f in previous:
        f.unlink(missing_ok=True)


def _image_uint8(image01):
    import numpy as np

    a = (image01.clamp(0, 1).numpy() * 255.0 + 0.5).astype(np.uint8)  # [C, H, W]
    return a[0] if a.shape[0] == 1 else np.ascontiguousarray(a.transpose(1, 2, 0))


def _npy_bytes(array) -> bytes:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _relative(rec: dict) -> str:
    rel = rec.get("flops_vs_vanilla")
    return f" ({100 * rel:.1f}% of the vanilla network)" if rel is not None else ""


def _safe_range(lo: float, hi: float) -> tuple[float, float]:
    return (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)  # constant maps (vanilla, ACT)


def run(args: argparse.Namespace) -> int:
    from .. import load_checkpoint
    from ..checkpoint import CheckpointError
    from ..engine.distributed import resolve_device
    from ..errors import InputError
    from ..fileio import OutputLock, check_output_folder, remove_stale_temp_files

    if args.max_side is not None and args.max_side < 1:
        raise InputError(f"--max-side must be positive, got {args.max_side}")
    if args.max_pixels is not None and args.max_pixels < 1:
        raise InputError(f"--max-pixels must be positive, got {args.max_pixels}")
    out = check_output_folder(args.out)  # before any work
    if not args.overwrite and _previous_gallery(out):
        _claim_out(out, overwrite=False)  # refuses, naming the gallery
    device = resolve_device(args.device)
    try:
        model = load_checkpoint(args.checkpoint, map_location=device)
    except CheckpointError as e:
        raise CheckpointError(f"cannot load checkpoint {args.checkpoint}: {e}") from e
    meta = getattr(model, "checkpoint_meta", {}) or {}
    classes = meta.get("classes") if isinstance(meta.get("classes"), list) else None
    with OutputLock(out, "ponder-map"):
        _claim_out(out, overwrite=args.overwrite)
        remove_stale_temp_files(out)
        return _write_maps(args, model, out, classes)


def _write_maps(args, model, out: Path, classes) -> int:
    import sys
    import warnings

    import numpy as np
    from PIL import Image
    from tqdm import tqdm

    from ..checkpoint import atomic_write_bytes
    from ..data.images import UnreadableImage
    from ..errors import RunFailure
    from ..fileio import dumps_json
    from ..ponder import ponder_map, vanilla_flops
    from ..viz import map_figure_png, percentile_range, png_bytes, stages_figure_png, value_counts

    files, skipped, ignored = collect_inputs(args.paths, exclude=out)
    for path, reason in skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)

    # Pass 1: compute the maps; write what does not depend on the colour range.
    records, summaries = [], []
    partial = out / "results.jsonl.partial"  # lines so far survive a crash
    with partial.open("w") as log:
        for f, name in tqdm(list(zip(files, unique_names(files))), desc="ponder maps", unit="image", disable=None):
            try:
                image = load_image(f, max_pixels=args.max_pixels)
            except UnreadableImage as e:
                skipped.append((str(f), f"cannot decode image: {e}"))
                tqdm.write(f"skipped {f}: {skipped[-1][1]}", file=sys.stderr)
                continue
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    pm = ponder_map(model, image, max_side=args.max_side, upscale=not args.no_upscale, crop=args.crop)
            except (ValueError, RuntimeError) as e:
                skipped.append((str(f), f"{type(e).__name__}: {e}"))
                tqdm.write(f"skipped {f}: {skipped[-1][1]}", file=sys.stderr)
                continue
            for w in caught:
                tqdm.write(f"{f}: {w.message}", file=sys.stderr)
            summed = pm.summed.numpy().astype(np.float32)
            atomic_write_bytes(out / f"{name}_image.png", png_bytes(_image_uint8(pm.image)))
            atomic_write_bytes(out / f"{name}_ponder.npy", _npy_bytes(summed))
            atomic_write_bytes(out / f"{name}_stages.png", stages_figure_png(pm.stages))
            record = {
                "file": str(f),
                "name": name,
                "height": int(summed.shape[0]),
                "width": int(summed.shape[1]),
                "original_size": [image.height, image.width],
                "upscaled": pm.upscaled,
                "ponder_cost": pm.ponder_cost,
                "ponder_map_mean": float(summed.mean()),
                "num_units_mean": float(pm.num_units.mean()),
                "flops": pm.flops,
                "predicted_class": pm.predicted_class,
            }
            base = vanilla_flops(model, tuple(summed.shape))
            if base:
                record["flops_vanilla"] = base
                record["flops_vs_vanilla"] = pm.flops / base
            if classes is not None and 0 <= pm.predicted_class < len(classes):
                record["class_name"] = str(classes[pm.predicted_class])
            log.write(dumps_json(record) + "\n")
            log.flush()
            records.append(record)
            summaries.append(value_counts(summed))

    # Pass 2: draw the summed maps with the chosen colour range.
    shared = _safe_range(*percentile_range(summaries)) if records and args.range == "shared" else None
    for rec in tqdm(records, desc="rendering", unit="image", disable=None):
        summed = np.load(out / f"{rec['name']}_ponder.npy")
        lo, hi = shared or _safe_range(float(summed.min()), float(summed.max()))
        rec["color_range"] = [lo, hi]
        image = np.asarray(Image.open(out / f"{rec['name']}_image.png"))
        title = f"{rec['name']}: mean {rec['ponder_map_mean']:.2f}" + (
            f", FLOPs {100 * rec['flops_vs_vanilla']:.0f}% of vanilla" if "flops_vs_vanilla" in rec else "")
        atomic_write_bytes(out / f"{rec['name']}_ponder.png", map_figure_png(summed, vmin=lo, vmax=hi, title=title))
        atomic_write_bytes(out / f"{rec['name']}_overlay.png",
                           map_figure_png(summed, vmin=lo, vmax=hi, title=title, image=image,
                                          label="ponder cost (map at 60% over the image)"))
    atomic_write_bytes(out / "results.jsonl", "".join(dumps_json(r) + "\n" for r in records).encode())
    partial.unlink()
    write_gallery(out, records, skipped, checkpoint=str(args.checkpoint), color_range=args.range, shared=shared)

    print(f"{len(records)} image(s) written to {out} (index.html); {len(skipped)} skipped"
          + (f"; {ignored} folder entries without an image extension ignored" if ignored else ""), file=sys.stderr)
    if not records and not skipped:
        raise RunFailure("no images found in the given paths")
    return 1 if skipped else 0
