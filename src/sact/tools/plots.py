"""Accuracy-vs-FLOPs and per-stage num_units plots from ``metrics.json`` files (``sact plot``).

Input contract (written by ``sact eval``): a JSON object with at least ``model``,
``mode``, ``tau`` (may be null), ``top1`` (a fraction in [0, 1] or a percentage),
``flops_mean``, ``flops_std`` and ``stages``: a list of objects with
``ponder_cost_mean``, ``ponder_cost_std``, ``num_units_mean`` and optionally
``num_units_hist`` (counts of positions that ran 1..U units). A missing optional key is
skipped with a warning; a missing required key is an error naming the file and key.
``model`` may also be a model's ``sact_config`` (``{"name", "kwargs": {"mode", ...}}``);
then ``mode`` defaults to ``kwargs["mode"]``. ``model``, ``mode`` and ``tau`` missing from
a file next to a checkpoint ``model.json`` (an ``sact train`` folder) are read from it.
The optional ``dataset`` (written by ``sact eval``; for an ``sact train`` folder, read from
its checkpoint) names the data the accuracy was measured on: files of different datasets
are drawn as separate curves (``model (mode, dataset)``) and a warning lists which file
comes from which dataset, since their accuracies cannot be compared.

:func:`write_plots` writes ``accuracy_vs_flops.png`` and one
``num_units_<model>_<mode>_tau<tau>.png`` per file, checking every output before the first
is written.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from ..errors import InputError

__all__ = ["MetricsError", "load_metrics", "by_dataset", "curve_families", "plot_accuracy_vs_flops", "plot_num_units",
           "plot_names", "write_plots", "REQUIRED", "STAGE_REQUIRED"]

REQUIRED = ("model", "mode", "tau", "top1", "flops_mean", "flops_std", "stages")
STAGE_REQUIRED = ("ponder_cost_mean", "ponder_cost_std", "num_units_mean")
_NUMBERS = ("top1", "flops_mean", "flops_std")


class MetricsError(InputError):
    """A metrics file that cannot be plotted (bad JSON or a missing/invalid required key): exit 2."""


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def load_metrics(path: str | Path) -> tuple[dict, list[str]]:
    """Read and check one metrics file.

    Returns:
        ``(metrics, warnings)``; ``metrics["path"]`` is set to ``str(path)``.

    Raises:
        MetricsError: unreadable file, invalid JSON, missing or invalid required key
            (the message names the file and the key).
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MetricsError(f"{path}: cannot read metrics: {e}") from e
    if not isinstance(doc, dict):
        raise MetricsError(f"{path}: expected a JSON object, got {type(doc).__name__}")
    doc = _from_model_config(doc, path)
    warnings = []
    doc = _from_checkpoint(doc, path, warnings)
    for key in REQUIRED:
        if key not in doc:
            raise MetricsError(f"{path}: missing required key {key!r}")
    for key in _NUMBERS:
        if not _is_number(doc[key]):
            raise MetricsError(f"{path}: key {key!r} must be a finite number, got {doc[key]!r}")
    if doc["tau"] is not None and not _is_number(doc["tau"]):
        raise MetricsError(f"{path}: key 'tau' must be a number or null, got {doc['tau']!r}")
    if not isinstance(doc["stages"], list):
        raise MetricsError(f"{path}: key 'stages' must be a list, got {type(doc['stages']).__name__}")
    no_hist = []
    for i, stage in enumerate(doc["stages"]):
        if not isinstance(stage, dict):
            raise MetricsError(f"{path}: stages[{i}] must be an object")
        for key in STAGE_REQUIRED:
            if key not in stage:
                raise MetricsError(f"{path}: missing required key 'stages[{i}].{key}'")
        hist = stage.get("num_units_hist")
        if hist is None:
            no_hist.append(i)
        elif not isinstance(hist, list) or not hist or not all(_is_number(c) and c >= 0 for c in hist):
            warnings.append(f"{path}: stages[{i}].num_units_hist is not a list of counts; ignored")
            stage.pop("num_units_hist")
    if no_hist:
        warnings.append(f"{path}: no 'num_units_hist' in stages {no_hist}; drawing their means only")
    return {**doc, "path": str(path)}, warnings


