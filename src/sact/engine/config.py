"""The training configuration: one dataclass, overridable from a YAML file and flags.

Precedence: dataclass defaults < YAML file < command-line flags. The resolved config
is saved (``to_dict``) with every checkpoint, so a run can be reproduced from its
weights file alone.

Every value is checked for its type and range when a config is built; all problems are
reported at once in one :class:`ConfigError` (exit 2 in the CLI), each with the field,
the value and what is expected. YAML is read with ``1e-3`` as a float (YAML 1.2), and
an ``int`` field never takes a float (``steps: 1e3`` is refused, write ``1000``).

A config is untrusted input: a YAML file above :data:`MAX_CONFIG_BYTES`, or a document
(file or ``--set`` value) that expands to more than :data:`MAX_CONFIG_NODES` values once
its aliases (``*name``) are resolved, is refused before it is used; ``threads`` may not
exceed the CPU cores this process may run on, nor ``workers`` :func:`max_workers`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import InputError

__all__ = ["TrainConfig", "ConfigError", "load_config", "parse_overrides", "yaml_load", "RESUME_MAY_CHANGE",
           "DEFAULT_MAX_PIXELS", "MAX_CONFIG_BYTES", "MAX_CONFIG_NODES", "cpu_cores", "max_workers"]

#: Default cap on the pixels of one image read from an image folder (see ``sact.data.images``).
DEFAULT_MAX_PIXELS = 40_000_000

#: Largest YAML config file read (bytes).
MAX_CONFIG_BYTES = 1 << 20

#: Most values a YAML document may hold once every alias is expanded (a string counts
#: one per 100 characters): real configs hold a few hundred; an "anchor bomb" of nested
#: aliases would expand to billions.
MAX_CONFIG_NODES = 100_000

#: Fields that may differ between a run and its ``--resume``: they change how long the
#: run goes on (the schedule is recomputed for the new length), where and how fast it
#: runs, what it logs, and evaluation only. Every other field must match the saved run.
RESUME_MAY_CHANGE = frozenset({
    "steps", "epochs", "eval_every", "checkpoint_every", "log_every", "image_every", "tensorboard", "progress",
    "device", "threads", "workers", "eval_batch_size", "eval_samples", "resume", "overwrite", "download",
    "strict_data", "max_pixels", "out_dir",
})  # fmt: skip


class ConfigError(InputError):
    """Config values of the wrong type or out of range (the message lists every one)."""

_DATASETS = ("cluttered", "cifar10", "imagenet", "folder", "coco")
_SCHEDULES = ("piecewise", "staircase", "cosine", "constant")
_AMP = ("auto", "none", "bf16", "fp16")
_MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
_MODES = ("vanilla", "act", "sact")
_PREPROCESS = ("auto", "dataset", "inception", "torchvision")
_TASKS = ("classification", "detection")
_SPLIT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def cpu_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def max_workers() -> int:
    """Most DataLoader worker processes a config may ask for: 64, or the CPU cores if more."""
    return max(64, cpu_cores())


def _check_type(value: Any, hint: Any) -> tuple[bool, Any, str]:
    """``(ok, value converted, expected type in words)`` for one config field."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and type(None) in args:
        if value is None:
            return True, None, ""
        inner = next(a for a in args if a is not type(None))
        ok, converted, want = _check_type(value, inner)
        return ok, converted, f"{want} or null"
    if hint is bool:
        return isinstance(value, bool), value, "true or false"
    if hint is int:
        return type(value) is int, value, "an int"
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return ok, float(value) if ok else value, "a finite number"
    if hint is str:
        return isinstance(value, str), value, "a string"
    if origin is list:
        want = "a list of names" if args[0] is str else "a list of numbers"
        if not isinstance(value, (list, tuple)):
            return False, value, want
        items = [_check_type(v, args[0]) for v in value]
        return all(ok for ok, _, _ in items), [c for _, c, _ in items], want
    if origin is dict:
        ok = isinstance(value, dict) and all(isinstance(k, str) for k in value)
        return ok, dict(value) if ok else value, "a mapping of names to values"
    return True, value, ""


