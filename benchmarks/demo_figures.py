"""Every figure the README and the docs quote about the demo, from one run of the commands a user runs.

    python benchmarks/demo_figures.py                       # runs `sact demo` (about 3-5 min on 2 cores)
    python benchmarks/demo_figures.py --demo reports/demo   # reuses a finished demo folder

Steps (each is the documented command, run in-process through ``sact.cli.main``):

1. ``sact demo --out reports/demo --overwrite`` (skipped with ``--demo DIR``): the demo times
   itself (``results.json``: ``total_time_s``).
2. Test canvases 0..5 of the demo's test set written as PNGs, then
   ``sact ponder-map <them> --checkpoint <demo>/sact/model --out <work>/ponder``; canvas 3's image and
   ponder map are copied to ``docs/images/ponder_map_cluttered{_image,}.png`` (the README's figure) and
   its ponder cost and FLOPs recorded.
3. ``sact saliency --cluttered --checkpoint <demo>/sact/model --num-images 500 --out <work>/saliency``:
   AUC-Judd and the other metrics of the ponder maps against the object masks.

Writes ``benchmarks/results/demo_figures.json`` (the demo's rows and time, the figure's canvas, the
saliency summary) and ``demo_figures.saliency.md`` (the saliency tables); ``tests/test_docs.py`` checks that the README and the docs quote these values.
The scratch folder (``--work``, default a temporary one) holds the step outputs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIGURE_CANVAS = 3  # an ankle boot among clutter; the README's figure
DEMO_KEYS = ("command", "total_time_s", "data_time_s", "settings", "rows", "metrics", "environment")


def _cli(argv: list[str]) -> None:
    from sact.cli import main

    code = main(argv)
    if code:
        raise SystemExit(f"sact {' '.join(argv)} exited {code}")


def _write_canvases(folder: Path, n: int) -> list[Path]:
    from PIL import Image

    from sact.data import ClutteredFashionMNIST

    folder.mkdir(parents=True, exist_ok=True)
    ds = ClutteredFashionMNIST(split="test", num_samples=n, seed=1)  # the demo's test canvases
    paths = []
    for i in range(n):
        path = folder / f"test_{i}.png"
        Image.fromarray((ds[i]["image"][0] * 255).round().byte().numpy()).save(path)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", default=None, help="a finished demo folder to reuse (default: run sact demo)")
    p.add_argument("--demo-out", default="reports/demo", help="where to run the demo (default reports/demo)")
    p.add_argument("--work", default=None, help="scratch folder for the ponder-map and saliency outputs")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "demo_figures.json"))
    p.add_argument("--images", default=str(ROOT / "docs" / "images"), help="where the README's figure goes")
    args = p.parse_args(argv)

    demo = Path(args.demo or args.demo_out)
    if args.demo is None:
        _cli(["demo", "--out", str(demo), "--overwrite", "--no-progress"])
    demo_results = json.loads((demo / "results.json").read_text())
    checkpoint = str(demo / "sact" / "model")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        canvases = _write_canvases(work / "canvases", 6)
        _cli(["ponder-map", *map(str, canvases), "--checkpoint", checkpoint, "--out", str(work / "ponder"), "--overwrite"])
        records = [json.loads(line) for line in (work / "ponder" / "results.jsonl").read_text().splitlines()]
        figure = next(r for r in records if r["name"] == f"test_{FIGURE_CANVAS}")
        images = Path(args.images)
        shutil.copyfile(work / "ponder" / f"test_{FIGURE_CANVAS}_ponder.png", images / "ponder_map_cluttered.png")
        shutil.copyfile(work / "ponder" / f"test_{FIGURE_CANVAS}_image.png", images / "ponder_map_cluttered_image.png")

        _cli(["saliency", "--cluttered", "--checkpoint", checkpoint, "--num-images", "500",
              "--out", str(work / "saliency"), "--overwrite"])
        saliency = json.loads((work / "saliency" / "summary.json").read_text())
        saliency_md = (work / "saliency" / "summary.md").read_text()

    doc = {
        "demo": {k: demo_results[k] for k in DEMO_KEYS if k in demo_results},
        "figure": {"canvas": FIGURE_CANVAS, "record": figure},
        "saliency": saliency,
    }
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    out.with_suffix(".saliency.md").write_text(saliency_md)
    print(f"wrote {out}, {out.with_suffix('.saliency.md')} and {images}/ponder_map_cluttered{{,_image}}.png",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
