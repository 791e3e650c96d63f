"""``sact demo``: vanilla vs ACT vs SACT on Cluttered Fashion-MNIST, with a report.

Recipe (the paper's fine-tuning, scaled down): a vanilla CIFAR-style ResNet is trained
for ``pretrain_steps + finetune_steps`` steps; ACT and SACT models of the same depth
start from its weights at ``pretrain_steps`` (halting branches fresh) and are trained
for ``finetune_steps`` with the ponder cost, so all three see the same number of
gradient steps. The report folder gets:

* ``report.md`` -- settings, the table, pictures, ponder inside vs outside the object;
* ``results.json`` -- every number of the report;
* ``table.png``, ``accuracy_vs_flops.png``, ``ponder_maps.png``;
* ``vanilla/``, ``act/``, ``sact/`` -- checkpoints (``model.safetensors`` + ``model.json``),
  ``metrics.json`` and ``config.yaml`` of each model.

The demo writes only these files (:func:`demo_files`). A folder that already holds any
of them is refused unless ``overwrite``; then exactly those files are replaced and
nothing else in the folder is touched.
"""

from __future__ import annotations

import dataclasses
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import OutputExistsError
from ..io.files import atomic_write_bytes, check_output_folder, dumps_json, prepare_outputs, remove_stale_temp_files
from ..engine.config import TrainConfig, cpu_cores

__all__ = ["DemoSettings", "PRESETS", "run_demo", "ponder_box_stats", "demo_files"]

MODES = ("vanilla", "act", "sact")
REPORT_FILES = ("report.md", "results.json", "table.png", "accuracy_vs_flops.png", "ponder_maps.png")
_INIT = ("vanilla_init/model.safetensors", "vanilla_init/model.json")


def demo_files(out: Path) -> list[Path]:
    """Every file the demo writes into ``out`` (the report, each model's run files, the branch-point snapshot)."""
    from ..engine.train import RUN_FILES

    return ([out / name for name in REPORT_FILES] + [out / mode / name for mode in MODES for name in RUN_FILES]
            + [out / name for name in _INIT])


@dataclass(frozen=True)
class DemoSettings:
    """What the demo trains.

    Attributes:
        model: registered CIFAR-style model (``resnet20_cifar``: 3 units per stage).
        base_channels: width of the first stage.
        pretrain_steps: vanilla-only steps before ACT / SACT branch off (0: all from scratch).
        finetune_steps: steps of each model after the branch point.
        batch_size: images per step.
        lr: base learning rate (piecewise x0.1 at 60 / 75 / 90 % of each run).
        tau_act: ponder weight of the ACT model.
        tau_sact: ponder weight of the SACT model.
        halting_lr_mult: learning-rate multiplier of the halting branches (see
            :class:`~sact.engine.config.TrainConfig`; needed in runs this short).
        train_samples: training canvases (cycled over epochs).
        eval_samples: test canvases.
        canvas_size: canvas side (64).
        num_maps: test images shown in ``ponder_maps.png``.
        seed: seed of weights, data order and canvases.
        threads: torch threads (0: torch's default).
    """

    model: str = "resnet20_cifar"
    base_channels: int = 8
    pretrain_steps: int = 300
    finetune_steps: int = 250
    batch_size: int = 64
    lr: float = 0.05
    tau_act: float = 0.1
    tau_sact: float = 0.05
    halting_lr_mult: float = 20.0
    train_samples: int = 16000
    eval_samples: int = 2000
    canvas_size: int = 64
    num_maps: int = 6
    seed: int = 0
    threads: int = 0

    def __post_init__(self) -> None:
        checks = {
            "base_channels": self.base_channels >= 2 and self.base_channels % 2 == 0,
            "pretrain_steps": self.pretrain_steps >= 0,
            "finetune_steps": self.finetune_steps >= 1,
            "batch_size": 1 <= self.batch_size <= self.train_samples,
            "lr": self.lr > 0,
            "tau_act": self.tau_act >= 0,
            "tau_sact": self.tau_sact >= 0,
            "halting_lr_mult": self.halting_lr_mult > 0,
            "eval_samples": self.eval_samples >= 1,
            "canvas_size": self.canvas_size >= 16,
            "num_maps": 1 <= self.num_maps <= self.eval_samples,
            "threads": 0 <= self.threads <= cpu_cores(),  # 0: torch's default
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"DemoSettings: invalid {name}={getattr(self, name)!r}")


#: ``default`` takes a few minutes on 2 CPU cores, ``quick`` less (measured times in docs/demo.md).
PRESETS = {
    "default": DemoSettings(),
    "quick": DemoSettings(pretrain_steps=150, finetune_steps=100, batch_size=32, train_samples=6000, eval_samples=500),
}


