"""The datasets of a classification run (:class:`~sact.engine.config.TrainConfig`'s ``dataset``):
Cluttered Fashion-MNIST, CIFAR-10, ImageNet and image-folder class folders, with their
preprocessing; batching and data order are the engine's (:mod:`sact.engine.datasets`)."""

from __future__ import annotations

import warnings

import torch
from torch.utils.data import Dataset

from ..engine.datasets import DataSpec, collate
from ..errors import InputError

__all__ = ["build_datasets", "folder_preprocess", "spec_from_sets", "default_preprocess", "DEFAULT_CLUTTERED_EVAL"]


#: Cluttered Fashion-MNIST test canvases evaluated when ``eval_samples`` is null: the
#: standard error of a top-1 near 70% is about 1 point, and a 3-step run spends seconds,
#: not the better part of a minute, on its final evaluation.
DEFAULT_CLUTTERED_EVAL = 2000
_FOLDERS = ("imagenet", "folder")


def build_datasets(config, *, train: bool = True, eval_preprocess: dict | None = None) -> DataSpec:
    """Builds the training (if ``train``) and evaluation sets named by ``config.dataset``.

    * ``cluttered``: :class:`sact.data.ClutteredFashionMNIST`, train canvases from
      ``data_seed``, evaluation canvases from the test split with ``data_seed + 1``;
    * ``cifar10``: :class:`sact.data.CIFAR10` with the reference augmentation;
    * ``imagenet``: ``train/`` and ``val/`` class folders; ``folder``: the same, or one
      tree split by ``val_fraction`` (:func:`sact.data.folder.class_folder_splits`). Any
      image type Pillow reads; preprocessing from :func:`folder_preprocess`.

    ``eval_samples`` limits the evaluation set (cluttered default
    :data:`DEFAULT_CLUTTERED_EVAL` canvases; other datasets a subset fixed by ``data_seed``).

    Args:
        config: the run's :class:`~sact.engine.config.TrainConfig`.
        train: also build the training set.
        eval_preprocess: image folders: the evaluation preprocessing to use (a checkpoint's
            ``meta["preprocess"]``, so ``sact eval`` sees what training saw) instead of
            choosing it from ``config``.

    Raises:
        InputError: a missing data folder, a folder layout that does not fit, or a
            preprocessing that does not fit the data (the message says what to pass).
    """
    from .. import data as D

    if config.dataset == "cluttered":
        clutter = D.ClutterConfig(**config.clutter)
        common = dict(config=clutter, data_dir=config.data_dir)
        if config.download:
            D.find_fashion_mnist(config.data_dir, download=True)
        n_eval = config.eval_samples or DEFAULT_CLUTTERED_EVAL
        tr = D.ClutteredFashionMNIST(split="train", num_samples=config.train_samples, seed=config.data_seed, **common) if train else None
        ev = D.ClutteredFashionMNIST(split="test", num_samples=n_eval, seed=config.data_seed + 1, **common)
        size = clutter.canvas_size
        spec = DataSpec(tr, ev, list(D.FASHION_MNIST_CLASSES), 1, D.cluttered_preprocess(size).to_dict(),
                        input_size=(1, size, size), preprocess_reason="the dataset's ([0, 1] greyscale)")
    elif config.dataset == "cifar10":
        if config.data_dir is None:
            raise InputError("dataset cifar10 needs a data folder (--data-dir: the folder holding cifar-10-batches-py)")
        tr = D.CIFAR10(config.data_dir, train=True, transform=D.cifar_train_transform()) if train else None
        full = D.CIFAR10(config.data_dir, train=False, transform=D.cifar_eval_transform())
        ev = _subset(full, config)
        spec = DataSpec(tr, ev, list(full.classes), 3, D.cifar_preprocess().to_dict(), input_size=(3, 32, 32),
                        preprocess_reason="the dataset's (per-image standardisation)")
    else:
        spec = _folder_datasets(config, train=train, eval_preprocess=eval_preprocess)
    if config.dataset not in _FOLDERS and train:
        _warn_if_init_differs(config, spec.preprocess)
    spec.num_classes = _num_classes(config, len(spec.classes), config.label_offset if config.dataset in _FOLDERS else 0)
    return spec


