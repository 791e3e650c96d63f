"""Dataset-level saliency evaluation and reports.

:func:`evaluate_dataset` is generic: an *item* is any object with

* ``fixation_locs``: binary fixation map ``[H, W]`` (bool or 0/1),
* ``fixation_map``: fixation density map ``[H, W]``,
* optionally ``category`` (str; default ``"all"``) and ``name`` (str; default
  the item's index),

such as :class:`sact.saliency.cat2000.CAT2000Item`; ``saliency_fn(item)``
returns the model's map ``[h, w]`` (resized to ``[H, W]`` by the metrics when
the sizes differ).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from sact.io.files import dumps_json
from sact.saliency.metrics import METRIC_LABELS, check_metric_names, evaluate_all

__all__ = ["evaluate_dataset", "write_report"]

_LOWER_IS_BETTER = ("kl",)


def _category(item: Any) -> str:
    return str(getattr(item, "category", "all"))


def _name(item: Any, index: int) -> str:
    return str(getattr(item, "name", index))


def _other_fixations(
    shape: tuple[int, int],
    others: Sequence[tuple[np.ndarray, tuple[int, int]]],
) -> np.ndarray:
    """Union of other images' fixations, coordinates rescaled to ``shape``."""
    out = np.zeros(shape, dtype=bool)
    h, w = shape
    for coords, (oh, ow) in others:
        if coords.size == 0:
            continue
        if (oh, ow) == (h, w):
            out[coords[:, 0], coords[:, 1]] = True
        else:
            r = np.minimum(((coords[:, 0] + 0.5) * (h / oh)).astype(np.intp), h - 1)
            c = np.minimum(((coords[:, 1] + 0.5) * (w / ow)).astype(np.intp), w - 1)
            out[r, c] = True
    return out


def _mean(values: Iterable[float]) -> float:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    return float(v.mean()) if v.size else float("nan")


