"""Accuracy vs FLOPs on Cluttered Fashion-MNIST, with seeds and 95% intervals (issue 15).

The paper's central claim at CPU scale: at equal FLOPs SACT beats ACT, both beat vanilla
ResNets of reduced depth, and SACT spends its units on the object.

Protocol (every number below is a flag; the result file keeps all of them):

* data: Cluttered Fashion-MNIST (``sact.data.ClutteredFashionMNIST``) with the default
  clutter, ``--canvas-size`` canvases. Every training step sees fresh canvases: the
  vanilla runs draw ``steps x batch`` canvases (seed ``--data-seed``, objects and clutter
  drawn from the whole 60,000-item train split), the ACT / SACT fine-tuning runs
  ``(steps - warm_step) x batch`` other canvases (seed ``data_seed + 2``), so no model
  sees a canvas twice. Test: ``--eval-samples`` canvases from the 10,000-item test split
  (seed ``data_seed + 1``), the same for every model.
* models: CIFAR-style pre-activation ResNets (``sact.models.CifarResNet``, ``in_chans=1``,
  ``--base-channels``) with ``n`` units per stage, ResNet-(6n+2). ``resnet20_cifar``
  (n = 3) is in the registry; n = 1 / 2 / 4 are registered by this script under
  ``resnet8_cifar`` / ``resnet14_cifar`` / ``resnet26_cifar`` as
  ``CifarResNet(layers=(n, n, n))`` (public API: ``sact.register_model``).
* vanilla: every ``--depths`` n, trained from scratch for ``--steps`` steps.
* ACT / SACT (n = ``--adaptive-depth``): the paper's fine-tuning recipe, scaled down:
  warm start from the vanilla network of the same depth and seed at ``--warm-step``
  (halting branches fresh, as the reference's ``finetuning_init_fn``), then
  ``steps - warm_step`` steps with the ponder cost and a fresh learning-rate schedule,
  halting branches at ``--halting-lr-mult`` x the learning rate. Every model takes
  ``--steps`` SGD steps of ``--batch-size`` canvases.
* optimiser: the engine's (``sact.engine.train.main``): SGD momentum 0.9, weight decay
  2e-4 on kernels, ``--lr`` with x0.1 at 60 / 75 / 90 % of each run.
* every point (mode, tau) x every ``--seeds`` seed is one job (one process, ``--threads``
  threads); seeds change weights and data order, not the canvases.
* evaluation: top-1, FLOPs per image counted from the real halting masks, and the
  ponder-in-object-box statistics (``sact.tools.demo.ponder_box_stats``) on all test
  canvases. The vanilla network at the adaptive depth also records its learning curve
  (top-1 on the first ``--curve-samples`` test canvases at ``--curve-points`` regular steps).
* aggregation per point: mean over seeds and a two-sided 95% Student-t interval
  (``mean +- t(0.975, n-1) * s / sqrt(n)``, ``s`` the sample std); FLOPs relative to the
  vanilla network at the adaptive depth (ResNet-20: the full-depth network ACT / SACT are
  made from); the per-seed difference to the same seed's vanilla depth curve at equal
  FLOPs (linear interpolation between depths), with its t-interval.

Running: jobs run in parallel as subprocesses (``--jobs``, default one per core, each
``--threads 1``), with a progress bar (estimated CPU seconds of work) and one log per job
in ``RUN_DIR/jobs/<job>/log.txt``. Each job writes ``result.json`` atomically when done and
a resumable training state every ``--checkpoint-every`` steps; the warm-start snapshots go
to ``RUN_DIR/warm/``. Rerunning the same command skips finished jobs and snapshots and
continues interrupted jobs from their last checkpoint, so the sweep can be stopped
(Ctrl-C, kill) and restarted at any time. The result files are rewritten after every job
and are marked ``partial`` until every planned job is done::

    python benchmarks/accuracy_vs_flops.py --plan      # jobs, calibrated time estimate
    python benchmarks/accuracy_vs_flops.py             # run / resume the sweep
    python benchmarks/accuracy_vs_flops.py --aggregate # only rewrite the result files
    python benchmarks/accuracy_vs_flops.py --quick     # smoke test (about a minute)

Outputs: ``OUT.json`` (``settings``, ``points``, ``learning_curve``, ``jobs``), ``OUT.md``
(table), ``OUT.png`` (top-1 vs relative FLOPs, vanilla / ACT / SACT with 95% intervals),
``OUT_curve.png`` (the learning curve).
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import io
import json
import math
import os
import platform
import resource
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

SCRIPT = Path(__file__).resolve()
REPO = SCRIPT.parents[1]
MODEL_NAMES = {1: "resnet8_cifar", 2: "resnet14_cifar", 3: "resnet20_cifar", 4: "resnet26_cifar", 5: "resnet32_cifar"}
RESULT_FILE = "result.json"
PROGRESS_FILE = "progress.json"
RECIPE = ("vanilla: from scratch, `steps` steps; ACT / SACT: warm start from the same-seed vanilla network of the "
          "adaptive depth at `warm_step` (halting branches fresh), then `steps - warm_step` steps with the ponder "
          "cost, a fresh piecewise schedule and the halting branches at `halting_lr_mult` x the learning rate")


# --------------------------------------------------------------------------------------
# protocol and jobs


@dataclass(frozen=True)
class Protocol:
    """Everything every job of a sweep shares; a run folder holds one protocol.

    Attributes:
        steps: SGD steps of every model.
        warm_step: vanilla step at which ACT / SACT branch off (``0 < warm_step < steps``).
        batch_size: canvases per step.
        lr: base learning rate (piecewise x0.1 at 60 / 75 / 90 % of each run).
        halting_lr_mult: learning-rate multiplier of the halting branches (ACT / SACT).
        canvas_size: canvas side in pixels.
        base_channels: width of the first stage.
        adaptive_depth: units per stage of the ACT / SACT networks (and of the FLOPs reference).
        eval_samples: test canvases of the final evaluation.
        curve_samples: test canvases (the first ones) of the learning curve.
        curve_points: learning-curve evaluations per run (at regular steps).
        data_seed: seed of the canvases (train ``s``, test ``s + 1``, fine-tuning ``s + 2``).
        threads: torch threads per job.
        checkpoint_every: steps between resumable training states of a job.
    """

    steps: int = 3000
    warm_step: int = 1500
    batch_size: int = 32
    lr: float = 0.05
    halting_lr_mult: float = 10.0
    canvas_size: int = 48
    base_channels: int = 8
    adaptive_depth: int = 3
    eval_samples: int = 10000
    curve_samples: int = 1000
    curve_points: int = 20
    data_seed: int = 0
    threads: int = 1
    checkpoint_every: int = 200

    def __post_init__(self) -> None:
        checks = {
            "steps": self.steps >= 2,
            "warm_step": 0 < self.warm_step < self.steps,
            "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0,
            "halting_lr_mult": self.halting_lr_mult > 0,
            "canvas_size": self.canvas_size >= 16,
            "base_channels": self.base_channels >= 2 and self.base_channels % 2 == 0,
            "adaptive_depth": self.adaptive_depth in MODEL_NAMES,
            "eval_samples": self.eval_samples >= 1,
            "curve_samples": 1 <= self.curve_samples <= self.eval_samples,
            "curve_points": self.curve_points >= 1,
            "data_seed": self.data_seed >= 0,
            "threads": self.threads >= 1,
            "checkpoint_every": self.checkpoint_every >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"Protocol: invalid {name}={getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Job:
    """One training run: a point (mode, depth, tau) at one seed."""

    mode: str
    depth: int
    tau: float
    seed: int

    @property
    def id(self) -> str:
        t = "" if self.mode == "vanilla" else f"_tau{self.tau:g}"
        return f"{self.mode}_d{self.depth}{t}_s{self.seed}"

    @property
    def point(self) -> tuple[str, int, float]:
        return (self.mode, self.depth, self.tau)


def plan_jobs(*, seeds, depths, act_taus, sact_taus, adaptive_depth: int) -> list[Job]:
    """The sweep's jobs: vanilla at every depth, ACT and SACT at every tau, each at every seed.

    Ordered by priority: the vanilla networks the ACT / SACT jobs start from come first.

    Raises:
        ValueError: no seeds, a depth without a model, a negative tau, duplicates, or
            ACT / SACT taus without the adaptive depth among the vanilla depths.
    """
    seeds, depths = list(seeds), list(depths)
    if not seeds or len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise ValueError(f"seeds must be distinct non-negative ints, got {seeds}")
    if not depths or len(set(depths)) != len(depths) or any(d not in MODEL_NAMES for d in depths):
        raise ValueError(f"depths must be distinct values of {sorted(MODEL_NAMES)}, got {depths}")
    for name, taus in (("act_taus", act_taus), ("sact_taus", sact_taus)):
        if len(set(taus)) != len(taus) or any(t < 0 for t in taus):
            raise ValueError(f"{name} must be distinct non-negative values, got {list(taus)}")
    if (act_taus or sact_taus) and adaptive_depth not in depths:
        raise ValueError(f"ACT / SACT start from the vanilla depth {adaptive_depth}; add it to depths {depths}")
    first = [Job("vanilla", adaptive_depth, 0.0, s) for s in seeds if adaptive_depth in depths]
    adaptive = [Job(m, adaptive_depth, float(t), s) for s in seeds for m, taus in (("sact", sact_taus), ("act", act_taus))
                for t in taus]
    others = [Job("vanilla", d, 0.0, s) for d in sorted(depths, reverse=True) if d != adaptive_depth for s in seeds]
    return first + adaptive + others


def warm_path(run_dir: Path, proto: Protocol, seed: int) -> Path:
    """Checkpoint path (without suffix) of the vanilla snapshot ACT / SACT of ``seed`` start from."""
    return run_dir / "warm" / f"vanilla_d{proto.adaptive_depth}_s{seed}_step{proto.warm_step}"


def warm_ready(run_dir: Path, proto: Protocol, seed: int) -> bool:
    """The snapshot is complete (the sidecar is written after the weights)."""
    p = warm_path(run_dir, proto, seed)
    return p.with_suffix(".json").is_file() and p.with_suffix(".safetensors").is_file()


def job_dir(run_dir: Path, job: Job) -> Path:
    return run_dir / "jobs" / job.id


def read_result(run_dir: Path, job: Job, proto: Protocol) -> dict | None:
    """The job's result if it finished under ``proto``, else None."""
    path = job_dir(run_dir, job) / RESULT_FILE
    if not path.is_file():
        return None
    try:
        res = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return res if res.get("protocol") == proto.to_dict() and res.get("job") == job.id else None