def _num_classes(config, classes: int, offset: int = 0) -> int:
    """Classifier outputs: ``config.num_classes`` (or ``model_kwargs``), else ``classes + offset``.

    Raises:
        InputError: a given number too small for the labels.
    """
    needed = classes + offset
    given = config.num_classes or config.model_kwargs.get("num_classes")
    if given is not None and given < needed:
        offset = f" with label_offset {offset}" if offset else ""
        raise InputError(f"num_classes={given} is too small for the {classes} classes of the data{offset} "
                         f"(labels go up to {needed - 1}); pass --num-classes {needed} or more")
    return given or needed


def _subset(dataset: Dataset, config) -> Dataset:
    """The first ``eval_samples`` of a permutation fixed by ``data_seed`` (all if null or larger), in order."""
    n = config.eval_samples
    if n is None or n >= len(dataset):
        return dataset
    keep = sorted(torch.randperm(len(dataset), generator=torch.Generator().manual_seed(config.data_seed))[:n].tolist())
    subset = torch.utils.data.Subset(dataset, keep)
    subset.classes = getattr(dataset, "classes", None)
    return subset


def folder_preprocess(config, *, in_chans: int = 3):
    """The evaluation :class:`sact.data.Preprocess` of an image-folder run, and why it was chosen.

    ``config.preprocess``: ``"auto"`` matches the initial weights (``init``): a torchvision
    file (``.pth``, ``.pt``...) -> :func:`sact.data.torchvision_preprocess`; an sact
    checkpoint -> its stored preprocessing (a converted reference checkpoint: Inception
    [-1, 1]) at ``config.image_size``; no ``init`` -> the dataset's default, Inception
    [-1, 1] (:func:`sact.data.imagenet_preprocess`, the reference's). ``"dataset"`` /
    ``"inception"`` / ``"torchvision"`` choose directly.

    Returns:
        ``(Preprocess, reason)``.

    Raises:
        InputError: torchvision's mean/std with ``in_chans`` 1, or an ``init`` checkpoint
            whose preprocessing cannot be used.
    """
    import dataclasses

    from .. import data as D
    from ..engine.warm_start import is_state_dict_file

    choice, size = config.preprocess, config.image_size
    reason = f"preprocess={choice}"
    if choice == "auto":
        if config.init is None:
            choice, reason = "dataset", "no initial weights: the dataset's default"
        elif is_state_dict_file(config.init):
            choice, reason = "torchvision", f"torchvision weights ({config.init}) expect torchvision's mean/std"
        else:
            stored = _stored_preprocess(config.init)
            if stored is None:
                choice, reason = "dataset", f"{config.init} stores no preprocessing: the dataset's default"
            else:
                if stored.in_chans != in_chans and stored.kind == "normalize":
                    raise InputError(f"the initial weights {config.init} were trained on {stored.in_chans}-channel "
                                     f"input with mean/std; this run has {in_chans} channels: pass --preprocess")
                pre = dataclasses.replace(stored, in_chans=in_chans, image_size=size,
                                          central_crop=stored.central_crop or 0.875)
                return pre, f"the preprocessing stored in {config.init} ({_describe(stored)})"
    if choice in ("dataset", "inception"):
        return dataclasses.replace(D.imagenet_preprocess(size), in_chans=in_chans), reason
    if in_chans != 3:
        raise InputError("preprocess torchvision (ImageNet mean/std) needs 3 input channels; this run has "
                         f"{in_chans}: pass --preprocess inception, or model_kwargs in_chans 3")
    return D.torchvision_preprocess(size), reason


def _describe(pre) -> str:
    return {"inception": "Inception [-1, 1]", "normalize": f"mean/std {pre.mean}/{pre.std}",
            "unit": "[0, 1]", "standardize": "per-image standardisation"}[pre.kind]


def _stored_preprocess(init: str):
    """The ``Preprocess`` stored in the sact checkpoint ``init`` (header only), or None."""
    from ..models.loading import read_checkpoint_meta
    from ..io.checkpoint import CheckpointError
    from ..data import Preprocess

    meta = read_checkpoint_meta(init).get("meta") or {}
    if meta.get("preprocess") is None:
        return None
    try:
        return Preprocess.from_dict(meta["preprocess"])
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{init}: its stored preprocessing is malformed: {e}") from e


