"""The demo's report: table, plots, ponder maps with object boxes, ``report.md``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..io.files import atomic_write_bytes

__all__ = ["write"]

_NAMES = {"vanilla": "vanilla ResNet", "act": "ACT ResNet", "sact": "SACT ResNet"}
_COLORS = {"vanilla": "tab:gray", "act": "tab:blue", "sact": "tab:orange"}


def _savefig(fig, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def _table_rows(rows: list[dict]) -> list[list[str]]:
    return [[
        _NAMES[r["mode"]], f"{r['tau']:g}", f"{100 * r['top1']:.2f}", f"{r['flops_mean'] / 1e6:.2f}",
        f"{r['flops_std'] / 1e6:.2f}", f"{100 * r['relative_flops']:.1f}%", f"{r['box_ponder_ratio']:.3f}",
        f"{100 * r['box_extra_share_inside']:.1f}%" if np.isfinite(r["box_extra_share_inside"]) else "n/a",
    ] for r in rows]


_HEADER = ["model", "tau", "top-1 (%)", "MFLOPs mean", "MFLOPs std", "rel. FLOPs", "ponder in/out box",
           "extra units in box"]


def _table_png(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 0.5 + 0.45 * (len(rows) + 1)))
    ax.axis("off")
    table = ax.table(cellText=_table_rows(rows), colLabels=_HEADER, loc="center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1, 1.4)
    _savefig(fig, path)
    plt.close(fig)


def _accuracy_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for r in rows:
        ax.errorbar(r["flops_mean"] / 1e6, 100 * r["top1"], xerr=r["flops_std"] / 1e6, fmt="o", ms=8,
                    color=_COLORS[r["mode"]], label=f"{_NAMES[r['mode']]} (tau={r['tau']:g})", capsize=3)
    ax.set_xlabel("MFLOPs per image (mean; bars: std over images)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("Cluttered Fashion-MNIST test set")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _savefig(fig, path)
    plt.close(fig)


@torch.no_grad()
def _ponder_maps(models: dict, test, path: Path, n: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from ..viz import overlay, summed_map

    images = test.images[:n]
    adaptive = [m for m in ("act", "sact") if m in models]
    maps = {}
    for mode in adaptive:
        out = models[mode](images)
        maps[mode] = summed_map(out.stages, tuple(images.shape[-2:])).numpy()
    cols = 1 + len(adaptive)
    # constrained layout puts the title right above the panels (no empty band under it)
    fig, axes = plt.subplots(n, cols, figsize=(2.3 * cols + 0.8, 2.3 * n + 0.3), squeeze=False, layout="constrained")
    # one colour scale for all models and images, so colours compare across the panels
    lo = min(float(m.min()) for m in maps.values()) if maps else 0.0
    hi = max(float(m.max()) for m in maps.values()) if maps else 1.0
    for mode in adaptive:
        for i in range(n):
            ax = axes[i, 1 + adaptive.index(mode)]
            ax.imshow(overlay(images[i], maps[mode][i], vmin=lo, vmax=hi))
            ax.set_title(f"{mode.upper()} ponder {maps[mode][i].mean():.2f}", fontsize=8)
        axes[0, 1 + adaptive.index(mode)].set_title(f"{mode.upper()}\nponder {maps[mode][0].mean():.2f}", fontsize=8)
    from ..data import FASHION_MNIST_CLASSES

    for i in range(n):
        axes[i, 0].imshow(images[i, 0].numpy(), cmap="gray", vmin=0, vmax=1)
        axes[i, 0].set_title(f"input: {FASHION_MNIST_CLASSES[int(test.labels[i])]}", fontsize=8)
        x0, y0, x1, y1 = (float(v) for v in test.boxes[i])
        for ax in axes[i]:
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="red", lw=1.2))
            ax.set_xticks([])
            ax.set_yticks([])
    if adaptive:
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        bar = fig.colorbar(ScalarMappable(norm=Normalize(vmin=lo, vmax=hi), cmap="viridis"), ax=axes[:, 1:],
                           shrink=0.5, aspect=30)
        bar.set_label("ponder cost (summed over stages)", fontsize=8)
        bar.ax.tick_params(labelsize=7)
    fig.suptitle(f"Ponder cost summed over stages (viridis, {lo:.1f} to {hi:.1f}; red: object box)", fontsize=9)
    _savefig(fig, path)
    plt.close(fig)


def _markdown(results: dict) -> str:
    rows, s = results["rows"], results["settings"]
    lines = [
        "# SACT demo: vanilla vs ACT vs SACT on Cluttered Fashion-MNIST",
        "",
        f"Command: `{results['command']}`  ",
        f"Total time: {results['total_time_s'] / 60:.1f} min ({results['environment']['threads']} torch threads; "
        f"torch {results['environment']['torch']}); data generation {results['data_time_s']:.0f} s, training + "
        f"evaluation: " + ", ".join(f"{r['mode']} {r['train_time_s']:.0f} s" for r in rows) + ".",
        "",
        "## Setup",
        "",
        f"* Data: {s['train_samples']} training and {s['eval_samples']} test canvases of {s['canvas_size']}x"
        f"{s['canvas_size']} px (one Fashion-MNIST item over clutter cut from other items; test canvases use "
        "only test-split items).",
        f"* Models: `{s['model']}` (3 stages of equal depth), `base_channels={s['base_channels']}`, `in_chans=1`.",
        f"* Training: SGD momentum 0.9, batch {s['batch_size']}, lr {s['lr']:g} with x0.1 at 60/75/90% of each run, "
        "weight decay 2e-4 on kernels. "
        + (f"The vanilla model trains {s['pretrain_steps'] + s['finetune_steps']} steps; ACT and SACT start from its "
           f"weights at step {s['pretrain_steps']} (halting branches fresh, as the paper's fine-tuning) and train "
           f"{s['finetune_steps']} steps with the ponder cost, so all three take the same number of steps."
           if s["pretrain_steps"] else f"Each model trains {s['finetune_steps']} steps from scratch."),
        "",
        "## Results (test set)",
        "",
        "| " + " | ".join(_HEADER) + " |",
        "|" + "---|" * len(_HEADER),
        *["| " + " | ".join(r) + " |" for r in _table_rows(rows)],
        "",
        "* **rel. FLOPs**: mean FLOPs per image relative to the vanilla model (FLOPs = 2 x multiply-adds of "
        "convolutions and the classifier, counted per image from the real halting masks, halting branches included).",
        "* **ponder in/out box**: mean ponder cost per pixel (summed over the stages) inside the object's box "
        "divided by the mean outside it; 1.0 means no preference (ACT is constant over the image by construction).",
        "* **extra units in box**: of all residual units executed above the floor of one per stage, the share "
        f"executed at pixels inside the box; the box covers {100 * rows[0]['box_box_area_share']:.1f}% of the "
        "canvas on average, which is what a uniform map would give.",
        "",
        "![table](table.png)",
        "",
        "![accuracy vs FLOPs](accuracy_vs_flops.png)",
        "",
        "## Where the computation goes",
        "",
        "![ponder maps](ponder_maps.png)",
        "",
        "Checkpoints: `vanilla/model.safetensors`, `act/model.safetensors`, `sact/model.safetensors` "
        "(load with `sact.load_checkpoint`); every number above is in `results.json`.",
        "",
        "These are short CPU runs: the accuracies are far below what longer training reaches, and the FLOPs "
        "savings depend on tau and on how long the halting branches are trained.",
    ]
    return "\n".join(lines) + "\n"


def write(out: Path, results: dict, models: dict, test) -> None:
    """Writes ``table.png``, ``accuracy_vs_flops.png``, ``ponder_maps.png`` and ``report.md`` to ``out``."""
    _table_png(results["rows"], out / "table.png")
    _accuracy_plot(results["rows"], out / "accuracy_vs_flops.png")
    _ponder_maps(models, test, out / "ponder_maps.png", min(results["settings"]["num_maps"], len(test)))
    atomic_write_bytes(out / "report.md", _markdown(results).encode())
