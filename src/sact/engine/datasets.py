"""What the loop needs of any task's data: the :class:`DataSpec` of a run, batching and data order
(the datasets themselves are the task's: :mod:`sact.classification.data`, :mod:`sact.detection.coco`).

All datasets are turned into ``(images [B, C, H, W], labels [B])`` batches by
:func:`collate`, whatever their items look like (Cluttered Fashion-MNIST dicts,
``(image, label)`` tuples); ``None`` items (unreadable images a folder dataset skipped,
with a warning naming each) are left out and counted in :attr:`Batch.skipped`. The training order comes from a ``DistributedSampler``
(also with one process) seeded with ``config.seed`` and the epoch, so an epoch's
order is reproducible and a resumed run can skip exactly the batches already seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler


__all__ = ["Batch", "DataSpec", "collate", "SkipSampler", "train_loader", "eval_loader", "steps_per_epoch"]


@dataclass
class DataSpec:
    """The datasets of a run and what the model and checkpoint need to know about them."""

    train: Dataset | None
    eval: Dataset
    classes: list[str]
    in_chans: int
    preprocess: dict  # sact.data.Preprocess.to_dict() of the evaluation input
    num_classes: int = 0  # classifier outputs (0: len(classes))
    input_size: tuple[int, int, int] | None = None  # (C, H, W) the model is trained at
    preprocess_reason: str = ""  # why this preprocessing (auto: from the initial weights)

    def __post_init__(self) -> None:
        self.num_classes = self.num_classes or len(self.classes)


class Batch(tuple):
    """``(images [B, C, H, W], labels [B])`` with :attr:`skipped`: items left out
    because they were unreadable (``None``). ``B`` may be 0 when all were."""

    skipped: int

    def __new__(cls, images: torch.Tensor, labels: torch.Tensor, skipped: int = 0) -> Batch:
        self = super().__new__(cls, (images, labels))
        self.skipped = skipped
        return self

    def __reduce__(self):  # DataLoader workers pickle batches to the main process
        return (Batch, (self[0], self[1], self.skipped))


def collate(items: Sequence[Any]) -> Batch:
    """Items (dicts with ``image``/``label`` or ``(image, label)`` pairs, or ``None`` for an
    unreadable image) -> ``Batch(images, labels, skipped)``."""
    kept = [it for it in items if it is not None]
    skipped = len(items) - len(kept)
    if not kept:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.int64), skipped)
    if isinstance(kept[0], dict):
        images = [it["image"] for it in kept]
        labels = [int(it["label"]) for it in kept]
    else:
        images = [it[0] for it in kept]
        labels = [int(it[1]) for it in kept]
    return Batch(torch.stack(images), torch.tensor(labels, dtype=torch.int64), skipped)


class SkipSampler(Sampler[int]):
    """A seeded ``DistributedSampler`` epoch with its first ``skip`` indices dropped.

    Args:
        sampler: the epoch's sampler (``set_epoch`` already called).
        skip: indices to drop (``batches already trained * batch_size`` on resume).
    """

    def __init__(self, sampler: DistributedSampler, skip: int = 0) -> None:
        self.indices = list(sampler)[skip:]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def train_loader(dataset: Dataset, config, *, rank: int, world_size: int, epoch: int, skip_batches: int = 0,
                 collate_fn=None) -> DataLoader:
    """One epoch of full training batches for this rank, in the seeded order.

    ``skip_batches`` leaves out the batches a resumed run already trained on;
    ``collate_fn`` replaces :func:`collate` (detection batches are lists).
    """
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=config.seed, drop_last=True)
    sampler.set_epoch(epoch)
    return DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=SkipSampler(sampler, skip_batches * config.batch_size),
        drop_last=True,
        num_workers=config.workers,
        collate_fn=collate_fn or collate,
        # worker seeds come from this generator, not the global RNG, so creating the
        # loader on resume does not shift the augmentation random stream
        generator=torch.Generator().manual_seed(config.seed * 100003 + epoch),
    )


def steps_per_epoch(dataset: Dataset, config, world_size: int) -> int:
    """Full batches per epoch and rank.

    Raises:
        ValueError: the dataset holds less than one batch per rank.
    """
    per_rank = len(DistributedSampler(dataset, num_replicas=world_size, rank=0, shuffle=False, drop_last=True))
    if per_rank < config.batch_size:
        raise ValueError(
            f"batch_size={config.batch_size} is larger than the {per_rank} training images per process "
            f"({len(dataset)} images, {world_size} processes)"
        )
    return per_rank // config.batch_size


def eval_loader(dataset: Dataset, batch_size: int, *, rank: int = 0, world_size: int = 1, workers: int = 0,
                collate_fn=None) -> DataLoader:
    """This rank's share ``rank::world_size`` of the evaluation set, in order (no padding,
    so every image is counted exactly once over the ranks); ``collate_fn`` replaces :func:`collate`."""
    indices = list(range(rank, len(dataset), world_size))
    return DataLoader(
        torch.utils.data.Subset(dataset, indices), batch_size=batch_size, shuffle=False, num_workers=workers,
        collate_fn=collate_fn or collate,
    )