def _from_checkpoint(doc: dict, path: Path, warnings: list[str]) -> dict:
    """``sact train`` writes ``metrics.json`` next to its checkpoint ``model.*`` without
    ``model`` / ``mode`` / ``tau`` / ``dataset``: take the missing ones from that checkpoint."""
    missing = [k for k in ("model", "mode", "tau", "dataset") if k not in doc]
    ckpt = path.parent / "model"
    if not missing or not (path.parent / "model.json").is_file():
        return doc
    from ..models.loading import read_checkpoint_meta
    from ..io.checkpoint import CheckpointError

    try:
        ck = read_checkpoint_meta(ckpt)
    except (CheckpointError, OSError, ValueError):
        return doc  # the missing-key error below names what is wrong
    meta = ck.get("meta", {})
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    found = {"model": ck["model"]["name"], "mode": ck["model"]["kwargs"].get("mode", "sact")}
    if "tau" in meta:
        found["tau"] = meta["tau"]
    if "dataset" in config:
        found["dataset"] = config["dataset"]
    taken = [k for k in missing if k in found]
    if taken:
        warnings.append(f"{path}: {', '.join(taken)} taken from the checkpoint {ckpt}")
    return {**doc, **{k: found[k] for k in taken}}


def _from_model_config(doc: dict, path: Path) -> dict:
    """Accept ``"model": model.sact_config`` (``{"name", "kwargs": {"mode", ...}}``) too:
    the name becomes ``model`` and, when ``mode`` is absent, ``kwargs["mode"]`` its mode."""
    cfg = doc.get("model")
    if not isinstance(cfg, dict):
        return doc
    if not isinstance(cfg.get("name"), str):
        raise MetricsError(f"{path}: key 'model' is an object without a 'name'")
    doc = {**doc, "model": cfg["name"]}
    kwargs = cfg.get("kwargs") if isinstance(cfg.get("kwargs"), dict) else {}
    if "mode" not in doc and "mode" in kwargs:
        doc["mode"] = kwargs["mode"]
    return doc


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._]+", "-", text).strip("-") or "x"


def _tau_text(tau) -> str:
    return "none" if tau is None else f"{tau:g}"


def _save(fig, path: Path) -> None:
    import io

    from ..io.files import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


def _dataset(m: dict) -> str:
    return "unknown" if m.get("dataset") is None else str(m["dataset"])


def by_dataset(metrics: list[dict]) -> dict[str, list[str]]:
    """``{dataset: [paths]}`` of metrics dicts (``"unknown"`` for a file without ``dataset``)."""
    groups: dict[str, list[str]] = {}
    for m in metrics:
        groups.setdefault(_dataset(m), []).append(str(m.get("path", "?")))
    return groups


def curve_families(metrics: list[dict]) -> dict[str, list[dict]]:
    """The curves of the accuracy plot: ``{label: metrics}``, one per ``(model, mode)``, and
    per dataset too when the files come from several (``"model (mode)"`` /
    ``"model (mode, dataset)"``)."""
    several = len(by_dataset(metrics)) > 1
    families: dict[str, list[dict]] = {}
    for m in metrics:
        label = f"{m['model']} ({m['mode']}, {_dataset(m)})" if several else f"{m['model']} ({m['mode']})"
        families.setdefault(label, []).append(m)
    return families