def train_steps(job: Job, proto: Protocol) -> int:
    return proto.steps if job.mode == "vanilla" else proto.steps - proto.warm_step


def curve_steps(proto: Protocol) -> list[int]:
    """Steps at which the learning curve is measured (the last one is the end of training)."""
    k = proto.curve_points
    return sorted({max(1, round(proto.steps * (i + 1) / k)) for i in range(k)})


# --------------------------------------------------------------------------------------
# one job (runs in its own process)


def register_models() -> None:
    """Registers the CIFAR ResNets with 1, 2, 4 units per stage (not in the package's registry)."""
    import sact
    from sact.models import CifarResNet

    for n, name in MODEL_NAMES.items():
        if name in sact.list_models():
            continue

        def build(*, mode="sact", num_classes=10, in_chans=3, base_channels=16, eps=0.01, _n=n):
            return CifarResNet(layers=(_n, _n, _n), mode=mode, num_classes=num_classes, in_chans=in_chans,
                               base_channels=base_channels, eps=eps)

        sact.register_model(name, build)


class Canvases:
    """Canvases drawn once and kept in memory: ``(image [1, S, S], label)`` items plus ``boxes [N, 4]``."""

    def __init__(self, batch: dict) -> None:
        from sact.data import FASHION_MNIST_CLASSES, cluttered_preprocess

        self.images, self.labels, self.boxes = batch["image"], batch["label"], batch["box"]
        self.classes, self.preprocess = list(FASHION_MNIST_CLASSES), cluttered_preprocess()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])

    def head(self, n: int) -> Canvases:
        return Canvases({"image": self.images[:n], "label": self.labels[:n], "box": self.boxes[:n]})


def _train_config(job: Job, proto: Protocol, out: Path, *, init: str | None, data_dir: str | None):
    from sact.engine.config import TrainConfig
    from sact.engine.state import STATE_FILE

    return TrainConfig(
        model=MODEL_NAMES[job.depth], mode=job.mode, model_kwargs={"base_channels": proto.base_channels},
        tau=job.tau, dataset="cluttered", data_dir=data_dir, train_samples=train_steps(job, proto) * proto.batch_size,
        eval_samples=proto.curve_samples, data_seed=proto.data_seed, clutter={"canvas_size": proto.canvas_size},
        batch_size=proto.batch_size, eval_batch_size=200, steps=train_steps(job, proto), lr=proto.lr,
        # the job's own folder: continue its training state if a killed process left one, else
        # start afresh over whatever a killed process wrote before its first state
        schedule="piecewise", init=init, out_dir=str(out), resume=(out / STATE_FILE).is_file(),
        overwrite=not (out / STATE_FILE).is_file(), checkpoint_every=proto.checkpoint_every,
        # NCHW for every job: the layout the protocol's first jobs were trained in (channels-last,
        # the engine's CPU default since, gives the same values up to float rounding, faster)
        tensorboard=False, progress=False, amp="none", memory_format="contiguous", device="cpu", threads=proto.threads, seed=job.seed,
        log_every=10**9, image_every=0, halting_lr_mult=proto.halting_lr_mult if job.mode != "vanilla" else 1.0,
    )


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def evaluate_with_box_stats(model, canvases: Canvases, *, tau: float, batch_size: int = 200) -> tuple[dict, dict]:
    """The engine's metrics on ``canvases`` and, from the same forward passes, the
    ponder-in-object-box statistics (:func:`sact.tools.demo.ponder_box_stats`)."""
    import torch

    from sact.engine.datasets import eval_loader
    from sact.tools.demo import ponder_box_stats
    from sact.classification.evaluate import evaluate
    from sact.viz import summed_map

    ponder, units = [], []
    size = tuple(canvases.images.shape[-2:])

    def keep_maps(module, args, out) -> None:
        ponder.append(summed_map(out.stages, size, field="ponder_map"))
        units.append(summed_map(out.stages, size, field="num_units").to(torch.int16))

    handle = model.register_forward_hook(keep_maps)
    try:
        metrics = evaluate(model, eval_loader(canvases, batch_size), tau=tau)
    finally:
        handle.remove()
    box = ponder_box_stats(torch.cat(units), torch.cat(ponder), canvases.boxes, len(model.stages))
    return metrics, box


