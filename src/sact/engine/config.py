"""The training configuration: one dataclass, overridable from a YAML file and flags.

Precedence: dataclass defaults < YAML file < command-line flags. The resolved config
is saved (``to_dict``) with every checkpoint, so a run can be reproduced from its
weights file alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["TrainConfig", "load_config", "parse_overrides"]

_DATASETS = ("cluttered", "cifar10", "imagenet")
_SCHEDULES = ("piecewise", "staircase", "cosine", "constant")
_AMP = ("auto", "none", "bf16", "fp16")
_MODES = ("vanilla", "act", "sact")


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
        dataset: ``"cluttered"`` (Cluttered Fashion-MNIST), ``"cifar10"`` or ``"imagenet"``.
        data_dir: dataset folder (Fashion-MNIST files, ``cifar-10-batches-py``'s parent,
            or an ImageNet root with ``train/`` and ``val/``).
        download: let torchvision download Fashion-MNIST if it is not found.
        train_samples: cluttered only, training canvases (drawn from a seed).
        eval_samples: cluttered only, evaluation canvases.
        data_seed: cluttered only, seed of the canvases (test canvases use ``data_seed + 1``).
        clutter: cluttered only, :class:`sact.data.ClutterConfig` fields.
        image_size: ImageNet input side.
        label_offset: ImageNet: added to the folder labels (1 for the reference's 1001-class models,
            whose index 0 is background).
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
        out_dir: run folder (checkpoints, training state, logs, metrics).
        resume: continue from ``out_dir/train_state.pt`` if it exists.
        checkpoint_every: also save every N steps (0: only at epoch ends and the end).
        eval_every: evaluate every N steps (0: only at the end).
        log_every: TensorBoard scalar period in steps.
        image_every: TensorBoard ponder-map image period in steps (0: never).
        tensorboard: write TensorBoard logs to ``out_dir/tb``.
        progress: show tqdm progress bars.
        amp: ``"auto"`` (CUDA: bf16 if supported else fp16; CPU: off), ``"none"``,
            ``"bf16"`` (autocast; CPU too) or ``"fp16"`` (CUDA only, with GradScaler).
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        threads: torch intra-op threads (0: torch's default).
        seed: seed of weights, data order and augmentation.
    """

    model: str = "resnet32_cifar"
    mode: str = "sact"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    tau: float = 0.01
    dataset: str = "cluttered"
    data_dir: str | None = None
    download: bool = False
    train_samples: int = 50000
    eval_samples: int = 10000
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
    checkpoint_every: int = 0
    eval_every: int = 0
    log_every: int = 50
    image_every: int = 1000
    tensorboard: bool = True
    progress: bool = True
    amp: str = "auto"
    device: str = "auto"
    threads: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> TrainConfig:
        """Checks every field; returns ``self``.

        Raises:
            ValueError: naming the field and the value passed.
        """
        checks = {
            "mode": self.mode in _MODES,
            "tau": self.tau >= 0,
            "dataset": self.dataset in _DATASETS,
            "train_samples": self.train_samples >= 1,
            "eval_samples": self.eval_samples >= 1,
            "batch_size": self.batch_size >= 1,
            "eval_batch_size": self.eval_batch_size >= 1,
            "workers": self.workers >= 0,
            "steps": self.steps >= 0,
            "epochs": self.epochs >= 0 and (self.steps > 0 or self.epochs > 0),
            "lr": self.lr > 0,
            "momentum": 0 <= self.momentum < 1,
            "weight_decay": self.weight_decay >= 0,
            "halting_lr_mult": self.halting_lr_mult > 0,
            "label_smoothing": 0 <= self.label_smoothing < 1,
            "schedule": self.schedule in _SCHEDULES,
            "boundaries": all(0 < b < 1 for b in self.boundaries) and list(self.boundaries) == sorted(self.boundaries),
            "decay_rate": 0 < self.decay_rate <= 1,
            "decay_epochs": self.decay_epochs > 0,
            "warmup_steps": self.warmup_steps >= 0,
            "amp": self.amp in _AMP,
            "threads": self.threads >= 0,
            "log_every": self.log_every >= 1,
            "image_every": self.image_every >= 0,
            "checkpoint_every": self.checkpoint_every >= 0,
            "eval_every": self.eval_every >= 0,
            "model_kwargs": isinstance(self.model_kwargs, dict),
            "clutter": isinstance(self.clutter, dict),
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"invalid config value {name}={getattr(self, name)!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON/YAML friendly)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Builds a config from a (partial) dict.

        Raises:
            ValueError: unknown keys (listed) or invalid values.
        """
        return cls().replace(**d)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied (unknown keys raise ``ValueError``)."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known: {sorted(known)}")
        return dataclasses.replace(self, **changes)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["lr=0.05", "model_kwargs={base_channels: 8}"]`` -> dict (values parsed as YAML).

    Raises:
        ValueError: an item without ``=``.
    """
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"override must look like key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the YAML file ``path``, then ``overrides`` (flags).

    Raises:
        ValueError: the YAML is not a mapping, or has unknown keys / invalid values.
        FileNotFoundError: ``path`` does not exist.
    """
    import yaml

    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} not found")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping of config keys, got {type(loaded).__name__}")
        values.update(loaded)
    values.update(overrides or {})
    return TrainConfig.from_dict(values)
