"""``sact saliency``: ponder-cost maps scored as saliency maps.

Two ground truths:

* ``--data CAT2000_ROOT``: human eye fixations in the CAT2000 layout
  (``Stimuli/``, ``FIXATIONMAPS/``, ``FIXATIONLOCS/``); shuffled AUC draws its
  negatives from the same category.
* ``--cluttered``: Cluttered Fashion-MNIST test canvases, the object's mask (or
  box) as the "fixations".

Methods: the checkpoint's SACT model (``sact``) and, unless ``--no-baselines``,
the untrained SACT model (same architecture, seeded fresh initialisation),
a Gaussian centre bias and the uniform map (plus the canvas intensity on
Cluttered Fashion-MNIST). Writes ``OUT/<method>/saliency.{json,md}`` (per
category and overall) as each method finishes, then ``OUT/summary.{json,md}``.

Exit status: 0 on success, 2 for bad arguments, an unreadable checkpoint or
dataset.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "saliency",
        help="score ponder-cost maps as saliency maps (CAT2000 eye fixations or Cluttered Fashion-MNIST objects)",
        description="Score the summed ponder-cost map of an SACT checkpoint as a saliency map with the MIT "
        "benchmark metrics (AUC-Judd, AUC-Borji, sAUC, NSS, CC, KL, SIM), against baselines. Writes "
        "OUT/<method>/saliency.{json,md} (per category and overall) and OUT/summary.{json,md}.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", metavar="CAT2000_ROOT",
                     help="CAT2000-layout folder with Stimuli/, FIXATIONMAPS/, FIXATIONLOCS/ (CAT2000's trainSet)")
    src.add_argument("--cluttered", action="store_true",
                     help="evaluate on Cluttered Fashion-MNIST test canvases with object masks as ground truth")
    p.add_argument("--checkpoint", required=True, help="checkpoint written by sact.save_checkpoint / sact train")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier evaluation in --out")
    p.add_argument("--blur", type=float, default=None, metavar="F",
                   help="Gaussian blur of the model maps, sigma as a fraction of the image width (e.g. 0.02)")
    p.add_argument("--center-bias-weight", type=float, default=0.0, metavar="W",
                   help="model map = (1 - W) * map + W * Gaussian centre bias (default 0)")
    p.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                   help="also score the untrained-SACT, centre-bias and uniform baselines (default: on)")
    p.add_argument("--untrained-seed", type=int, default=0, help="seed of the untrained SACT model (default 0)")
    p.add_argument("--metrics", nargs="+", default=None, metavar="NAME",
                   help="metrics to compute (default all: auc_judd auc_borji auc_shuffled nss cc kl sim)")
    p.add_argument("--n-other", type=int, default=10,
                   help="other images whose fixations are the shuffled-AUC negatives (default 10)")
    p.add_argument("--metric-seed", type=int, default=0, help="seed of the random metrics (default 0)")
    p.add_argument("--device", default="auto", help="torch device (default: cuda if available, else cpu)")
    g = p.add_argument_group("CAT2000 (--data)")
    g.add_argument("--categories", nargs="+", default=None, metavar="NAME", help="categories to use (default all)")
    g.add_argument("--limit", type=int, default=None, metavar="N", help="use the first N images of each category")
    g.add_argument("--max-side", type=int, default=None, metavar="N",
                   help="run the model on stimuli resized so the longer side is N (maps are scored at full size)")
    g = p.add_argument_group("Cluttered Fashion-MNIST (--cluttered)")
    g.add_argument("--num-images", type=int, default=500, help="test canvases 0..N-1 (default 500)")
    g.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    g.add_argument("--ground-truth", choices=("mask", "box"), default="mask",
                   help="object pixels: silhouette mask (default) or tight box")
    g.add_argument("--fashion-mnist-dir", default=None, help="folder with the Fashion-MNIST files")
    g.add_argument("--batch-size", type=int, default=100, help="canvases per forward pass (default 100)")
    p.set_defaults(func=run)


class _Subset(Sequence):
    """A CAT2000 selection that hands out fresh items (their cached maps are freed with them).

    A real ``Sequence``: ``evaluate_dataset`` would otherwise materialise the items as a
    list, and each item caches its full-resolution maps (32 MB for a CAT2000 image).
    """

    def __init__(self, dataset, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.dataset[self.indices[i]]


def _check_args(args: argparse.Namespace) -> str | None:
    checks = [
        (args.blur is None or args.blur > 0, f"--blur must be positive, got {args.blur}"),
        (0.0 <= args.center_bias_weight <= 1.0, f"--center-bias-weight must be in [0, 1], got {args.center_bias_weight}"),
        (args.limit is None or args.limit >= 1, f"--limit must be positive, got {args.limit}"),
        (args.max_side is None or args.max_side >= 1, f"--max-side must be positive, got {args.max_side}"),
        (args.num_images >= 1, f"--num-images must be positive, got {args.num_images}"),
        (args.batch_size >= 1, f"--batch-size must be positive, got {args.batch_size}"),
        (args.n_other >= 1, f"--n-other must be positive, got {args.n_other}"),
        (args.seed >= 0, f"--seed must be non-negative, got {args.seed}"),
    ]
    return next((msg for ok, msg in checks if not ok), None)


def _cat2000_methods(args, model):
    import numpy as np

    from ..saliency.baselines import center_bias, uniform
    from ..saliency.model import model_saliency, untrained_like

    options = {"blur_sigma": args.blur, "center_bias_weight": args.center_bias_weight, "max_side": args.max_side}

    def from_model(m):
        # a writable copy: torch warns on read-only numpy arrays (PIL's buffer)
        return lambda item: model_saliency(m, np.array(item.load_stimulus()), size=item.size, **options)

    methods = {"sact": from_model(model)}
    if args.baselines:
        methods["untrained_sact"] = from_model(untrained_like(model, seed=args.untrained_seed))
        methods["center_bias"] = lambda item: center_bias(*item.size)
        methods["uniform"] = lambda item: uniform(*item.size)
    return methods


def run(args: argparse.Namespace) -> int:
    import shlex
    import sys

    from .. import load_checkpoint
    from ..checkpoint import CheckpointError
    from ..engine.distributed import resolve_device
    from ..errors import InputError
    from ..fileio import prepare_outputs
    from ..saliency.metrics import check_metric_names
    from ..saliency.model import evaluate_methods, write_comparison

    problem = _check_args(args)
    if problem is not None:
        raise InputError(problem)
    check_metric_names(args.metrics)
    names = ("summary.json", "summary.md")
    with prepare_outputs(args.out, files=names, overwrite=args.overwrite) as out:  # before any work
        device = resolve_device(args.device)
        try:
            model = load_checkpoint(args.checkpoint, map_location=device)
        except CheckpointError as e:
            raise CheckpointError(f"cannot load checkpoint {args.checkpoint}: {e}") from e
        mode = getattr(model, "mode", "?")
        notes = [f"Command: `sact saliency {' '.join(shlex.quote(a) for a in sys.argv[2:])}`"
                 if len(sys.argv) > 1 and sys.argv[1] == "saliency" else "",
                 f"Checkpoint: `{args.checkpoint}` ({model.sact_config['name']}, mode {mode})."]
        notes = [n for n in notes if n]
        common = {"metrics": args.metrics, "n_other": args.n_other, "seed": args.metric_seed}
        post = {"blur_sigma": args.blur, "center_bias_weight": args.center_bias_weight, "checkpoint": str(args.checkpoint)}

        if args.cluttered:
            from ..saliency.cluttered import evaluate_cluttered

            results = evaluate_cluttered(
                model, num_images=args.num_images, seed=args.seed, data_dir=args.fashion_mnist_dir,
                ground_truth=args.ground_truth, baselines=args.baselines, untrained_seed=args.untrained_seed,
                blur_sigma=args.blur, center_bias_weight=args.center_bias_weight, batch_size=args.batch_size,
                metrics=args.metrics, n_other=args.n_other, metric_seed=args.metric_seed, out_dir=out,
                config={"checkpoint": str(args.checkpoint)},
            )
            fallbacks = next(iter(results.values()))["config"]["mask_fallbacks"]
            notes.append(f"Cluttered Fashion-MNIST test split, canvases 0..{args.num_images - 1} (dataset seed "
                         f"{args.seed}); ground truth: object {args.ground_truth}"
                         + (f" ({fallbacks} empty masks replaced by their box)" if fallbacks else "") + ".")
            title = "Cluttered Fashion-MNIST: ponder maps as object saliency"
        else:
            from ..saliency.cat2000 import CAT2000

            dataset = CAT2000(args.data, categories=args.categories)
            indices = list(range(len(dataset)))
            if args.limit is not None:
                # Items are sorted by category, so the first N per category keep every category.
                seen: dict[str, int] = {}
                kept = []
                for i in indices:
                    cat = dataset[i].category
                    if seen.get(cat, 0) < args.limit:
                        seen[cat] = seen.get(cat, 0) + 1
                        kept.append(i)
                indices = kept
            items = _Subset(dataset, indices)
            results = evaluate_methods(
                items, _cat2000_methods(args, model), out_dir=out, title="CAT2000 saliency",
                config={**post, "max_side": args.max_side, "dataset": str(args.data)},
                shuffled_pool="category", **common,
            )
            notes.append(f"CAT2000 folder `{args.data}`: {len(items)} images, {len(dataset.categories)} categories"
                         + (f" (first {args.limit} per category)" if args.limit else "") + ".")
            title = "CAT2000: ponder maps as saliency maps"
        notes.append(f"Model maps: blur {args.blur}, centre-bias weight {args.center_bias_weight}.")
        json_path, md_path = write_comparison(results, out, title=title, notes=notes)
        print(md_path.read_text())
        print(f"written: {md_path}, {json_path} and {', '.join(f'{out / k}/saliency.md' for k in results)}",
              file=sys.stderr)
        return 0