def plot_accuracy_vs_flops(metrics: list[dict], path: Path) -> None:
    """Accuracy vs mean FLOPs (horizontal bars: FLOPs std over images); one curve per
    :func:`curve_families` family ordered by FLOPs, each point labelled with its tau."""
    from matplotlib.figure import Figure

    percent = all(m["top1"] <= 1.0 for m in metrics)  # fractions -> shown in %
    big = max(m["flops_mean"] for m in metrics) >= 1e8
    unit, div = ("GFLOPs", 1e9) if big else ("MFLOPs", 1e6)
    fig = Figure(figsize=(7, 5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for label, ms in sorted(curve_families(metrics).items()):
        ms = sorted(ms, key=lambda m: m["flops_mean"])
        x = [m["flops_mean"] / div for m in ms]
        y = [m["top1"] * (100 if percent else 1) for m in ms]
        ax.errorbar(x, y, xerr=[m["flops_std"] / div for m in ms], marker="o", capsize=3, label=label)
        for xi, yi, m in zip(x, y, ms):
            if m["tau"] is not None and m["mode"] != "vanilla":  # tau means nothing without halting
                ax.annotate(f"τ={_tau_text(m['tau'])}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.margins(x=0.1, y=0.1)  # room for the tau labels
    ax.set_xlabel(f"{unit} per image (mean; bars: std over images)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_num_units(m: dict, path: Path) -> None:
    """Per stage, the distribution of executed units over positions (``num_units_hist``,
    as fractions); a dashed line marks the mean. Without any histogram: bars of the means."""
    from matplotlib.figure import Figure

    stages = m["stages"]
    on = "" if m.get("dataset") is None else f", {m['dataset']}"
    title = f"{m['model']} ({m['mode']}, tau={_tau_text(m['tau'])}{on})"
    if not any("num_units_hist" in s for s in stages):
        fig = Figure(figsize=(1.2 * len(stages) + 2.5, 3.5), dpi=100, layout="constrained")
        ax = fig.add_subplot()
        ax.bar([f"stage {i + 1}" for i in range(len(stages))], [s["num_units_mean"] for s in stages])
        ax.set_ylabel("mean executed units per position")
        ax.set_title(title, fontsize=10)
        _save(fig, path)
        return
    fig = Figure(figsize=(3 * len(stages) + 0.5, 3.2), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(stages), squeeze=False)[0]
    for i, (ax, s) in enumerate(zip(axes, stages)):
        hist = s.get("num_units_hist")
        if hist:
            total = sum(hist) or 1
            ax.bar(range(1, len(hist) + 1), [c / total for c in hist])
            ax.set_xlim(0.4, max(len(hist) + 0.6, s["num_units_mean"] + 0.3))
        else:
            ax.text(0.5, 0.5, "no histogram", transform=ax.transAxes, ha="center", color="grey")
        ax.axvline(s["num_units_mean"], color="k", linestyle="--", linewidth=1)
        ax.set_title(f"stage {i + 1}: mean {s['num_units_mean']:.2f}", fontsize=9)
        ax.set_xlabel("executed units")
    axes[0].set_ylabel("fraction of positions")
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def plot_names(metrics: list[dict]) -> list[str | None]:
    """Per metrics dict, the stem of its num_units plot (``-2``, ``-3``... on clashes; None without stages)."""
    names, taken = [], set()
    for m in metrics:
        base = f"num_units_{_slug(str(m['model']))}_{_slug(str(m['mode']))}_tau{_slug(_tau_text(m['tau']))}"
        name, n = base, 1
        while name in taken:
            n += 1
            name = f"{base}-{n}"
        taken.add(name)
        names.append(name if m["stages"] else None)
    return names


def write_plots(paths: list[str | Path], out: str | Path, *, overwrite: bool = False) -> tuple[list[Path], list[str]]:
    """Reads the metrics files and writes the plots into ``out``.

    Every output path is checked before the first file is written (no partial sets).

    Args:
        paths: ``metrics.json`` files (see the module docstring).
        out: the output folder (created).
        overwrite: replace plots already in ``out``.

    Returns:
        ``(files written, warnings)``.

    Raises:
        MetricsError: a file that cannot be plotted.
        OutputExistsError: a plot exists and ``overwrite`` is off; ``out`` is a file.
    """
    from ..io.files import check_output_folder, prepare_outputs

    out = check_output_folder(out)  # before any work
    metrics, warnings = [], []
    for path in paths:
        m, w = load_metrics(path)
        warnings += w
        metrics.append(m)
    datasets = by_dataset(metrics)
    if len(datasets) > 1:
        which = "; ".join(f"{d}: {', '.join(ps)}" for d, ps in sorted(datasets.items()))
        warnings.append(f"the files come from {len(datasets)} datasets, whose accuracies are not comparable; drawn "
                        f"as separate curves: {which}")
    names = plot_names(metrics)
    targets = ["accuracy_vs_flops.png"] + [f"{name}.png" for name in names if name]
    with prepare_outputs(out, files=targets, overwrite=overwrite):  # every file is checked before the first is written
        written = [out / "accuracy_vs_flops.png"]
        plot_accuracy_vs_flops(metrics, written[0])
        for m, name in zip(metrics, names):
            if name:
                plot_num_units(m, out / f"{name}.png")
                written.append(out / f"{name}.png")
            else:
                warnings.append(f"{m['path']}: no stages; no num_units plot")
    return written, warnings
