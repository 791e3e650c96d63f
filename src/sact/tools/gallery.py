"""The ponder-map gallery of ``sact ponder-map``: maps of image files and folders, as files and HTML.

For every image: ``<name>_image.png``, ``<name>_ponder.png`` (viridis, colour bar),
``<name>_overlay.png`` (with colour bar), ``<name>_stages.png``, ``<name>_ponder.npy`` (summed map,
float32); then ``results.jsonl`` and an ``index.html`` gallery. An earlier gallery in the
folder is replaced only on request, and then only its own files (:func:`claim_out`).
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["make_gallery", "collect_inputs", "unique_names", "load_image", "write_gallery", "write_gallery_files", "previous_gallery",
           "claim_out"]


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

    from ..data.folder import visible_files

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
            for f in visible_files(path):
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

    from ..io.files import atomic_write_bytes

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


def previous_gallery(out: Path) -> list[Path]:
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


def claim_out(out: Path, overwrite: bool) -> None:
    """Refuses ``out`` holding an earlier gallery unless ``overwrite``; then removes that
    gallery's own files (named in its ``results.jsonl``), nothing else.

    Raises:
        OutputExistsError: an earlier gallery and no ``overwrite``.
    """
    from ..errors import OutputExistsError

    previous = previous_gallery(out)
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


def write_gallery_files(paths: list[str], model, out: Path, *, checkpoint: str, classes: list | None = None,
                        max_side: int | None = None, upscale: bool = True, crop: bool = False,
                        max_pixels: int | None = None, color_range: str = "shared") -> tuple[list[dict], list, int]:
    """Computes the ponder maps of every image under ``paths`` and writes the gallery into ``out``.

    Pass 1 computes each map and writes the image, the raw ``.npy`` map, the per-stage
    figure and a line of ``results.jsonl.partial`` (so lines survive a crash); pass 2 draws
    the summed maps with one colour range (``"shared"``: 0.1..99.9 percentiles over all
    maps, as the reference ``draw_ponder_maps.py``; ``"per-image"``: min..max), then writes
    ``results.jsonl`` and ``index.html``. The caller holds ``out``'s lock and has cleared an
    earlier gallery (:func:`claim_out`).

    Args:
        paths: image files and folders (see :func:`collect_inputs`).
        model: an sact model (from :func:`sact.load_checkpoint`).
        out: the gallery folder.
        checkpoint: the checkpoint's name, shown in the gallery.
        classes: class names for the predicted class, if known.
        max_side, upscale, crop: see :func:`sact.ponder_map`.
        max_pixels: images above this many pixels are skipped (checked before decoding).
        color_range: ``"shared"`` or ``"per-image"``.

    Returns:
        ``(records, skipped (path, reason) pairs, folder entries ignored for their extension)``.
    """
    import sys
    import warnings

    import numpy as np
    from PIL import Image
    from tqdm import tqdm

    from ..data.images import UnreadableImage
    from ..io.files import atomic_write_bytes, dumps_json
    from ..models import vanilla_flops
    from .ponder import ponder_map
    from ..viz import map_figure_png, percentile_range, png_bytes, stages_figure_png, value_counts

    files, skipped, ignored = collect_inputs(paths, exclude=out)
    for path, reason in skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)

    # Pass 1: compute the maps; write what does not depend on the colour range.
    records, summaries = [], []
    partial = out / "results.jsonl.partial"  # lines so far survive a crash
    with partial.open("w") as log:
        for f, name in tqdm(list(zip(files, unique_names(files))), desc="ponder maps", unit="image", disable=None):
            try:
                image = load_image(f, max_pixels=max_pixels)
            except UnreadableImage as e:
                skipped.append((str(f), f"cannot decode image: {e}"))
                tqdm.write(f"skipped {f}: {skipped[-1][1]}", file=sys.stderr)
                continue
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    pm = ponder_map(model, image, max_side=max_side, upscale=upscale, crop=crop)
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
    shared = _safe_range(*percentile_range(summaries)) if records and color_range == "shared" else None
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
    write_gallery(out, records, skipped, checkpoint=checkpoint, color_range=color_range, shared=shared)
    return records, skipped, ignored


def make_gallery(paths: list[str], checkpoint: str | Path, out: str | Path, *, overwrite: bool = False,
                 device: str = "auto", max_side: int | None = None, upscale: bool = True, crop: bool = False,
                 max_pixels: int | None = None, color_range: str = "shared") -> tuple[list[dict], list, int]:
    """``sact ponder-map``: the gallery of the checkpoint's ponder maps of ``paths`` in ``out``
    (:func:`write_gallery_files`), after the checks: ``out`` usable and holding no earlier gallery
    unless ``overwrite`` (which removes that gallery's own files), under the folder's lock.

    Returns:
        ``(records, skipped, ignored)`` of :func:`write_gallery_files`.
    """
    from ..engine.distributed import resolve_device
    from ..errors import InputError
    from ..io.checkpoint import CheckpointError
    from ..io.files import check_output_folder, prepare_outputs
    from ..models.loading import load_checkpoint

    if max_side is not None and max_side < 1:
        raise InputError(f"--max-side must be positive, got {max_side}")
    if max_pixels is not None and max_pixels < 1:
        raise InputError(f"--max-pixels must be positive, got {max_pixels}")
    out = check_output_folder(out)  # before any work
    if not overwrite and previous_gallery(out):
        claim_out(out, overwrite=False)  # refuses, naming the gallery
    try:
        model = load_checkpoint(checkpoint, map_location=resolve_device(device))
    except CheckpointError as e:
        raise CheckpointError(f"cannot load checkpoint {checkpoint}: {e}") from e
    meta = getattr(model, "checkpoint_meta", {}) or {}
    classes = meta.get("classes") if isinstance(meta.get("classes"), list) else None
    with prepare_outputs(out, lock="ponder-map"):
        claim_out(out, overwrite=overwrite)  # under the lock: no other run writes the gallery meanwhile
        return write_gallery_files(paths, model, out, checkpoint=str(checkpoint), classes=classes, max_side=max_side,
                                   upscale=upscale, crop=crop, max_pixels=max_pixels, color_range=color_range)