def _warn_if_init_differs(config, preprocess: dict) -> None:
    """cluttered / cifar10 keep their own preprocessing; say so when the initial weights were trained otherwise."""
    from ..io.checkpoint import CheckpointError
    from ..engine.warm_start import is_state_dict_file

    if config.init is None or is_state_dict_file(config.init):
        return
    try:
        stored = _stored_preprocess(config.init)
    except (CheckpointError, OSError):
        return  # warm_start reports what is wrong with the file
    if stored is not None and stored.kind != preprocess["kind"]:
        warnings.warn(f"the initial weights {config.init} were trained with {_describe(stored)} input; dataset "
                      f"{config.dataset} keeps its own preprocessing ({preprocess['kind']})", stacklevel=3)


def _folder_datasets(config, *, train: bool, eval_preprocess: dict | None) -> DataSpec:
    from .. import data as D
    from ..data.folder import ImageFolderDataset, class_folder_splits

    if config.data_dir is None:
        layout = "train/ and val/" if config.dataset == "imagenet" else "class folders (train/ and val/, or one tree)"
        raise InputError(f"dataset {config.dataset} needs a data folder (--data-dir: the folder holding {layout})")
    in_chans = config.model_kwargs.get("in_chans", 3)
    if in_chans not in (1, 3):
        raise InputError(f"image folders give 1 or 3 channels; model_kwargs in_chans={in_chans!r}")
    classes, train_samples, val_samples = class_folder_splits(
        config.data_dir, val_fraction=config.val_fraction, seed=config.data_seed,
        require_split_folders=config.dataset == "imagenet", need_train=train)
    if eval_preprocess is not None:
        try:
            pre, reason = D.Preprocess.from_dict(eval_preprocess), "the checkpoint's"
        except (ValueError, TypeError) as e:
            raise InputError(f"the stored preprocessing {eval_preprocess!r} is malformed: {e}") from e
    else:
        pre, reason = folder_preprocess(config, in_chans=in_chans)
    opts = dict(label_offset=config.label_offset, strict=config.strict_data, max_pixels=config.max_pixels)
    augment = D.imagenet_train_transform(pre.image_size, preprocess=pre)
    tr = ImageFolderDataset(train_samples, classes, transform=augment, **opts) if train else None
    ev = _subset(ImageFolderDataset(val_samples, classes, transform=pre, **opts), config)
    size = pre.image_size or config.image_size
    return DataSpec(tr, ev, classes, pre.in_chans, pre.to_dict(), input_size=(pre.in_chans, size, size),
                    preprocess_reason=reason)


def default_preprocess(config) -> dict:
    """The evaluation preprocessing of ``config.dataset`` (``Preprocess.to_dict()``), without
    looking at ``init`` (image folders: Inception [-1, 1] at ``image_size``)."""
    from .. import data as D

    if config.dataset == "cluttered":
        return D.cluttered_preprocess(D.ClutterConfig(**config.clutter).canvas_size).to_dict()
    if config.dataset == "cifar10":
        return D.cifar_preprocess().to_dict()
    return D.imagenet_preprocess(config.image_size).to_dict()


def spec_from_sets(train: Dataset, eval: Dataset, config) -> DataSpec:
    """A :class:`DataSpec` for datasets passed in directly.

    Class names come from ``eval.classes`` (else ``model_kwargs["num_classes"]`` numbered
    names), input channels and size from the first evaluation image, preprocessing from
    ``eval.preprocess`` (a ``Preprocess`` or its dict) else the default of ``config.dataset``.
    """
    classes = getattr(eval, "classes", None)
    if classes is None:
        k = config.num_classes or config.model_kwargs.get("num_classes")
        if k is None:
            raise ValueError("datasets without a .classes attribute need num_classes (or model_kwargs['num_classes'])")
        classes = [str(i) for i in range(k)]
    first = collate([eval[0]])[0]
    pre = getattr(eval, "preprocess", None)
    pre = pre.to_dict() if hasattr(pre, "to_dict") else (pre or default_preprocess(config))
    spec = DataSpec(train, eval, list(classes), int(first.shape[1]), pre,
                    input_size=tuple(int(d) for d in first.shape[1:]), preprocess_reason="the datasets'")
    spec.num_classes = _num_classes(config, len(classes))
    return spec