def evaluate_dataset(
    items: Iterable[Any],
    saliency_fn: Callable[[Any], np.ndarray],
    *,
    metrics: Sequence[str] | None = None,
    shuffled_pool: Literal["category", "dataset"] = "category",
    n_other: int | None = 10,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Scores a saliency model on every item; per-category and overall means.

    Shuffled AUC follows the MIT benchmark: the negatives of an image are the
    fixations of ``n_other`` other images drawn at random (Borji et al. use
    10) from its pool -- the other images of the same category
    (``shuffled_pool="category"``, the default, as for CAT2000) or of the
    whole dataset (``"dataset"``). Their fixation coordinates are rescaled to
    the image's size when sizes differ. An image whose pool has no other image
    gets ``NaN`` (with a warning). Computing it takes a first pass over
    ``items`` that reads only ``fixation_locs``.

    Each item's random metrics use ``numpy.random.default_rng([seed, index])``,
    so a score does not depend on the other items or the metric order.

    Args:
        items: The items (a non-sequence iterable is materialised as a list).
        saliency_fn: ``saliency_fn(item) -> np.ndarray [h, w]``.
        metrics: Names from :data:`sact.saliency.metrics.METRICS`; ``None``
            means all of them.
        shuffled_pool: ``"category"`` or ``"dataset"`` (see above).
        n_other: Number of other images whose fixations form the shuffled-AUC
            negatives, or ``None`` for all images of the pool.
        seed: Seed of the random metrics (jitter, negative sampling, choice
            of other images).
        progress: Show a tqdm progress bar.

    Returns:
        A JSON-serialisable dict (scores may be ``NaN``)::

            {"metrics": [names],
             "config": {"shuffled_pool", "n_other", "seed"},
             "items": [{"category", "name", <metric>: score, ...}, ...],
             "categories": {category: {"n": count, <metric>: mean, ...}},
             "overall": {"n": count, <metric>: mean, ...}}

        Means ignore NaN scores; ``"overall"`` averages over images (equal to
        the mean of category means when categories are equally large, as in
        CAT2000).

    Raises:
        ValueError: On unknown metrics, a bad ``shuffled_pool``/``n_other``,
            no items, or a metric error on an item (the message names the
            item).
    """
    names = check_metric_names(metrics)
    if shuffled_pool not in ("category", "dataset"):
        raise ValueError(f"shuffled_pool must be 'category' or 'dataset', got {shuffled_pool!r}")
    if n_other is not None and (isinstance(n_other, bool) or not isinstance(n_other, int) or n_other < 1):
        raise ValueError(f"n_other must be a positive integer or None, got {n_other!r}")
    if not isinstance(items, Sequence):
        items = list(items)
    if len(items) == 0:
        raise ValueError("items is empty")
    shuffled = "auc_shuffled" in names

    # Pass 1 (shuffled AUC only): fixation coordinates and pools.
    fix_coords: list[tuple[np.ndarray, tuple[int, int]]] = []
    pools: dict[str, list[int]] = {}
    if shuffled:
        for i, item in enumerate(tqdm(items, desc="fixations", disable=not progress)):
            locs = np.asarray(item.fixation_locs) != 0
            if locs.ndim != 2:
                raise ValueError(
                    f"item {_category(item)}/{_name(item, i)}: fixation_locs must be 2-D, got shape {locs.shape}"
                )
            fix_coords.append((np.argwhere(locs), locs.shape))
            key = _category(item) if shuffled_pool == "category" else "all"
            pools.setdefault(key, []).append(i)

    rows: list[dict[str, Any]] = []
    no_pool: list[str] = []
    for i, item in enumerate(tqdm(items, desc="saliency", disable=not progress)):
        cat, name = _category(item), _name(item, i)
        rng = np.random.default_rng([seed, i])
        item_names = list(names)
        other = None
        if shuffled:
            key = cat if shuffled_pool == "category" else "all"
            cands = [j for j in pools[key] if j != i]
            if not cands:
                no_pool.append(f"{cat}/{name}")
                item_names.remove("auc_shuffled")
            else:
                if n_other is not None and len(cands) > n_other:
                    cands = sorted(rng.choice(cands, size=n_other, replace=False).tolist())
                other = _other_fixations(fix_coords[i][1], [fix_coords[j] for j in cands])
        try:
            sal = saliency_fn(item)
            scores = (
                evaluate_all(
                    sal,
                    item.fixation_locs,
                    item.fixation_map,
                    other_fixations=other,
                    metrics=item_names,
                    rng=rng,
                )
                if item_names
                else {}
            )
        except ValueError as e:
            raise ValueError(f"item {cat}/{name}: {e}") from e
        row: dict[str, Any] = {"category": cat, "name": name}
        row.update({m: scores.get(m, float("nan")) for m in names})
        rows.append(row)
    if no_pool:
        warnings.warn(
            f"auc_shuffled is NaN for {len(no_pool)} image(s) with no other image in their "
            f"{shuffled_pool} pool: {no_pool[:5]}{' ...' if len(no_pool) > 5 else ''}",
            stacklevel=2,
        )

    categories: dict[str, dict[str, Any]] = {}
    for cat in dict.fromkeys(r["category"] for r in rows):
        sel = [r for r in rows if r["category"] == cat]
        categories[cat] = {"n": len(sel), **{m: _mean(r[m] for r in sel) for m in names}}
    overall = {"n": len(rows), **{m: _mean(r[m] for r in rows) for m in names}}
    return {
        "metrics": names,
        "config": {"shuffled_pool": shuffled_pool, "n_other": n_other, "seed": seed},
        "items": rows,
        "categories": categories,
        "overall": overall,
    }


def _fmt(x: Any) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.3f}"


def write_report(
    results: dict[str, Any],
    out_dir: str | Path,
    *,
    title: str = "Saliency evaluation",
) -> tuple[Path, Path]:
    """Writes ``saliency.json`` and ``saliency.md`` for :func:`evaluate_dataset` results.

    The JSON is ``results`` with NaN scores written as ``null``. The markdown
    has one table: a row per category (mean scores and image count) and a
    final **overall** row, one column per metric (MIT benchmark labels).

    Args:
        results: The dict returned by :func:`evaluate_dataset`.
        out_dir: Output folder (created if missing).
        title: Markdown heading.

    Returns:
        ``(json_path, markdown_path)``.

    Raises:
        ValueError: If ``results`` lacks ``metrics``, ``categories`` or
            ``overall``.
    """
    missing = [k for k in ("metrics", "categories", "overall") if k not in results]
    if missing:
        raise ValueError(f"results is missing {missing}; pass the dict from evaluate_dataset")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "saliency.json"
    md_path = out / "saliency.md"
    json_path.write_text(dumps_json(results, indent=2) + "\n")

    names = list(results["metrics"])
    labels = [METRIC_LABELS.get(m, m) for m in names]
    lines = [f"# {title}", ""]
    overall = results["overall"]
    cfg = results.get("config", {})
    lines.append(
        f"{overall.get('n', '?')} images, {len(results['categories'])} categories. "
        "Higher is better except for "
        + ", ".join(METRIC_LABELS.get(m, m) for m in _LOWER_IS_BETTER)
        + " (lower is better)."
    )
    if "auc_shuffled" in names and cfg:
        lines.append(
            f"sAUC negatives: fixations of {('up to ' + str(cfg['n_other'])) if cfg.get('n_other') else 'all'} other images of the same "
            f"{cfg.get('shuffled_pool')}; seed {cfg.get('seed')}."
        )
    lines += ["", "| category | n | " + " | ".join(labels) + " |", "|---|---:|" + "---:|" * len(names)]
    for cat, row in results["categories"].items():
        lines.append(f"| {cat} | {row.get('n', '')} | " + " | ".join(_fmt(row.get(m)) for m in names) + " |")
    lines.append(
        f"| **overall** | {overall.get('n', '')} | "
        + " | ".join(_fmt(overall.get(m)) for m in names)
        + " |"
    )
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path