class _Cached(torch.utils.data.Dataset):
    """Canvases drawn once and kept in memory (every model trains on the same tensors)."""

    def __init__(self, batch: dict[str, torch.Tensor]) -> None:
        self.images, self.labels = batch["image"], batch["label"]
        self.boxes, self.masks = batch["box"], batch["mask"]
        from ..data import FASHION_MNIST_CLASSES, cluttered_preprocess

        self.classes, self.preprocess = list(FASHION_MNIST_CLASSES), cluttered_preprocess(self.images.shape[-1])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])


def ponder_box_stats(num_units: torch.Tensor, ponder: torch.Tensor, boxes: torch.Tensor, num_stages: int) -> dict:
    """How the computation splits between the object box and the rest of the canvas.

    Args:
        num_units: ``[B, H, W]`` executed units summed over stages (input resolution).
        ponder: ``[B, H, W]`` ponder cost summed over stages (input resolution).
        boxes: ``[B, 4]`` object boxes ``(x0, y0, x1, y1)`` in pixel-edge coordinates.
        num_stages: stages (each runs at least one unit, the floor of ``num_units``).

    Returns:
        ``ponder_inside`` / ``ponder_outside``: mean ponder cost per pixel inside / outside
        the box (means over images); ``ponder_ratio``: their ratio;
        ``extra_share_inside``: share of the units above the floor of one per stage
        that falls inside the box (pooled over images); ``box_area_share``: the box's
        share of the canvas (what a uniform map would give).
    """
    b, h, w = ponder.shape
    ys = torch.arange(h, dtype=torch.float32)[None, :, None] + 0.5
    xs = torch.arange(w, dtype=torch.float32)[None, None, :] + 0.5
    inside = (xs >= boxes[:, 0, None, None]) & (xs < boxes[:, 2, None, None]) & \
             (ys >= boxes[:, 1, None, None]) & (ys < boxes[:, 3, None, None])  # [B, H, W]
    outside = ~inside
    n_in, n_out = inside.flatten(1).sum(1), outside.flatten(1).sum(1)
    # per-image means, averaged over the images that have pixels in the region
    p_in = ((ponder * inside).flatten(1).sum(1) / n_in.clamp_min(1))[n_in > 0].mean().item()
    p_out = ((ponder * outside).flatten(1).sum(1) / n_out.clamp_min(1))[n_out > 0].mean().item()
    extra = (num_units.float() - num_stages).clamp_min(0)
    total_extra = extra.sum().item()
    return {
        "ponder_inside": p_in,
        "ponder_outside": p_out,
        "ponder_ratio": p_in / p_out if p_out > 0 else float("nan"),
        "extra_share_inside": (extra * inside).sum().item() / total_extra if total_extra > 0 else float("nan"),
        "box_area_share": inside.float().mean().item(),
    }


