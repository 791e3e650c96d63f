"""A checkpoint's ponder maps scored as saliency maps, as ``sact saliency`` runs it.

:func:`run_saliency` loads the checkpoint, scores it and its baselines on CAT2000
(:func:`cat2000_methods`, negatives of shuffled AUC from the same category) or on
Cluttered Fashion-MNIST (:func:`~sact.saliency.cluttered.evaluate_cluttered`), and
writes ``OUT/<method>/saliency.{json,md}`` as each method finishes, then
``OUT/summary.{json,md}`` (:func:`~sact.saliency.model.write_comparison`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from .baselines import center_bias, uniform
from .model import model_saliency, untrained_like

__all__ = ["SUMMARY_FILES", "cat2000_methods", "run_saliency"]

#: What :func:`run_saliency` writes in its output folder, besides one folder per method.
SUMMARY_FILES = ("summary.json", "summary.md")


def cat2000_methods(model: nn.Module, *, baselines: bool = True, untrained_seed: int = 0,
                    blur_sigma: float | None = None, center_bias_weight: float = 0.0,
                    max_side: int | None = None) -> dict[str, Callable[[Any], np.ndarray]]:
    """``{name: CAT2000Item -> saliency map [H, W]}``: ``sact`` (the model's maps, see
    :func:`model_saliency` for the options) and, with ``baselines``, ``untrained_sact``
    (:func:`untrained_like`, ``untrained_seed``), ``center_bias`` and ``uniform``."""
    options = {"blur_sigma": blur_sigma, "center_bias_weight": center_bias_weight, "max_side": max_side}

    def from_model(m):
        # a writable copy: torch warns on read-only numpy arrays (PIL's buffer)
        return lambda item: model_saliency(m, np.array(item.load_stimulus()), size=item.size, **options)

    methods = {"sact": from_model(model)}
    if baselines:
        methods["untrained_sact"] = from_model(untrained_like(model, seed=untrained_seed))
        methods["center_bias"] = lambda item: center_bias(*item.size)
        methods["uniform"] = lambda item: uniform(*item.size)
    return methods


def run_saliency(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    data: str | Path | None = None,
    overwrite: bool = False,
    device: str = "auto",
    blur_sigma: float | None = None,
    center_bias_weight: float = 0.0,
    baselines: bool = True,
    untrained_seed: int = 0,
    metrics: Sequence[str] | None = None,
    n_other: int = 10,
    metric_seed: int = 0,
    categories: Sequence[str] | None = None,
    limit: int | None = None,
    max_side: int | None = None,
    num_images: int = 500,
    seed: int = 0,
    ground_truth: str = "mask",
    fashion_mnist_dir: str | Path | None = None,
    batch_size: int = 100,
    command: str | None = None,
) -> tuple[Path, Path, dict[str, dict[str, Any]]]:
    """Scores the ponder maps of ``checkpoint`` (and the baselines) as saliency maps; writes the reports in ``out_dir``.

    Args:
        checkpoint: the model's checkpoint.
        out_dir: output folder, checked before any work (:func:`sact.io.files.prepare_outputs`).
        data: a CAT2000-layout folder (``categories``, the first ``limit`` images of each,
            the model run at ``max_side``), or None for Cluttered Fashion-MNIST test canvases
            (``num_images``, dataset ``seed``, ``ground_truth``, ``fashion_mnist_dir``, ``batch_size``).
        overwrite: replace an earlier evaluation in ``out_dir``.
        device: torch device (``auto``: cuda if available).
        blur_sigma, center_bias_weight: post-processing of the model maps.
        baselines, untrained_seed: also score the baselines; seed of the untrained model.
        metrics, n_other, metric_seed: metric names (default all), shuffled-AUC negatives, seed.
        command: the command line, recorded in ``summary.md``.

    Returns:
        ``(summary.json, summary.md, {method: results of evaluate_dataset})``.

    Raises:
        InputError: unknown metric names, ``out_dir`` not writable as asked (OutputExistsError),
            an unreadable checkpoint (CheckpointError).
        FileNotFoundError, ValueError: a bad CAT2000 folder or category (see :class:`CAT2000`).
    """
    from .. import load_checkpoint
    from ..io.checkpoint import CheckpointError
    from ..engine.distributed import resolve_device
    from ..io.files import prepare_outputs
    from .metrics import check_metric_names
    from .model import evaluate_methods, write_comparison

    check_metric_names(metrics)
    with prepare_outputs(out_dir, files=SUMMARY_FILES, overwrite=overwrite) as out:  # before any work
        try:
            model = load_checkpoint(checkpoint, map_location=resolve_device(device))
        except CheckpointError as e:
            raise CheckpointError(f"cannot load checkpoint {checkpoint}: {e}") from e
        notes = [f"Command: `{command}`"] if command else []
        notes.append(f"Checkpoint: `{checkpoint}` ({model.sact_config['name']}, mode {getattr(model, 'mode', '?')}).")
        if data is None:
            from .cluttered import evaluate_cluttered

            results = evaluate_cluttered(
                model, num_images=num_images, seed=seed, data_dir=fashion_mnist_dir, ground_truth=ground_truth,
                baselines=baselines, untrained_seed=untrained_seed, blur_sigma=blur_sigma,
                center_bias_weight=center_bias_weight, batch_size=batch_size, metrics=metrics, n_other=n_other,
                metric_seed=metric_seed, out_dir=out, config={"checkpoint": str(checkpoint)},
            )
            fallbacks = next(iter(results.values()))["config"]["mask_fallbacks"]
            notes.append(f"Cluttered Fashion-MNIST test split, canvases 0..{num_images - 1} (dataset seed "
                         f"{seed}); ground truth: object {ground_truth}"
                         + (f" ({fallbacks} empty masks replaced by their box)" if fallbacks else "") + ".")
            title = "Cluttered Fashion-MNIST: ponder maps as object saliency"
        else:
            from .cat2000 import CAT2000, first_per_category

            dataset = CAT2000(data, categories=categories)
            items = first_per_category(dataset, limit)
            methods = cat2000_methods(model, baselines=baselines, untrained_seed=untrained_seed, blur_sigma=blur_sigma,
                                      center_bias_weight=center_bias_weight, max_side=max_side)
            config = {"blur_sigma": blur_sigma, "center_bias_weight": center_bias_weight,
                      "checkpoint": str(checkpoint), "max_side": max_side, "dataset": str(data)}
            results = evaluate_methods(items, methods, out_dir=out, title="CAT2000 saliency", config=config,
                                       shuffled_pool="category", metrics=metrics, n_other=n_other, seed=metric_seed)
            notes.append(f"CAT2000 folder `{data}`: {len(items)} images, {len(dataset.categories)} categories"
                         + (f" (first {limit} per category)" if limit else "") + ".")
            title = "CAT2000: ponder maps as saliency maps"
        notes.append(f"Model maps: blur {blur_sigma}, centre-bias weight {center_bias_weight}.")
        json_path, md_path = write_comparison(results, out, title=title, notes=notes)
    return json_path, md_path, results