def run_job(run_dir: Path, job: Job, proto: Protocol, *, data_dir: str | None = None) -> dict:
    """Trains and evaluates one job; writes ``result.json`` atomically and returns it.

    Resumes from the job's training state if an earlier process was interrupted; the
    vanilla job at the adaptive depth writes the warm-start snapshot at ``warm_step``
    and the learning curve.
    """
    import torch

    import sact
    from sact import data as D
    from sact.checkpoint import atomic_write_bytes
    from sact.engine.datasets import eval_loader
    from sact.classification.evaluate import evaluate
    from sact.engine.state import STATE_FILE
    from sact.engine.train import main as train_main

    torch.set_num_threads(proto.threads)
    register_models()
    start_wall, start_cpu, load_start = time.time(), _cpu_seconds(), os.getloadavg()
    jdir = job_dir(run_dir, job)
    jdir.mkdir(parents=True, exist_ok=True)
    clutter = D.ClutterConfig(canvas_size=proto.canvas_size)
    steps = train_steps(job, proto)
    seed = proto.data_seed if job.mode == "vanilla" else proto.data_seed + 2
    train = D.ClutteredFashionMNIST(split="train", num_samples=steps * proto.batch_size, seed=seed, config=clutter,
                                    data_dir=data_dir)
    test = Canvases(D.ClutteredFashionMNIST(split="test", num_samples=proto.eval_samples, seed=proto.data_seed + 1,
                                            config=clutter, data_dir=data_dir).stack())
    subset = test.head(proto.curve_samples)
    init = None
    if job.mode != "vanilla":
        if not warm_ready(run_dir, proto, job.seed):
            raise RuntimeError(f"{job.id}: warm-start snapshot {warm_path(run_dir, proto, job.seed)} is missing")
        init = str(warm_path(run_dir, proto, job.seed))
    records_curve = job.mode == "vanilla" and job.depth == proto.adaptive_depth
    marks = set(curve_steps(proto)) if records_curve else set()
    curve_file = jdir / "curve.jsonl"
    report_every = max(1, steps // 50)

    def on_step(step: int, net) -> None:
        if records_curve and step == proto.warm_step and not warm_ready(run_dir, proto, job.seed):
            sact.save_checkpoint(net, warm_path(run_dir, proto, job.seed), meta={"step": step, "job": job.id})
        if step in marks and step < steps:  # the last point is the final evaluation below
            m = evaluate(net, eval_loader(subset, 200))
            with open(curve_file, "a") as f:
                f.write(json.dumps({"step": step, "top1": m["top1"], "loss": m["loss"]}) + "\n")
        if step % report_every == 0 or step == steps:
            atomic_write_bytes(jdir / PROGRESS_FILE, json.dumps({"step": step, "steps": steps}).encode())
            print(f"{time.strftime('%H:%M:%S')} {job.id} step {step}/{steps} cpu {_cpu_seconds() - start_cpu:.0f} s",
                  flush=True)

    print(f"{time.strftime('%H:%M:%S')} {job.id}: start (pid {os.getpid()}, load {load_start})", flush=True)
    final = train_main(_train_config(job, proto, jdir / "train", init=init, data_dir=data_dir), train_set=train,
                       eval_set=subset, step_callback=on_step)
    train_cpu = _cpu_seconds() - start_cpu
    net = sact.load_checkpoint(jdir / "train" / "model")
    metrics, box = evaluate_with_box_stats(net, test, tau=job.tau)
    curve = None
    if records_curve:
        points = {}
        if curve_file.is_file():
            for line in curve_file.read_text().splitlines():
                if line.strip():
                    p = json.loads(line)
                    points[p["step"]] = p  # a resumed run may repeat a step: same values, keep one
        points[steps] = {"step": steps, "top1": final["top1"], "loss": final["loss"]}
        curve = [points[s] for s in sorted(points)]
    result = {
        "job": job.id, "mode": job.mode, "depth": job.depth, "model": MODEL_NAMES[job.depth], "tau": job.tau,
        "seed": job.seed, "protocol": proto.to_dict(), "train_steps": steps, "init": init,
        "metrics": metrics, "box": box, "curve": curve,
        "cpu_s": _cpu_seconds(), "train_cpu_s": train_cpu, "wall_s": time.time() - start_wall,
        "load_start": load_start, "load_end": os.getloadavg(), "torch": torch.__version__,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    atomic_write_bytes(jdir / RESULT_FILE, json.dumps(result, indent=1).encode())
    (jdir / "train" / STATE_FILE).unlink(missing_ok=True)  # done: only the weights are kept
    print(f"{time.strftime('%H:%M:%S')} {job.id}: done, top-1 {100 * metrics['top1']:.2f}%, "
          f"{metrics['flops_mean'] / 1e6:.2f} MFLOPs, {result['cpu_s']:.0f} CPU s", flush=True)
    return result


# --------------------------------------------------------------------------------------
# aggregation


def t_interval(values, confidence: float = 0.95) -> tuple[float, float | None, float | None]:
    """``(mean, low, high)``: two-sided Student-t interval of the mean; no interval for n < 2."""
    from scipy import stats

    v = [float(x) for x in values]
    n = len(v)
    if n == 0:
        raise ValueError("t_interval needs at least one value")
    mean = sum(v) / n
    if n < 2:
        return mean, None, None
    s = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * s / math.sqrt(n)
    return mean, mean - half, mean + half


def vanilla_flops(proto: Protocol, depth: int) -> float:
    """FLOPs per image of the vanilla network with ``depth`` units per stage (input independent)."""
    import torch

    import sact

    register_models()
    model = sact.create_model(MODEL_NAMES[depth], mode="vanilla", in_chans=1, base_channels=proto.base_channels).eval()
    with torch.no_grad():
        return float(model(torch.zeros(1, 1, proto.canvas_size, proto.canvas_size)).flops[0])


def _interp(x: float, xs: list[float], ys: list[float]) -> float | None:
    """Piecewise-linear interpolation on sorted ``xs``; None outside ``[xs[0], xs[-1]]``."""
    if len(xs) < 2 or not xs[0] <= x <= xs[-1]:
        return None
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y0
    return None


def _stat(values) -> dict:
    mean, lo, hi = t_interval(values)
    return {"mean": mean, "ci95": None if lo is None else [lo, hi]}


def aggregate(results: list[dict], jobs: list[Job], proto: Protocol, *, ref_flops: float, settings: dict) -> dict:
    """The result document from the finished jobs' results.

    Args:
        results: ``result.json`` contents of finished jobs (any subset of ``jobs``).
        jobs: every planned job (to list the missing ones).
        proto: the protocol.
        ref_flops: FLOPs per image of the vanilla network at the adaptive depth (x axis reference).
        settings: the ``settings`` block (command, seeds, ...).

    Returns:
        ``{"status", "settings", "points", "learning_curve", "jobs"}``: one point per
        (mode, depth, tau) with at least one finished seed, with per-seed values, means
        and 95% t-intervals.
    """
    by_id = {r["job"]: r for r in results}
    done = [j for j in jobs if j.id in by_id]
    missing = [j.id for j in jobs if j.id not in by_id]
    # per seed, the vanilla depth curve and the ACT tau curve (top-1 vs relative FLOPs), for
    # the equal-FLOPs comparisons: every point against vanilla, SACT also against ACT
    curve: dict[tuple[str, int], tuple[list[float], list[float]]] = {}
    for mode in ("vanilla", "act"):
        for s in sorted({j.seed for j in jobs}):
            pts = sorted((by_id[j.id]["metrics"]["flops_mean"] / ref_flops, by_id[j.id]["metrics"]["top1"])
                         for j in done if j.mode == mode and j.seed == s)
            curve[mode, s] = ([p[0] for p in pts], [p[1] for p in pts])
    points = []
    order = {"vanilla": 0, "act": 1, "sact": 2}
    for key in sorted({j.point for j in jobs}, key=lambda k: (order[k[0]], k[1], k[2])):
        mode, depth, tau = key
        runs = sorted((by_id[j.id] for j in done if j.point == key), key=lambda r: r["seed"])
        if not runs:
            continue
        per_seed = []
        for r in runs:
            m, rel = r["metrics"], r["metrics"]["flops_mean"] / ref_flops
            v = _interp(rel, *curve["vanilla", r["seed"]]) if mode != "vanilla" else None
            a = _interp(rel, *curve["act", r["seed"]]) if mode == "sact" else None
            per_seed.append({
                "seed": r["seed"], "top1": m["top1"], "flops_mean": m["flops_mean"], "flops_std": m["flops_std"],
                "rel_flops": rel, "ponder_cost": m["ponder_cost_mean"],
                "units_per_stage": [s["num_units_mean"] for s in m["stages"]],
                "box_ponder_ratio": r["box"]["ponder_ratio"], "box_extra_share_inside": r["box"]["extra_share_inside"],
                "box_area_share": r["box"]["box_area_share"],
                "vanilla_top1_at_equal_flops": v, "delta_vs_vanilla": None if v is None else m["top1"] - v,
                "act_top1_at_equal_flops": a, "delta_vs_act": None if a is None else m["top1"] - a,
                "cpu_s": r["cpu_s"],
            })
        top1, rel = _stat([p["top1"] for p in per_seed]), _stat([p["rel_flops"] for p in per_seed])
        ratio = _stat([p["box_ponder_ratio"] for p in per_seed])
        extra = [p["box_extra_share_inside"] for p in per_seed if not math.isnan(p["box_extra_share_inside"])]
        deltas = [p["delta_vs_vanilla"] for p in per_seed if p["delta_vs_vanilla"] is not None]
        deltas_act = [p["delta_vs_act"] for p in per_seed if p["delta_vs_act"] is not None]
        points.append({
            "mode": mode, "depth": depth, "model": MODEL_NAMES[depth], "tau": tau, "seeds": [p["seed"] for p in per_seed],
            "n": len(per_seed),
            "top1_mean": top1["mean"], "top1_ci95": top1["ci95"],
            "rel_flops": rel["mean"], "rel_flops_ci95": rel["ci95"],
            "flops_mean": sum(p["flops_mean"] for p in per_seed) / len(per_seed),
            "box_ponder_ratio": ratio["mean"], "box_ponder_ratio_ci95": ratio["ci95"],
            "box_extra_share_inside": sum(extra) / len(extra) if extra else None,
            "box_area_share": per_seed[0]["box_area_share"],
            "delta_vs_vanilla_mean": _stat(deltas)["mean"] if deltas else None,
            "delta_vs_vanilla_ci95": _stat(deltas)["ci95"] if deltas else None,
            "delta_vs_vanilla_n": len(deltas),
            "delta_vs_act_mean": _stat(deltas_act)["mean"] if deltas_act else None,
            "delta_vs_act_ci95": _stat(deltas_act)["ci95"] if deltas_act else None,
            "delta_vs_act_n": len(deltas_act),
            "per_seed": per_seed,
        })
    curves = {str(r["seed"]): r["curve"] for r in results if r.get("curve")}
    steps_seen = sorted({p["step"] for c in curves.values() for p in c})
    mean_curve = []
    for st in steps_seen:
        vals = [p["top1"] for c in curves.values() for p in c if p["step"] == st]
        if len(vals) == len(curves):  # steps every seed has
            stat = _stat(vals)
            mean_curve.append({"step": st, "top1_mean": stat["mean"], "top1_ci95": stat["ci95"]})
    status = {"complete": not missing, "partial": bool(missing), "jobs_done": len(done), "jobs_total": len(jobs),
              "missing": missing}
    return {
        "status": status,
        "settings": settings,
        "points": points,
        "learning_curve": {
            "model": f"vanilla {MODEL_NAMES[proto.adaptive_depth]}", "subset": proto.curve_samples,
            "lr_decay_steps": [round(b * proto.steps) for b in (0.6, 0.75, 0.9)], "warm_step": proto.warm_step,
            "per_seed": curves, "mean": mean_curve,
        },
        "jobs": {r["job"]: {"cpu_s": r["cpu_s"], "wall_s": r["wall_s"], "finished": r["finished"],
                            "load_start": r["load_start"], "load_end": r["load_end"]} for r in results},
        "total_cpu_s": sum(r["cpu_s"] for r in results),
    }


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def _ci(mean: float | None, ci: list | None, scale: float = 100.0, digits: int = 2) -> str:
    if mean is None:
        return "n/a"
    if ci is None:
        return f"{scale * mean:.{digits}f}"
    return f"{scale * mean:.{digits}f} [{scale * ci[0]:.{digits}f}, {scale * ci[1]:.{digits}f}]"


def _delta_cell(p: dict, against: str) -> str:
    """``Δ [interval]`` of a point against ``against``'s curve, with ``(n=K)`` when fewer
    seeds than the point's fall inside that curve's FLOPs range."""
    n = p.get(f"delta_vs_{against}_n", 0)
    cell = _ci(p.get(f"delta_vs_{against}_mean"), p.get(f"delta_vs_{against}_ci95"))
    return cell + (f" (n={n})" if 0 < n < p["n"] else "")


def markdown(doc: dict) -> str:
    """The table of ``doc`` (from :func:`aggregate`) with settings and status."""
    st, s = doc["status"], doc["settings"]
    lines = ["# Accuracy vs FLOPs on Cluttered Fashion-MNIST", ""]
    if st["partial"]:
        lines += [f"**PARTIAL RESULTS**: {st['jobs_done']} of {st['jobs_total']} jobs done; "
                  f"missing: {', '.join(st['missing'])}.", ""]
    lines += [
        f"Mean over seeds and two-sided 95% Student-t interval in brackets; {s['eval_samples']} test canvases; "
        f"FLOPs relative to the vanilla {s['flops_reference']['model']} ({s['flops_reference']['flops'] / 1e6:.2f} "
        f"MFLOPs per image). Δ vs vanilla: top-1 minus the same seed's vanilla depth curve interpolated at the "
        "point's FLOPs (n/a outside the vanilla range); Δ vs ACT (SACT points): the same against the same seed's ACT "
        "tau curve. Ponder in/out box: mean ponder cost per pixel inside the "
        "object's box over the mean outside; extra units in box: share of the units above one per stage that run "
        "inside the box (the box covers "
        f"{_pct(doc['points'][0]['box_area_share']) if doc['points'] else 'n/a'} % of the canvas).",
        "",
        "| model | units/stage | tau | seeds | top-1 (%) | rel. FLOPs (%) | MFLOPs | Δ top-1 vs vanilla (points) "
        "| Δ top-1 vs ACT (points) | ponder in/out box | extra units in box (%) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in sorted(doc["points"], key=lambda p: p["rel_flops"]):
        lines.append(
            f"| {p['mode']} {p['model']} | {p['depth']} | {p['tau']:g} | {p['n']} | {_ci(p['top1_mean'], p['top1_ci95'])} "
            f"| {_ci(p['rel_flops'], p['rel_flops_ci95'], digits=1)} | {p['flops_mean'] / 1e6:.2f} "
            f"| {_delta_cell(p, 'vanilla') if p['mode'] != 'vanilla' else 'n/a'} "
            f"| {_delta_cell(p, 'act') if p['mode'] == 'sact' else '-'} "
            f"| {_ci(p['box_ponder_ratio'], p['box_ponder_ratio_ci95'], scale=1.0, digits=3)} "
            f"| {_pct(p['box_extra_share_inside'])} |"
        )
    curve = doc["learning_curve"]["mean"]
    if curve:
        tail = ", ".join(f"step {c['step']}: {_ci(c['top1_mean'], c['top1_ci95'])}" for c in curve[-4:])
        lines += ["", f"Learning curve of the {doc['learning_curve']['model']} (top-1 % on the first "
                  f"{doc['learning_curve']['subset']} test canvases, mean over seeds): {tail}."]
    proto = s["protocol"]
    lines += [
        "",
        f"Command: `{s['command']}`  ",
        f"Recipe: {s['recipe']}.  ",
        f"Protocol: {json.dumps(proto)}  ",
        f"Seeds: {s['seeds']}; depths {s['depths']}; ACT taus {s['act_taus']}; SACT taus {s['sact_taus']}.  ",
        f"Jobs: {st['jobs_done']} / {st['jobs_total']} done, {doc['total_cpu_s'] / 3600:.2f} CPU hours in all; "
        f"torch {s['environment']['torch']}, {s['environment']['cpu_count']} cores, "
        f"{s['jobs']} parallel jobs x {proto['threads']} thread(s).",
    ]
    return "\n".join(lines) + "\n"


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return buf.getvalue()


def plot_points(doc: dict) -> bytes:
    """PNG: top-1 vs relative FLOPs, vanilla / ACT / SACT with 95% intervals on both axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.8))
    depths = "/".join(str(p["depth"]) for p in sorted(doc["points"], key=lambda p: p["depth"]) if p["mode"] == "vanilla")
    adaptive = doc["settings"]["flops_reference"]["depth"]
    styles = {"vanilla": ("s-", "tab:gray", f"vanilla, {depths} units/stage"),
              "act": ("^-", "tab:blue", f"ACT, {adaptive} units/stage"),
              "sact": ("o-", "tab:orange", f"SACT, {adaptive} units/stage")}
    for mode, (fmt, color, label) in styles.items():
        pts = sorted((p for p in doc["points"] if p["mode"] == mode), key=lambda p: p["rel_flops"])
        if not pts:
            continue
        x = [100 * p["rel_flops"] for p in pts]
        y = [100 * p["top1_mean"] for p in pts]

        def err(key, mean_key):
            lo = [100 * (p[mean_key] - p[key][0]) if p[key] else 0.0 for p in pts]
            hi = [100 * (p[key][1] - p[mean_key]) if p[key] else 0.0 for p in pts]
            return [lo, hi]

        n = sorted({p["n"] for p in pts})
        ax.errorbar(x, y, yerr=err("top1_ci95", "top1_mean"), xerr=err("rel_flops_ci95", "rel_flops"), fmt=fmt,
                    color=color, capsize=3, ms=5, label=f"{label} (n = {'/'.join(map(str, n))} seeds)")
        for p, xi, yi in zip(pts, x, y):
            text = f"{p['depth']}" if mode == "vanilla" else f"{p['tau']:g}"
            ax.annotate(text, (xi, yi), fontsize=7, xytext=(4, -10 if mode == "vanilla" else 4),
                        textcoords="offset points", color=color)
    ref = doc["settings"]["flops_reference"]
    ax.set_xlabel(f"FLOPs per image, % of the vanilla {ref['model']} ({ref['flops'] / 1e6:.1f} MFLOPs)")
    ax.set_ylabel(f"top-1 accuracy (%), {doc['settings']['eval_samples']} test canvases")
    title = "Cluttered Fashion-MNIST: accuracy vs FLOPs (mean, 95% t-interval over seeds)"
    if doc["status"]["partial"]:
        title += f"\nPARTIAL: {doc['status']['jobs_done']} of {doc['status']['jobs_total']} jobs"
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if doc["points"]:
        ax.legend(fontsize=8, title="labels: units/stage, tau", title_fontsize=7)
    data = _png(fig)
    plt.close(fig)
    return data


def plot_curve(doc: dict) -> bytes:
    """PNG: the learning curve of the vanilla network at the adaptive depth (every seed and the mean)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lc = doc["learning_curve"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for seed, c in sorted(lc["per_seed"].items()):
        ax.plot([p["step"] for p in c], [100 * p["top1"] for p in c], "-", lw=0.8, alpha=0.6, label=f"seed {seed}")
    if lc["mean"]:
        m = lc["mean"]
        ax.plot([p["step"] for p in m], [100 * p["top1_mean"] for p in m], "k-", lw=2, label="mean")
        if any(p["top1_ci95"] for p in m):
            ax.fill_between([p["step"] for p in m], [100 * (p["top1_ci95"] or [p["top1_mean"]] * 2)[0] for p in m],
                            [100 * (p["top1_ci95"] or [p["top1_mean"]] * 2)[1] for p in m], color="k", alpha=0.12,
                            label="95% t-interval")
    for i, s in enumerate(lc["lr_decay_steps"]):
        ax.axvline(s, color="tab:red", ls=":", lw=1, label="lr x0.1" if i == 0 else None)
    ax.axvline(lc["warm_step"], color="tab:orange", ls="--", lw=1, label="ACT / SACT branch off")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"top-1 (%), first {lc['subset']} test canvases")
    title = f"Learning curve of the {lc['model']}"
    if doc["status"]["partial"]:
        title += " (PARTIAL sweep)"
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)  # the vertical lines are always there
    data = _png(fig)
    plt.close(fig)
    return data


def write_outputs(out: Path, doc: dict) -> None:
    """``OUT.json``, ``OUT.md``, ``OUT.png``, ``OUT_curve.png`` (each written atomically)."""
    from sact.checkpoint import atomic_write_bytes

    atomic_write_bytes(out.with_suffix(".json"), json.dumps(doc, indent=1).encode())
    atomic_write_bytes(out.with_suffix(".md"), markdown(doc).encode())
    atomic_write_bytes(out.with_suffix(".png"), plot_points(doc))
    atomic_write_bytes(out.with_name(out.name + "_curve.png"), plot_curve(doc))


# --------------------------------------------------------------------------------------
# cost estimate


def calibrate(proto: Protocol, kinds, *, reps: int = 5) -> dict:
    """CPU seconds per training step and per evaluated image of each (mode, depth), measured
    with ``proto.threads`` threads on random canvases (process CPU time, not wall)."""
    import torch
    import torch.nn.functional as F

    import sact
    from sact.output import ponder_loss

    register_models()
    torch.set_num_threads(proto.threads)
    out = {}
    s, b = proto.canvas_size, proto.batch_size
    x, y = torch.rand(b, 1, s, s), torch.randint(0, 10, (b,))
    xe = torch.rand(100, 1, s, s)
    for mode, depth in kinds:
        model = sact.create_model(MODEL_NAMES[depth], mode=mode, in_chans=1, base_channels=proto.base_channels)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        for i in range(reps + 2):
            if i == 2:
                t = time.process_time()
            o = model(x)
            loss = F.cross_entropy(o.logits, y) + (ponder_loss(o, 0.01) if mode != "vanilla" else 0.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
        step = (time.process_time() - t) / reps
        model.eval()
        with torch.no_grad():
            model(xe)
            t = time.process_time()
            model(xe)
            ev = (time.process_time() - t) / len(xe)
        out[f"{mode}_d{depth}"] = {"step_s": step, "eval_image_s": ev}
    return out


def job_cost(job: Job, proto: Protocol, calib: dict) -> float:
    """Estimated CPU seconds of a job (training, data drawing, evaluations)."""
    c = calib[f"{job.mode}_d{job.depth}"]
    draw = 0.25e-3 * (proto.canvas_size / 64) ** 2  # measured: ~0.21 ms per 64x64 canvas
    steps = train_steps(job, proto)
    evals = proto.eval_samples + proto.curve_samples
    if job.mode == "vanilla" and job.depth == proto.adaptive_depth:
        evals += proto.curve_samples * (len(curve_steps(proto)) - 1)
    return steps * (c["step_s"] + proto.batch_size * draw) + evals * (c["eval_image_s"] + draw) + 5.0


def simulate(jobs: list[Job], costs: dict[str, float], proto: Protocol, workers: int) -> float:
    """Wall time of the sweep with ``workers`` parallel jobs (list scheduling in plan order;
    an ACT / SACT job waits for its warm-start snapshot)."""
    ready_at = {}  # seed -> time the snapshot appears
    free = [0.0] * workers
    pending = list(jobs)
    end = 0.0
    while pending:
        free.sort()
        t = free[0]
        pick = None
        for j in pending:
            if j.mode == "vanilla" or ready_at.get(j.seed, math.inf) <= t:
                pick = j
                break
        if pick is None:  # everything left waits for a snapshot
            t = min(ready_at.get(j.seed, math.inf) for j in pending)
            if math.isinf(t):
                raise ValueError("unsatisfiable plan: ACT / SACT jobs without their vanilla job")
            free[0] = t
            continue
        pending.remove(pick)
        done = t + costs[pick.id]
        if pick.mode == "vanilla" and pick.depth == proto.adaptive_depth:
            ready_at[pick.seed] = t + costs[pick.id] * proto.warm_step / proto.steps
        free[0] = done
        end = max(end, done)
    return end


# --------------------------------------------------------------------------------------
# the sweep (parent process)


QUICK = dict(steps=30, warm_step=15, batch_size=16, canvas_size=32, base_channels=4, eval_samples=200,
             curve_samples=100, curve_points=3, checkpoint_every=10, seeds=[0, 1], depths=[1, 3], act_taus=[0.05],
             sact_taus=[0.05], run_dir="runs/accuracy_vs_flops_quick", out="runs/accuracy_vs_flops_quick/accuracy_vs_flops")
DEFAULTS = dict(seeds=[0, 1, 2], depths=[1, 2, 3, 4], act_taus=[0.02, 0.05, 0.1, 0.2],
                sact_taus=[0.005, 0.02, 0.05, 0.1], run_dir="runs/accuracy_vs_flops",
                out="benchmarks/results/accuracy_vs_flops")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Protocol()
    p.add_argument("--run-dir", help=f"jobs, logs, checkpoints (default {DEFAULTS['run_dir']})")
    p.add_argument("--out", help=f"result files without suffix (default {DEFAULTS['out']})")
    p.add_argument("--seeds", type=int, nargs="+", help=f"default {DEFAULTS['seeds']}")
    p.add_argument("--depths", type=int, nargs="+", help=f"vanilla units per stage (default {DEFAULTS['depths']})")
    p.add_argument("--act-taus", type=float, nargs="*", help=f"default {DEFAULTS['act_taus']}")
    p.add_argument("--sact-taus", type=float, nargs="*", help=f"default {DEFAULTS['sact_taus']}")
    p.add_argument("--steps", type=int, help=f"SGD steps of every model (default {d.steps})")
    p.add_argument("--warm-step", type=int, help=f"vanilla step ACT / SACT start from (default steps / 2 = {d.warm_step})")
    p.add_argument("--batch-size", type=int, help=f"default {d.batch_size}")
    p.add_argument("--lr", type=float, help=f"default {d.lr}")
    p.add_argument("--halting-lr-mult", type=float, help=f"default {d.halting_lr_mult}")
    p.add_argument("--canvas-size", type=int, help=f"default {d.canvas_size}")
    p.add_argument("--base-channels", type=int, help=f"default {d.base_channels}")
    p.add_argument("--adaptive-depth", type=int, help=f"units per stage of ACT / SACT (default {d.adaptive_depth})")
    p.add_argument("--eval-samples", type=int, help=f"test canvases (default {d.eval_samples})")
    p.add_argument("--curve-samples", type=int, help=f"learning-curve test canvases (default {d.curve_samples})")
    p.add_argument("--curve-points", type=int, help=f"learning-curve evaluations (default {d.curve_points})")
    p.add_argument("--data-seed", type=int, help=f"default {d.data_seed}")
    p.add_argument("--threads", type=int, help=f"torch threads per job (default {d.threads})")
    p.add_argument("--checkpoint-every", type=int, help=f"steps between resumable states (default {d.checkpoint_every})")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel jobs (default: one per core)")
    p.add_argument("--data-dir", help="Fashion-MNIST folder (default: sact.data.find_fashion_mnist's search)")
    p.add_argument("--quick", action="store_true", help="a tiny sweep for a smoke test (its own run folder and outputs)")
    p.add_argument("--plan", "--dry-run", dest="plan", action="store_true",
                   help="print the jobs and the estimated time (measures the per-step cost), run nothing")
    p.add_argument("--aggregate", action="store_true", help="only rewrite the result files from finished jobs")
    p.add_argument("--only", nargs="+", metavar="PATTERN",
                   help="run only jobs whose id matches a glob (e.g. 'vanilla_d3_*'); outputs still cover the whole plan")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (one line per finished job)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one job in this process
    return p


def resolve(args) -> tuple[Protocol, dict]:
    """The protocol and the sweep (seeds, depths, taus, paths) from the flags (``--quick`` presets)."""
    preset = {**DEFAULTS, **(QUICK if args.quick else {})}
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else preset.get(name)  # noqa: E731
    fields = {f.name: pick(f.name) for f in dataclasses.fields(Protocol)}
    fields = {k: v for k, v in fields.items() if v is not None}
    if args.warm_step is None:  # half of the run unless given
        fields["warm_step"] = fields.get("steps", Protocol.steps) // 2
    proto = Protocol(**fields)
    sweep = {k: pick(k) for k in ("seeds", "depths", "act_taus", "sact_taus", "run_dir", "out")}
    return proto, sweep


def _environment(jobs: int) -> dict:
    import torch

    return {"torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "processor": platform.processor(), "parallel_jobs": jobs}


def _settings(proto: Protocol, sweep: dict, jobs: list[Job], args, ref_flops: float, commands: list[str]) -> dict:
    return {
        "command": commands[-1], "commands": commands, "protocol": proto.to_dict(), "recipe": RECIPE,
        "seeds": sweep["seeds"], "depths": sweep["depths"], "act_taus": sweep["act_taus"],
        "sact_taus": sweep["sact_taus"], "eval_samples": proto.eval_samples,
        "models": {str(d): f"{MODEL_NAMES[d]} = sact.models.CifarResNet(layers=({d}, {d}, {d}), in_chans=1, "
                            f"base_channels={proto.base_channels})" for d in sorted({j.depth for j in jobs})},
        "data": {"dataset": "Cluttered Fashion-MNIST (sact.data.ClutteredFashionMNIST, default ClutterConfig)",
                 "canvas_size": proto.canvas_size,
                 "train": f"fresh canvases every step: vanilla seed {proto.data_seed} (steps x batch), "
                          f"ACT/SACT fine-tuning seed {proto.data_seed + 2} ((steps - warm_step) x batch); "
                          "objects and clutter from the 60,000-item train split",
                 "test": f"{proto.eval_samples} canvases, seed {proto.data_seed + 1}, 10,000-item test split"},
        "optimizer": "engine defaults: SGD momentum 0.9, weight decay 2e-4 on kernels, piecewise x0.1 at 60/75/90% "
                     "of each run",
        "flops_reference": {"model": MODEL_NAMES[proto.adaptive_depth], "depth": proto.adaptive_depth,
                            "flops": ref_flops, "what": "vanilla network at the ACT / SACT depth (the full-depth network)"},
        "interval": "two-sided 95% Student-t interval over seeds: mean +- t(0.975, n-1) * s / sqrt(n)",
        "jobs": args.jobs, "environment": _environment(args.jobs),
    }


def _check_protocol(run_dir: Path, proto: Protocol) -> None:
    """A run folder holds one protocol: store it, or refuse a different one."""
    from sact.checkpoint import atomic_write_bytes

    path = run_dir / "protocol.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved != proto.to_dict():
            diff = {k: (saved.get(k), v) for k, v in proto.to_dict().items() if saved.get(k) != v}
            raise SystemExit(f"error: {run_dir} holds a sweep with other settings {diff} (saved, now); "
                             "use another --run-dir")
        return
    atomic_write_bytes(path, json.dumps(proto.to_dict(), indent=1).encode())


def _write(run_dir: Path, out: Path, jobs, proto, sweep, args, ref_flops) -> dict:
    results = [r for r in (read_result(run_dir, j, proto) for j in jobs) if r is not None]
    log = run_dir / "commands.log"
    commands = [c for c in log.read_text().splitlines() if c.strip()] if log.is_file() else []
    doc = aggregate(results, jobs, proto, ref_flops=ref_flops,
                    settings=_settings(proto, sweep, jobs, args, ref_flops, commands or [_command()]))
    write_outputs(out, doc)
    return doc


def _command() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(SCRIPT, Path.cwd()), *sys.argv[1:]])


def _job_progress(run_dir: Path, job: Job) -> float:
    try:
        p = json.loads((job_dir(run_dir, job) / PROGRESS_FILE).read_text())
        return min(1.0, p["step"] / max(1, p["steps"]))
    except (OSError, ValueError, KeyError):
        return 0.0


def _set_parent_death_signal() -> None:
    """Linux: the job dies with the sweep process (kill -9 of the parent included)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_sweep(run_dir: Path, jobs: list[Job], proto: Protocol, *, workers: int, costs: dict[str, float],
              launch, on_done, progress: bool = True) -> list[str]:
    """Runs the unfinished jobs, at most ``workers`` at a time, and returns the ids of those that failed.

    Args:
        launch: ``launch(job) -> Popen-like`` (``poll()``, ``terminate()``, ``wait()``).
        on_done: called after every job that ends (results rewritten there).
        costs: estimated CPU seconds per job id (progress-bar weights).
    """
    from tqdm.auto import tqdm

    todo = [j for j in jobs if read_result(run_dir, j, proto) is None]
    total = sum(costs[j.id] for j in jobs)
    done_cost = total - sum(costs[j.id] for j in todo)
    bar = tqdm(total=round(total), initial=round(done_cost), unit="cpu-s", smoothing=0, disable=not progress,
               desc=f"jobs {len(jobs) - len(todo)}/{len(jobs)}")
    running: dict[str, tuple[Job, object]] = {}
    failed: list[str] = []
    try:
        while todo or running:
            for jid, (job, proc) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                del running[jid]
                if rc == 0 and read_result(run_dir, job, proto) is not None:
                    done_cost += costs[jid]
                    msg = f"done {jid}"
                else:
                    failed.append(jid)
                    msg = f"FAILED {jid} (exit {rc}); log: {job_dir(run_dir, job) / 'log.txt'}"
                    if job.mode == "vanilla" and job.depth == proto.adaptive_depth:
                        blocked = [j for j in todo if j.seed == job.seed and j.mode != "vanilla"
                                   and not warm_ready(run_dir, proto, j.seed)]
                        failed += [j.id for j in blocked]
                        todo = [j for j in todo if j not in blocked]
                on_done()
                (bar.write if progress else print)(f"{time.strftime('%H:%M:%S')} {msg}")
            while len(running) < workers:
                ready = [j for j in todo if j.mode == "vanilla" or warm_ready(run_dir, proto, j.seed)]
                if not ready:
                    break
                job = ready[0]
                todo.remove(job)
                running[job.id] = (job, launch(job))
            if not todo and not running:
                break
            partial = sum(costs[jid] * _job_progress(run_dir, job) for jid, (job, _) in running.items())
            bar.n = round(min(total, done_cost + partial))
            bar.set_description(f"jobs {len(jobs) - len(todo) - len(running)}/{len(jobs)}, {len(running)} running")
            bar.refresh()
            time.sleep(0.2 if not progress else 2.0)
    finally:
        for _, proc in running.values():  # interrupted: the jobs resume from their last checkpoint next time
            proc.terminate()
        for _, proc in running.values():
            proc.wait()
        bar.close()
    return failed


def _launcher(run_dir: Path, args):
    def launch(job: Job):
        jdir = job_dir(run_dir, job)
        jdir.mkdir(parents=True, exist_ok=True)
        log = open(jdir / "log.txt", "a")
        cmd = [sys.executable, str(SCRIPT), "--worker", job.id, "--run-dir", str(run_dir)]
        if args.data_dir:
            cmd += ["--data-dir", args.data_dir]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads_per_job), "MKL_NUM_THREADS": str(args.threads_per_job),
               "PYTHONUNBUFFERED": "1"}
        src = str(REPO / "src")
        if (REPO / "src" / "sact").is_dir() and src not in env.get("PYTHONPATH", "").split(os.pathsep):
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
        try:
            return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd(),
                                    preexec_fn=_set_parent_death_signal)
        finally:
            log.close()

    return launch


def _worker(args) -> int:
    run_dir = Path(args.run_dir)
    proto = Protocol(**json.loads((run_dir / "protocol.json").read_text()))
    mode, rest = args.worker.split("_d", 1)
    depth = int(rest.split("_")[0])
    tau = float(rest.split("_tau")[1].split("_s")[0]) if "_tau" in rest else 0.0
    seed = int(rest.rsplit("_s", 1)[1])
    job = Job(mode, depth, tau, seed)
    if job.id != args.worker:
        print(f"error: bad job id {args.worker!r}", file=sys.stderr)
        return 2
    _set_parent_death_signal()
    run_job(run_dir, job, proto, data_dir=args.data_dir)
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:
        if not args.run_dir:
            parser.error("--worker needs --run-dir")
        return _worker(args)
    try:
        proto, sweep = resolve(args)
        jobs = plan_jobs(seeds=sweep["seeds"], depths=sweep["depths"], act_taus=sweep["act_taus"],
                         sact_taus=sweep["sact_taus"], adaptive_depth=proto.adaptive_depth)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    args.threads_per_job = proto.threads
    run_dir, out = Path(sweep["run_dir"]), Path(sweep["out"])
    if args.only:
        selected = [j for j in jobs if any(fnmatch.fnmatch(j.id, pat) for pat in args.only)]
        needed = {j.seed for j in selected if j.mode != "vanilla"}
        missing_dep = sorted(f"vanilla_d{proto.adaptive_depth}_s{s}" for s in needed
                             if not any(j.id == f"vanilla_d{proto.adaptive_depth}_s{s}" for j in selected)
                             and not warm_ready(run_dir, proto, s))
        if missing_dep:
            print(f"error: --only selects ACT / SACT jobs whose warm start is missing; add {missing_dep}",
                  file=sys.stderr)
            return 2
    else:
        selected = jobs
    if args.aggregate:
        if not (run_dir / "protocol.json").is_file():
            print(f"error: {run_dir} holds no sweep (no protocol.json)", file=sys.stderr)
            return 2
        _check_protocol(run_dir, proto)
        doc = _write(run_dir, out, jobs, proto, sweep, args, vanilla_flops(proto, proto.adaptive_depth))
        print(f"{doc['status']['jobs_done']} of {len(jobs)} jobs done -> {out}.json/.md/.png")
        return 0
    kinds = sorted({(j.mode, j.depth) for j in jobs})
    calib_path = run_dir / "calibration.json"
    if calib_path.is_file() and set(json.loads(calib_path.read_text())) >= {f"{m}_d{d}" for m, d in kinds}:
        calib = json.loads(calib_path.read_text())
    else:
        calib = calibrate(proto, kinds)
        if not args.plan:
            from sact.checkpoint import atomic_write_bytes

            atomic_write_bytes(calib_path, json.dumps(calib, indent=1).encode())
    costs = {j.id: job_cost(j, proto, calib) for j in jobs}
    if args.plan:
        finished = {j.id for j in jobs if run_dir.is_dir() and read_result(run_dir, j, proto) is not None}
        print(f"protocol: {json.dumps(proto.to_dict())}")
        print(f"run folder {run_dir}, outputs {out}.{{json,md,png}}, {args.jobs} parallel jobs x {proto.threads} thread(s)")
        print(f"{'job':<28} {'steps':>6} {'est. CPU min':>12}  status")
        for j in jobs:
            state = "done" if j.id in finished else ("selected" if j in selected else "not selected (--only)")
            print(f"{j.id:<28} {train_steps(j, proto):>6} {costs[j.id] / 60:>12.1f}  {state}")
        todo = [j for j in selected if j.id not in finished]
        cpu = sum(costs[j.id] for j in todo)
        wall = simulate(todo, costs, proto, args.jobs) if todo else 0.0
        print(f"{len(jobs)} jobs ({len(finished)} done, {len(todo)} to run): {cpu / 3600:.2f} CPU hours, "
              f"about {wall / 3600:.2f} h wall with {args.jobs} parallel jobs (per-step costs measured now with "
              f"{proto.threads} thread(s), process CPU time; contention between parallel jobs not included)")
        for k, c in calib.items():
            print(f"  calibration {k}: {1e3 * c['step_s']:.0f} ms/step, {1e3 * c['eval_image_s']:.2f} ms per test image")
        return 0
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_protocol(run_dir, proto)
    ref_flops = vanilla_flops(proto, proto.adaptive_depth)
    with open(run_dir / "commands.log", "a") as f:
        f.write(_command() + "\n")
    from sact.data import find_fashion_mnist

    try:
        find_fashion_mnist(args.data_dir)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    def on_done() -> None:
        _write(run_dir, out, jobs, proto, sweep, args, ref_flops)

    interrupted = False

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    start = time.time()
    try:
        failed = run_sweep(run_dir, selected, proto, workers=args.jobs, costs=costs, launch=_launcher(run_dir, args),
                           on_done=on_done, progress=not args.no_progress)
    except KeyboardInterrupt:
        interrupted, failed = True, []
    doc = _write(run_dir, out, jobs, proto, sweep, args, ref_flops)
    st = doc["status"]
    print(f"{'interrupted' if interrupted else 'finished'} after {(time.time() - start) / 60:.1f} min: "
          f"{st['jobs_done']} of {st['jobs_total']} jobs done -> {out}.json/.md/.png"
          + (f"; failed: {failed}" if failed else ""))
    if interrupted:
        return 130
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