@dataclass
class TrainConfig:
    """Everything a training run depends on.

    Attributes:
        model: registered model name (:func:`sact.list_models`).
        mode: ``"vanilla"``, ``"act"`` or ``"sact"``.
        model_kwargs: extra arguments of the model builder (``base_channels``,
            ``base_width``, ``eps``...); ``num_classes`` and ``in_chans`` come from the
            dataset unless given here.
        tau: ponder cost weight (loss = CE + tau * ponder cost); ignored for vanilla.
        dataset: ``"cluttered"`` (Cluttered Fashion-MNIST), ``"cifar10"``, ``"imagenet"``
            (``train/`` and ``val/`` class folders, the reference's preprocessing) or
            ``"folder"`` (your own images: class folders of any format Pillow reads, with
            ``train/`` and ``val/`` or split by ``val_fraction``; :mod:`sact.data.folder`);
            ``"coco"`` (COCO-format detection data) with ``task: detection``.
        data_dir: dataset folder (Fashion-MNIST files, ``cifar-10-batches-py``'s parent,
            or the root of the class folders).
        download: let torchvision download Fashion-MNIST if it is not found.
        train_samples: cluttered only, training canvases (drawn from a seed).
        eval_samples: images evaluated: cluttered, the number of test canvases (null:
            2000); other datasets, a fixed subset (seeded by ``data_seed``) of the
            validation images (null: all of them).
        data_seed: cluttered only, seed of the canvases (test canvases use ``data_seed + 1``).
        clutter: cluttered only, :class:`sact.data.ClutterConfig` fields.
        image_size: input side of image-folder datasets (imagenet, folder).
        label_offset: image folders (imagenet, folder): added to the labels (1 for the
            reference's 1001-class models, whose index 0 is background).
        batch_size: images per optimisation step per process.
        eval_batch_size: images per evaluation batch.
        workers: DataLoader worker processes (0: load in the training process).
        steps: optimisation steps; if 0, ``epochs`` sets the length.
        epochs: length in epochs when ``steps`` is 0.
        lr: base learning rate (per process batch; not rescaled with the world size).
        momentum: SGD momentum.
        nesterov: Nesterov momentum.
        weight_decay: L2 on convolution and classifier kernels only.
        halting_lr_mult: learning-rate multiplier of the halting branches (1 = the
            released reference; an earlier reference version had such a multiplier).
            Short fine-tuning runs need it: at the reference init (halting bias -3) and
            a small tau the halting branches barely move in a few hundred steps.
        label_smoothing: cross-entropy label smoothing (ImageNet reference: 0.1).
        schedule: ``"piecewise"`` (CIFAR reference: x``decay_rate`` at the
            ``boundaries`` fractions of the run), ``"staircase"`` (ImageNet reference:
            x``decay_rate`` every ``decay_epochs``), ``"cosine"`` or ``"constant"``.
        boundaries: piecewise schedule, fractions of the run (reference: 60k/75k/90k of 100k).
        decay_rate: factor applied at each boundary / staircase step.
        decay_epochs: staircase period in epochs.
        warmup_steps: linear warm-up from 0 (not in the reference; 0 disables).
        init: warm start: a torchvision ResNet ``.pth`` or an sact checkpoint; halting
            branches stay fresh when the file has none or a different mode.
        out_dir: run folder (checkpoints, training state, logs, metrics). A folder
            holding a previous run is refused unless ``resume`` or ``overwrite``.
        resume: continue the run in ``out_dir`` (``train_state.safetensors`` must exist;
            every field outside :data:`RESUME_MAY_CHANGE` must match the saved run).
        overwrite: replace a previous run in ``out_dir`` (its files are removed first).
        checkpoint_every: also save every N steps (0: only at epoch ends and the end).
        eval_every: evaluate every N steps (0: only at the end).
        log_every: TensorBoard scalar period in steps.
        image_every: TensorBoard ponder-map image period in steps (0: never).
        tensorboard: write TensorBoard logs to ``out_dir/tb``.
        progress: show tqdm progress bars.
        amp: ``"auto"`` (CUDA: bf16 if supported else fp16; CPU: off), ``"none"``,
            ``"bf16"`` (autocast; CPU too) or ``"fp16"`` (CUDA only, with GradScaler).
        memory_format: layout of the model's weights and the images in training:
            ``"channels_last"``, ``"contiguous"`` (NCHW) or ``"auto"`` (channels-last for
            classification on the CPU, where steps are 13-31% faster that way,
            measured in ``benchmarks/train_step.py``; NCHW otherwise). The same values either
            way up to float rounding.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        threads: torch intra-op threads (0: torch's default).
        seed: seed of weights, data order and augmentation.
        strict_data: stop at the first unreadable image of a folder dataset (default:
            skip it with a warning naming it).
        max_pixels: images of a folder dataset above this many pixels are unreadable
            (a guard against decompression bombs).
        val_fraction: dataset ``folder`` without a ``val/`` folder: hold out this share
            of every class for evaluation (a split fixed by ``data_seed``).
        preprocess: image-folder datasets: how pixel values are mapped, to match the
            initial weights. ``"auto"``: ``init`` a torchvision ``.pth`` -> torchvision's
            mean/std (resize to ``image_size / 0.875``, centre crop); ``init`` an sact
            checkpoint -> the preprocessing stored in it (converted reference weights:
            Inception [-1, 1]); no ``init`` -> the dataset's default. ``"dataset"``: the
            dataset's default (image folders: Inception [-1, 1], the reference's;
            cluttered: [0, 1]; cifar10: per-image standardisation), ``"inception"``,
            ``"torchvision"``. cluttered and cifar10 always use their own.
        num_classes: classifier outputs (null: the dataset's classes + ``label_offset``).

    Detection task (``task: detection``, ``dataset: coco``; docs/detection.md). The loop,
    optimiser, schedules, checkpoints and resume are the ones above; these fields say
    what differs: the COCO-format data and the Faster R-CNN + FPN built over ``model``.

    Attributes:
        task: ``"classification"`` or ``"detection"`` (Faster R-CNN over the model;
            ``model_kwargs["in_chans"]`` gives the image channels, default 3).
        train_split: detection, ``data_dir/images/<split>/`` and
            ``data_dir/annotations/instances_<split>.json`` of the training data.
        val_split: detection, the same for the evaluation data.
        train_images: detection, the training image folder (instead of ``data_dir``).
        train_ann: detection, the training ``instances_*.json``.
        val_images: detection, the evaluation image folder.
        val_ann: detection, the evaluation ``instances_*.json``.
        return_stages: detection, the stages feeding the FPN (default: stride >= 2).
        trainable_layers: detection, stages trained, counted from the last returned
            one (default: all, the stem too).
        frozen_bn: detection, FrozenBatchNorm2d everywhere (default: on with ``init``,
            off from scratch).
        fpn_channels: detection, FPN channels.
        representation_size: detection, width of the two-layer box head.
        anchor_sizes: detection, one anchor size per FPN level (default ``8 * stride``).
        min_size: detection, the transform's resize of the shorter side (default: the
            side of the first training image, so small canvases are not upscaled).
        max_size: detection, cap on the longer side (default ``min_size``).
        rpn_proposals: detection, RPN proposals kept after NMS ``[train, test]``.
        detections_per_img: detection, detections kept per image.
        box_batch_size: detection, RoIs sampled per image for the box head.
        hflip: detection, probability of a horizontal flip of a training image.
    """

    model: str = "resnet32_cifar"
    mode: str = "sact"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    tau: float = 0.01
    dataset: str = "cluttered"
    data_dir: str | None = None
    download: bool = False
    train_samples: int = 50000
    eval_samples: int | None = None
    data_seed: int = 0
    clutter: dict[str, Any] = field(default_factory=dict)
    image_size: int = 224
    label_offset: int = 0
    batch_size: int = 128
    eval_batch_size: int = 100
    workers: int = 0
    steps: int = 100000
    epochs: int = 0
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 2e-4
    halting_lr_mult: float = 1.0
    label_smoothing: float = 0.0
    schedule: str = "piecewise"
    boundaries: list[float] = field(default_factory=lambda: [0.6, 0.75, 0.9])
    decay_rate: float = 0.1
    decay_epochs: float = 30.0
    warmup_steps: int = 0
    init: str | None = None
    out_dir: str = "runs/sact"
    resume: bool = False
    overwrite: bool = False
    checkpoint_every: int = 0
    eval_every: int = 0
    log_every: int = 50
    image_every: int = 1000
    tensorboard: bool = True
    progress: bool = True
    amp: str = "auto"
    memory_format: str = "auto"
    device: str = "auto"
    threads: int = 0
    seed: int = 0
    strict_data: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    # data / preprocessing
    val_fraction: float | None = None
    preprocess: str = "auto"
    num_classes: int | None = None
    # detection task ------------------------------------------------------------------
    task: str = "classification"
    train_split: str = "train"
    val_split: str = "test"
    train_images: str | None = None
    train_ann: str | None = None
    val_images: str | None = None
    val_ann: str | None = None
    return_stages: list[str] | None = None
    trainable_layers: int | None = None
    frozen_bn: bool | None = None
    fpn_channels: int = 64
    representation_size: int = 256
    anchor_sizes: list[int] | None = None
    min_size: int | None = None
    max_size: int | None = None
    rpn_proposals: list[int] = field(default_factory=lambda: [600, 300])
    detections_per_img: int = 50
    box_batch_size: int = 128
    hflip: float = 0.5

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> TrainConfig:
        """Checks every field's type, then its value; returns ``self``.

        ``int`` values given for ``float`` fields are converted. The model name and
        ``model_kwargs`` are checked against the registry (:func:`sact.checkpoint.validate_model_spec`).

        Raises:
            ConfigError: listing every bad field with its value and what is expected.
        """
        bad_types = self._type_problems()
        problems = list(bad_types.values()) + self._value_problems(skip=set(bad_types))
        if problems:
            raise ConfigError(f"invalid config: {'; '.join(problems)}")
        return self

    def _type_problems(self) -> dict[str, str]:
        hints = typing.get_type_hints(type(self))
        problems = {}
        for f in fields(self):
            value = getattr(self, f.name)
            ok, converted, want = _check_type(value, hints[f.name])
            if ok:
                object.__setattr__(self, f.name, converted)
            else:
                problems[f.name] = f"{f.name}={value!r} (expected {want})"
        return problems

    def _value_problems(self, skip: set[str]) -> list[str]:
        """Range checks of the fields whose type is right (``skip``: the others)."""
        checks = {
            "mode": (lambda: self.mode in _MODES, f"one of {', '.join(_MODES)}"),
            "tau": (lambda: self.tau >= 0, ">= 0"),
            "dataset": (lambda: self.dataset in _DATASETS, f"one of {', '.join(_DATASETS)}"),
            "train_samples": (lambda: self.train_samples >= 1, ">= 1"),
            "eval_samples": (lambda: self.eval_samples is None or self.eval_samples >= 1, ">= 1 or null"),
            "batch_size": (lambda: self.batch_size >= 1, ">= 1"),
            "eval_batch_size": (lambda: self.eval_batch_size >= 1, ">= 1"),
            "workers": (lambda: 0 <= self.workers <= max_workers(), f"in [0, {max_workers()}]: processes, 64 or one "
                        "per CPU core at most"),
            "steps": (lambda: self.steps >= 0, ">= 0"),
            "epochs": (lambda: self.epochs >= 0 and (self.steps > 0 or self.epochs > 0), ">= 0, and > 0 when steps is 0"),
            "lr": (lambda: self.lr > 0, "> 0"),
            "momentum": (lambda: 0 <= self.momentum < 1, "in [0, 1)"),
            "weight_decay": (lambda: self.weight_decay >= 0, ">= 0"),
            "halting_lr_mult": (lambda: self.halting_lr_mult > 0, "> 0"),
            "label_smoothing": (lambda: 0 <= self.label_smoothing < 1, "in [0, 1)"),
            "schedule": (lambda: self.schedule in _SCHEDULES, f"one of {', '.join(_SCHEDULES)}"),
            "boundaries": (lambda: all(0 < b < 1 for b in self.boundaries) and list(self.boundaries) == sorted(self.boundaries),
                           "increasing fractions in (0, 1)"),
            "decay_rate": (lambda: 0 < self.decay_rate <= 1, "in (0, 1]"),
            "decay_epochs": (lambda: self.decay_epochs > 0, "> 0"),
            "warmup_steps": (lambda: self.warmup_steps >= 0, ">= 0"),
            "image_size": (lambda: self.image_size >= 1, ">= 1"),
            "label_offset": (lambda: self.label_offset >= 0, ">= 0"),
            "amp": (lambda: self.amp in _AMP, f"one of {', '.join(_AMP)}"),
            "memory_format": (lambda: self.memory_format in _MEMORY_FORMATS, f"one of {', '.join(_MEMORY_FORMATS)}"),
            "device": (lambda: _DEVICE_RE.match(self.device) is not None, "auto, cpu, cuda, cuda:N or mps"),
            "threads": (lambda: 0 <= self.threads <= cpu_cores(),
                        f"in [0, {cpu_cores()}]: 0 is torch's default, at most one per CPU core of this process"),
            "log_every": (lambda: self.log_every >= 1, ">= 1"),
            "image_every": (lambda: self.image_every >= 0, ">= 0"),
            "checkpoint_every": (lambda: self.checkpoint_every >= 0, ">= 0"),
            "eval_every": (lambda: self.eval_every >= 0, ">= 0"),
            "max_pixels": (lambda: self.max_pixels >= 1, ">= 1"),
            "out_dir": (lambda: bool(self.out_dir), "a folder name"),
        }
        needs = {"epochs": {"steps"}}  # checks that read another field
        problems = [f"{name}={getattr(self, name)!r} (must be {want})" for name, (ok, want) in checks.items()
                    if name not in skip and not (needs.get(name, set()) & skip) and not ok()]
        problems += self._data_problems(skip)
        if self.resume is True and self.overwrite is True:
            problems.append("resume=True and overwrite=True (choose one: continue the run, or replace it)")
        problems += self._task_problems(skip)
        from ..models.loading import validate_model_spec

        try:
            if not {"model", "model_kwargs"} & skip:
                validate_model_spec(self.model, self.model_kwargs)
        except ValueError as e:
            problems.append(f"model={self.model!r}, model_kwargs={self.model_kwargs!r}: {e}")
        return problems

    def _data_problems(self, skip: set[str]) -> list[str]:
        """Checks of the data / preprocessing fields (``skip``: fields whose type is wrong)."""
        problems = []
        folders = self.dataset in ("imagenet", "folder")
        if "val_fraction" not in skip and self.val_fraction is not None:
            if not 0 < self.val_fraction < 1:
                problems.append(f"val_fraction={self.val_fraction!r} (must be in (0, 1), or null)")
            elif "dataset" not in skip and self.dataset != "folder":
                problems.append(f"val_fraction={self.val_fraction!r} (only dataset folder is split; "
                                f"dataset {self.dataset!r} has its own validation set)")
        if "preprocess" not in skip:
            if self.preprocess not in _PREPROCESS:
                problems.append(f"preprocess={self.preprocess!r} (must be one of {', '.join(_PREPROCESS)})")
            elif "dataset" not in skip and not folders and self.preprocess not in ("auto", "dataset"):
                problems.append(f"preprocess={self.preprocess!r} (dataset {self.dataset!r} has its own preprocessing; "
                                "only imagenet and folder take another)")
        if "clutter" not in skip:
            from ..data.cluttered import ClutterConfig

            try:
                ClutterConfig.from_dict(self.clutter)
            except ValueError as e:
                problems.append(f"clutter={self.clutter!r} ({e})")
        if "num_classes" not in skip and self.num_classes is not None:
            given = self.model_kwargs.get("num_classes") if isinstance(self.model_kwargs, dict) else None
            if self.num_classes < 1:
                problems.append(f"num_classes={self.num_classes!r} (must be >= 1, or null)")
            elif given is not None and given != self.num_classes:
                problems.append(f"num_classes={self.num_classes!r} and model_kwargs num_classes={given!r} differ "
                                "(give one)")
        return problems

    def _task_problems(self, skip: set[str]) -> list[str]:
        """Checks of the detection task's fields, and of the task against the dataset."""
        positive = lambda v: v is None or v >= 1  # noqa: E731
        checks = {
            "task": (lambda: self.task in _TASKS, f"one of {', '.join(_TASKS)}"),
            "train_split": (lambda: _SPLIT_RE.match(self.train_split) is not None, "a folder name"),
            "val_split": (lambda: _SPLIT_RE.match(self.val_split) is not None, "a folder name"),
            "return_stages": (lambda: self.return_stages is None or (
                bool(self.return_stages) and len(set(self.return_stages)) == len(self.return_stages)),
                "null or a non-empty list of distinct stage names"),
            "trainable_layers": (lambda: self.trainable_layers is None or self.trainable_layers >= 0, ">= 0 or null"),
            "fpn_channels": (lambda: 1 <= self.fpn_channels <= 4096, "in [1, 4096]"),
            "representation_size": (lambda: 1 <= self.representation_size <= 65536, "in [1, 65536]"),
            "anchor_sizes": (lambda: self.anchor_sizes is None or (
                bool(self.anchor_sizes) and all(a >= 1 for a in self.anchor_sizes)), "null or sizes >= 1"),
            "min_size": (lambda: positive(self.min_size), ">= 1 or null"),
            "max_size": (lambda: positive(self.max_size) and (
                self.max_size is None or self.min_size is None or self.max_size >= self.min_size),
                ">= 1 and >= min_size, or null"),
            "rpn_proposals": (lambda: len(self.rpn_proposals) == 2 and all(n >= 1 for n in self.rpn_proposals),
                              "two counts >= 1: [train, test]"),
            "detections_per_img": (lambda: self.detections_per_img >= 1, ">= 1"),
            "box_batch_size": (lambda: self.box_batch_size >= 1, ">= 1"),
            "hflip": (lambda: 0 <= self.hflip <= 1, "a probability in [0, 1]"),
        }
        needs = {"max_size": {"min_size"}}
        problems = [f"{name}={getattr(self, name)!r} (must be {want})" for name, (ok, want) in checks.items()
                    if name not in skip and not (needs.get(name, set()) & skip) and not ok()]
        if {"task", "dataset"} & skip or self.task not in _TASKS:
            return problems
        if self.task == "detection" and self.dataset != "coco":
            problems.append(f"dataset={self.dataset!r} with task='detection' (detection reads COCO-format data: "
                            "dataset: coco)")
        if self.task == "classification" and self.dataset == "coco":
            problems.append("dataset='coco' with task='classification' (COCO-format data is for task: detection)")
        chans = self.model_kwargs.get("in_chans", 3) if "model_kwargs" not in skip else 3
        if self.task == "detection" and chans not in (1, 3):
            problems.append(f"model_kwargs.in_chans={chans!r} with task='detection' (images are read as 1 or 3 channels)")
        if self.task == "detection" and "label_smoothing" not in skip and self.label_smoothing:
            problems.append(f"label_smoothing={self.label_smoothing!r} with task='detection' (classification only)")
        if self.task == "detection" and self.return_stages and not ({"return_stages", "model", "model_kwargs"} & skip):
            names = _stage_names(self.model, self.mode, self.model_kwargs)
            if names is not None and not set(self.return_stages) <= set(names):
                problems.append(f"return_stages={self.return_stages!r} (must be stages of {self.model}: "
                                f"{', '.join(names)})")
        return problems

    def differences(self, saved: dict[str, Any]) -> list[str]:
        """Fields outside :data:`RESUME_MAY_CHANGE` whose value differs from ``saved``
        (a run's :meth:`to_dict`), as ``"name: saved -> now"``. A field the saved run
        lacks (saved by an older sact) counts as its default value."""
        now, defaults = self.to_dict(), self.defaults()
        saved = {k: saved.get(k, defaults[k]) for k in now}
        return [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in now if k not in RESUME_MAY_CHANGE and saved[k] != now[k]]

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every field's default value (what a key left out of the YAML and the flags takes)."""
        return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory() for f in fields(cls)}

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON/YAML friendly)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Builds a config from a (partial) dict.

        Raises:
            ConfigError: not a mapping, unknown keys (listed) or invalid values.
        """
        if not isinstance(d, dict):
            raise ConfigError(f"a config must be a mapping of config keys, got {type(d).__name__}")
        return cls()._replaced(d)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied.

        Raises:
            ConfigError: unknown keys (listed) or invalid values.
        """
        return self._replaced(changes)

    def _replaced(self, changes: dict[Any, Any]) -> TrainConfig:
        known = {f.name for f in fields(self)}
        unknown = sorted(str(k) for k in changes if k not in known)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; known: {sorted(known)}")
        return dataclasses.replace(self, **changes)