@torch.no_grad()
def _maps(model, images: torch.Tensor, batch: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    from ..viz import summed_map

    ponders, units = [], []
    size = tuple(images.shape[-2:])
    for i in range(0, len(images), batch):
        out = model(images[i : i + batch])
        ponders.append(summed_map(out.stages, size, field="ponder_map"))
        units.append(summed_map(out.stages, size, field="num_units"))
    return torch.cat(ponders), torch.cat(units)


def _train_config(s: DemoSettings, mode: str, out: Path, *, steps: int, init: str | None, progress: bool,
                  overwrite: bool = False) -> TrainConfig:
    tau = {"vanilla": 0.0, "act": s.tau_act, "sact": s.tau_sact}[mode]
    return TrainConfig(
        model=s.model, mode=mode, model_kwargs={"base_channels": s.base_channels}, tau=tau, dataset="cluttered",
        train_samples=s.train_samples, eval_samples=s.eval_samples, data_seed=s.seed,
        clutter={"canvas_size": s.canvas_size}, batch_size=s.batch_size, eval_batch_size=200, steps=steps,
        lr=s.lr, schedule="piecewise", init=init, out_dir=str(out / mode), tensorboard=False, progress=progress,
        amp="none", device="cpu", threads=s.threads, seed=s.seed, log_every=10**9, image_every=0,
        halting_lr_mult=s.halting_lr_mult if mode != "vanilla" else 1.0, overwrite=overwrite,
    )


def run_demo(settings: DemoSettings, out_dir: str | Path, *, data_dir: str | None = None, download: bool = False,
             progress: bool = True, command: str = "sact demo", overwrite: bool = False) -> dict:
    """Trains the three models, evaluates them and writes the report folder.

    Args:
        settings: what to train (see :data:`PRESETS`).
        out_dir: report folder (created). One holding files of an earlier demo is
            refused unless ``overwrite``.
        overwrite: replace the files of an earlier demo in ``out_dir`` (only those,
            :func:`demo_files`; other files in the folder are left alone).
        data_dir: Fashion-MNIST folder (default: search, see :func:`sact.data.find_fashion_mnist`).
        download: allow torchvision to download Fashion-MNIST.
        progress: tqdm bars.
        command: the command line shown in the report.

    Returns:
        The contents of ``results.json``.

    Raises:
        OutputExistsError: ``out_dir`` is a file, holds an earlier demo (without
            ``overwrite``) or is being written by another ``sact demo``.
    """
    out = Path(out_dir)
    check_output_folder(out)
    _check_previous_demo(out, overwrite)  # before the folder is created
    with prepare_outputs(out, lock="demo"):
        _check_previous_demo(out, overwrite)
        for folder in {f.parent for f in demo_files(out)} - {out}:
            remove_stale_temp_files(folder)  # in each model's folder too (of killed sact processes only)
        if overwrite:  # an old report must never describe new models
            for name in REPORT_FILES:
                (out / name).unlink(missing_ok=True)
        return _run_demo(settings, out, data_dir=data_dir, download=download, progress=progress, command=command,
                         overwrite=overwrite)


def _check_previous_demo(out: Path, overwrite: bool) -> None:
    found = [f for f in demo_files(out) if f.exists()]
    if found and not overwrite:
        names = ", ".join(str(f.relative_to(out)) for f in found[:4]) + (", ..." if len(found) > 4 else "")
        raise OutputExistsError(
            f"{out} holds an earlier demo run ({names}); pass --overwrite to replace the demo's files (nothing else "
            "in the folder is touched), or choose another --out"
        )


def _run_demo(settings: DemoSettings, out: Path, *, data_dir, download, progress, command, overwrite) -> dict:
    from .. import data as D
    from ..models.loading import load_checkpoint, save_checkpoint
    from ..engine.state import STATE_FILE
    from ..engine.train import main as train_main

    start = time.perf_counter()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    D.find_fashion_mnist(data_dir, download=download)
    clutter = D.ClutterConfig(canvas_size=settings.canvas_size)
    common = dict(config=clutter, data_dir=data_dir)
    train = _Cached(D.ClutteredFashionMNIST(split="train", num_samples=settings.train_samples, seed=settings.seed, **common).stack())
    test = _Cached(D.ClutteredFashionMNIST(split="test", num_samples=settings.eval_samples, seed=settings.seed + 1, **common).stack())
    data_time = time.perf_counter() - start

    timings, metrics = {}, {}
    pre = settings.pretrain_steps
    init_path = out / "vanilla_init" / "model"

    def keep_init(step: int, net) -> None:
        if step == pre:
            save_checkpoint(net, init_path, meta={"step": step})

    for mode in MODES:
        t = time.perf_counter()
        if mode == "vanilla":
            cfg = _train_config(settings, mode, out, steps=pre + settings.finetune_steps, init=None, progress=progress,
                                overwrite=overwrite)
            metrics[mode] = train_main(cfg, train_set=train, eval_set=test, step_callback=keep_init if pre else None)
        else:
            cfg = _train_config(settings, mode, out, steps=settings.finetune_steps,
                                init=str(init_path) if pre else None, progress=progress, overwrite=overwrite)
            metrics[mode] = train_main(cfg, train_set=train, eval_set=test)
        (out / mode / STATE_FILE).unlink(missing_ok=True)  # written by this run; the report keeps weights only
        timings[mode] = time.perf_counter() - t
    for name in _INIT:  # the branch-point snapshot this run wrote
        (out / name).unlink(missing_ok=True)
    if (out / "vanilla_init").is_dir() and not any((out / "vanilla_init").iterdir()):
        (out / "vanilla_init").rmdir()

    models = {mode: load_checkpoint(out / mode / "model") for mode in MODES}
    box = {}
    for mode, model in models.items():
        ponder, units = _maps(model, test.images)
        box[mode] = ponder_box_stats(units, ponder, test.boxes, len(model.stages))
    base = metrics["vanilla"]["flops_mean"]
    rows = [{
        "mode": mode, "tau": {"vanilla": 0.0, "act": settings.tau_act, "sact": settings.tau_sact}[mode],
        "top1": metrics[mode]["top1"], "flops_mean": metrics[mode]["flops_mean"], "flops_std": metrics[mode]["flops_std"],
        "relative_flops": metrics[mode]["flops_mean"] / base, "ponder_cost": metrics[mode]["ponder_cost_mean"],
        **{f"box_{k}": v for k, v in box[mode].items()},
        "train_time_s": timings[mode],
    } for mode in MODES]
    results = {
        "command": command,
        "settings": dataclasses.asdict(settings),
        "rows": rows,
        "metrics": metrics,
        "data_time_s": data_time,
        "total_time_s": time.perf_counter() - start,
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
                        "machine": platform.machine(), "processor": platform.processor()},
    }
    from . import demo_report

    demo_report.write(out, results, models, test)
    results["total_time_s"] = time.perf_counter() - start
    atomic_write_bytes(out / "results.json", dumps_json(results, indent=2).encode())
    return results
