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
dataset. The work is :func:`sact.saliency.run.run_saliency`'s.
"""

from __future__ import annotations

import argparse

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


def run(args: argparse.Namespace) -> int:
    import shlex
    import sys

    from ..errors import InputError
    from ..saliency.run import run_saliency

    problem = _check_args(args)
    if problem is not None:
        raise InputError(problem)
    command = (f"sact saliency {' '.join(shlex.quote(a) for a in sys.argv[2:])}"
               if len(sys.argv) > 1 and sys.argv[1] == "saliency" else None)
    json_path, md_path, results = run_saliency(
        args.checkpoint, args.out, data=args.data, overwrite=args.overwrite,
        device=args.device, blur_sigma=args.blur, center_bias_weight=args.center_bias_weight,
        baselines=args.baselines, untrained_seed=args.untrained_seed, metrics=args.metrics, n_other=args.n_other,
        metric_seed=args.metric_seed, categories=args.categories, limit=args.limit, max_side=args.max_side,
        num_images=args.num_images, seed=args.seed, ground_truth=args.ground_truth,
        fashion_mnist_dir=args.fashion_mnist_dir, batch_size=args.batch_size, command=command)
    print(md_path.read_text())
    print(f"written: {md_path}, {json_path} and {', '.join(f'{md_path.parent / k}/saliency.md' for k in results)}",
          file=sys.stderr)
    return 0