def _stage_names(model: str, mode: str, kwargs: dict[str, Any]) -> list[str] | None:
    """The stage names of a registered model (built on the meta device), or None if it cannot be built."""
    import torch

    from ..models import create_model

    try:
        with torch.device("meta"):
            return list(create_model(model, mode=mode if mode in _MODES else "sact", **kwargs).stage_names)
    except (ValueError, TypeError, RuntimeError):
        return None  # reported by the model checks


def yaml_load(text: str) -> Any:
    """``yaml.safe_load`` that also reads ``1e-3`` / ``5e4`` as floats (YAML 1.2 numbers)
    and refuses a document larger than :data:`MAX_CONFIG_NODES` values once expanded.

    Raises:
        ConfigError: text that is not valid YAML, nested too deeply, or too large expanded.
    """
    import yaml

    try:
        return yaml.load(text, Loader=_loader())  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        raise ConfigError(f"not valid YAML: {' '.join(str(e).split())}") from e
    except RecursionError as e:
        raise ConfigError("not a usable config: YAML nested too deeply") from e


@functools.cache
def _loader() -> type:
    """The ``yaml.SafeLoader`` of :func:`yaml_load` (built on first use: yaml is imported lazily)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def compose_document(self):  # the node graph: aliases are shared nodes, not copies yet
            node = super().compose_document()
            if expanded_size(node, MAX_CONFIG_NODES) > MAX_CONFIG_NODES:
                raise ConfigError(f"not a usable config: the YAML expands to more than {MAX_CONFIG_NODES} values once "
                                  "its aliases (*name) are resolved")
            return node

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML_FLOAT, list("-+0123456789."))
    return Loader


def expanded_size(root: Any, cap: int) -> int:
    """Values in the YAML node graph ``root`` with every alias expanded, counted up to ``cap + 1``.

    A scalar counts 1 + one per 100 characters; a mapping or sequence 1 + its children.
    An alias is the same node object as its anchor, so each distinct node is visited once
    (memoised, iterative: the walk is as long as the text, whatever the expansion); a node
    that contains itself (``&a [*a]``) expands without end and counts ``cap + 1``.
    """
    import yaml

    def children(node) -> list:
        if isinstance(node, yaml.MappingNode):
            return [n for pair in node.value for n in pair]
        return list(node.value) if isinstance(node, yaml.SequenceNode) else []

    size: dict[int, int] = {}  # id(node) -> expanded size (at most cap + 1)
    open_nodes: set[int] = set()  # entered, children not all counted: the path from the root
    stack = [(root, False)]
    while stack:
        node, finish = stack.pop()
        if finish:
            own = 1 + len(node.value) // 100 if isinstance(node, yaml.ScalarNode) else 1
            size[id(node)] = min(cap + 1, own + sum(size[id(c)] for c in children(node)))
            open_nodes.discard(id(node))
        elif id(node) in open_nodes:
            return cap + 1  # an alias to an enclosing node: a cycle
        elif id(node) not in size:
            open_nodes.add(id(node))
            stack.append((node, True))
            stack.extend((c, False) for c in children(node))
    return size[id(root)]


_YAML_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["lr=0.05", "model_kwargs={base_channels: 8}"]`` -> dict (values parsed as YAML).

    Raises:
        ConfigError: an item without ``=`` or with a value that is not YAML.
    """
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override must look like key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip().replace("-", "_")] = yaml_load(value)
    return out


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None, *,
                base: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then ``base`` (a command's own defaults), then the YAML file ``path``, then ``overrides`` (flags).

    Raises:
        ConfigError: the file is missing or not YAML, not a mapping, or has unknown
            keys / invalid values (all listed).
    """
    values: dict[str, Any] = dict(base or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {path} is {path.stat().st_size} bytes, more than a config holds "
                              f"(at most {MAX_CONFIG_BYTES})")
        try:
            loaded = yaml_load(path.read_text()) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {path} is not text: {e}") from e
        except ConfigError as e:
            raise ConfigError(f"config file {path}: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of config keys, got {type(loaded).__name__}")
        values.update(loaded)
    values.update(overrides or {})
    return TrainConfig.from_dict(values)
