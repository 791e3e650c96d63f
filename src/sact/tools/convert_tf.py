"""Convert the reference's TensorFlow checkpoints (``mfigurnov/sact``) into sact checkpoints.

Supported layouts (variable scopes of the reference code, spec section 5.2):

* ImageNet ``imagenet_model.py`` -> :class:`~sact.models.ResNetV2` (``resnet50_v2``,
  ``resnet101_v2``, ``resnet152_v2``); top scope ``resnet_v2`` (the reference passes no
  scope, so TF-Slim's default name is used), e.g.
  ``resnet_v2/block1/unit_1/bottleneck_v2/conv1/BatchNorm/gamma``;
* CIFAR ``cifar_model.py`` -> :class:`~sact.models.CifarResNet` (``resnet*_cifar``); top
  scope ``resnet_residual``, e.g. ``resnet_residual/block_2/unit_1/residual/conv1/weights``.

Tensors are transposed from TF's layouts (conv ``HWIO`` -> ``OIHW``; the logits 1x1
conv ``[1, 1, C, K]`` -> linear ``[K, C]``); BN ``gamma/beta/moving_mean/moving_variance``
become ``weight/bias/running_mean/running_var``. Optimizer slots (``.../Momentum``),
moving-average shadows (``.../ExponentialMovingAverage``) and ``global_step`` are ignored;
any other variable the model does not have, any variable it lacks and any shape mismatch
is refused with :class:`TFCheckpointMismatch`, which lists them all.

TensorFlow is needed only to *read* the checkpoint (``pip install tensorflow-cpu``);
:func:`tf_name_map` and :func:`convert_arrays` work on plain numpy dicts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from ..models import create_model
from ..models.cifar import CifarResNet
from ..models.resnet_v2 import ResNetV2

__all__ = [
    "convert_to_folder",
    "TFCheckpointMismatch",
    "tf_name_map",
    "read_tf_checkpoint",
    "convert_arrays",
    "convert_tf_checkpoint",
    "default_scope",
    "IGNORED_SUFFIXES",
    "import_tensorflow",
]

#: last name components of variables that are not model weights (optimizer / EMA state).
IGNORED_SUFFIXES = ("Momentum", "ExponentialMovingAverage", "RMSProp", "RMSProp_1", "Adam", "Adam_1")
_IGNORED_NAMES = ("global_step",)

# (our suffix, TF suffix) for a batch norm with scale=True, center=True.
_BN = (("weight", "gamma"), ("bias", "beta"), ("running_mean", "moving_mean"), ("running_var", "moving_variance"))


class TFCheckpointMismatch(InputError):
    """The TF checkpoint does not fit the model; ``missing`` / ``unexpected`` / ``wrong_shape`` list why."""

    def __init__(self, missing: list[str], unexpected: list[str], wrong_shape: list[str], *, context: str = "") -> None:
        self.missing, self.unexpected, self.wrong_shape = missing, unexpected, wrong_shape
        parts = [f"the TensorFlow checkpoint does not fit {context or 'the model'}:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if items:
                shown = "\n    ".join(items[:20])
                more = f"\n    ... and {len(items) - 20} more" if len(items) > 20 else ""
                parts.append(f"  {title} ({len(items)}):\n    {shown}{more}")
        super().__init__("\n".join(parts))


# A map entry: our state-dict key -> (TF variable name, transform numpy TF array -> our layout).
Transform = Callable[[np.ndarray], np.ndarray]


def _conv_w(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.transpose(3, 2, 0, 1))  # HWIO -> OIHW


def _dense_w(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.reshape(a.shape[-2], a.shape[-1]).T)  # [1, 1, C, K] -> [K, C]


def _same(a: np.ndarray) -> np.ndarray:
    return a


def _inverse_shape(key: str, shape: tuple[int, ...], fn: Transform) -> tuple[int, ...]:
    """The TF shape that ``fn`` maps onto our ``shape``."""
    if fn is _conv_w:
        o, i, h, w = shape
        return (h, w, i, o)
    if fn is _dense_w:
        k, c = shape
        return (1, 1, c, k)
    return tuple(shape)


class _Map:
    def __init__(self) -> None:
        self.entries: dict[str, tuple[str, Transform]] = {}

    def conv(self, ours: str, tf: str, module: nn.Conv2d) -> None:
        self.entries[f"{ours}.weight"] = (f"{tf}/weights", _conv_w)
        if module.bias is not None:
            self.entries[f"{ours}.bias"] = (f"{tf}/biases", _same)

    def bn(self, ours: str, tf: str) -> None:
        for a, b in _BN:
            self.entries[f"{ours}.{a}"] = (f"{tf}/{b}", _same)

    def dense(self, ours: str, tf: str) -> None:
        self.entries[f"{ours}.weight"] = (f"{tf}/weights", _dense_w)
        self.entries[f"{ours}.bias"] = (f"{tf}/biases", _same)

    def halting(self, ours: str, tf: str, branch: nn.Module) -> None:
        if hasattr(branch, "local_conv"):
            self.bn(f"{ours}.local_bn", f"{tf}/local_bn")
            self.conv(f"{ours}.local_conv", f"{tf}/local_conv", branch.local_conv)
        self.bn(f"{ours}.global_bn", f"{tf}/global_bn")
        self.conv(f"{ours}.global_conv", f"{tf}/global_conv", branch.global_conv)


def default_scope(model: nn.Module) -> str:
    """The reference's top-level variable scope for ``model``'s family."""
    if isinstance(model, ResNetV2):
        return "resnet_v2"
    if isinstance(model, CifarResNet):
        return "resnet_residual"
    raise ValueError(
        f"convert-tf supports the reference layouts (resnet*_v2, resnet*_cifar), got {type(model).__name__}; "
        "the torchvision-style resnet50/101/152 have no TF counterpart"
    )


def tf_name_map(model: nn.Module, *, scope: str | None = None) -> dict[str, tuple[str, Transform]]:
    """Our state-dict key -> (reference TF variable name, numpy transform), for every parameter
    and BN statistic of ``model`` (``num_batches_tracked`` has no TF counterpart).

    Args:
        model: a :class:`ResNetV2` or :class:`CifarResNet` in any mode.
        scope: top-level TF scope (default: :func:`default_scope`).
    """
    scope = scope or default_scope(model)
    m = _Map()
    if isinstance(model, ResNetV2):
        m.conv("conv1", f"{scope}/conv1", model.conv1)
        for i, stage in enumerate(model.stages):
            name = model.stage_names[i]
            for u, unit in enumerate(stage.units):
                tf = f"{scope}/block{i + 1}/unit_{u + 1}"
                ours = f"{name}.{u}"
                b = f"{tf}/bottleneck_v2"
                m.bn(f"{ours}.preact", f"{b}/preact")
                if unit.shortcut is not None:
                    m.conv(f"{ours}.shortcut", f"{b}/shortcut", unit.shortcut)
                for c in ("conv1", "conv2"):
                    m.conv(f"{ours}.{c}", f"{b}/{c}", getattr(unit, c))
                    m.bn(f"{ours}.{c}_bn", f"{b}/{c}/BatchNorm")
                m.conv(f"{ours}.conv3", f"{b}/conv3", unit.conv3)
            for u, branch in enumerate(stage.halting or []):
                m.halting(f"{name}.halting.{u}", f"{scope}/block{i + 1}/unit_{u + 1}/halting_proba", branch)
        m.bn("postnorm", f"{scope}/postnorm")
        m.dense("logits", f"{scope}/logits")
    else:
        default_scope(model)  # raises for unsupported families
        # The reference's stem conv and head BN are created without a scope name, so
        # TF-Slim names them "Conv" and "BatchNorm".
        m.conv("stem", f"{scope}/Conv", model.stem)
        for i, stage in enumerate(model.stages):
            name = model.stage_names[i]
            for u, unit in enumerate(stage.units):
                r = f"{scope}/block_{i + 1}/unit_{u + 1}/residual"
                ours = f"{name}.{u}"
                m.bn(f"{ours}.bn1", f"{r}/preact")
                m.conv(f"{ours}.conv1", f"{r}/conv1", unit.conv1)
                m.bn(f"{ours}.bn2", f"{r}/conv1/BatchNorm")
                m.conv(f"{ours}.conv2", f"{r}/conv2", unit.conv2)
            for u, branch in enumerate(stage.halting or []):
                m.halting(f"{name}.halting.{u}", f"{scope}/block_{i + 1}/unit_{u + 1}/halting_proba", branch)
        m.bn("head_bn", f"{scope}/BatchNorm")
        m.dense("fc", f"{scope}/logits")
    return m.entries


def import_tensorflow():
    """Import TensorFlow safely next to PyTorch.

    TensorFlow 2.21 and triton (loaded by ``torch._dynamo``, ``torch.compile`` and
    ``torchvision.ops``) bundle clashing LLVM symbols: importing triton *after*
    TensorFlow segfaults, importing it *before* works. So triton goes first.
    """
    import importlib.util

    if importlib.util.find_spec("triton") is not None:
        import torch._dynamo  # noqa: F401  (loads triton)
    try:
        import tensorflow as tf
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading TF checkpoints needs TensorFlow: pip install tensorflow-cpu") from e
    return tf


def _ignored(name: str) -> bool:
    return name in _IGNORED_NAMES or name.rsplit("/", 1)[-1] in IGNORED_SUFFIXES


def _resolve_prefix(path: str | Path) -> str:
    """A checkpoint prefix from a prefix, an ``.index`` / ``.data-*`` file or a folder.

    TensorFlow is imported only to read a folder's ``checkpoint`` file, so that a path
    without a checkpoint is reported before TensorFlow's start-up lines.

    Raises:
        FileNotFoundError: no ``PREFIX.index`` there.
    """
    p = Path(path)
    if p.is_dir():
        latest = import_tensorflow().train.latest_checkpoint(str(p)) if (p / "checkpoint").is_file() else None
        if latest is None:
            indexes = sorted(p.glob("*.index"))
            if len(indexes) != 1:
                named = "names no checkpoint that exists" if (p / "checkpoint").is_file() else "is missing"
                raise FileNotFoundError(f"{p}: its 'checkpoint' file {named}, and it holds {len(indexes)} .index files "
                                        "(not 1); pass a checkpoint prefix")
            latest = str(indexes[0].with_suffix(""))
        prefix = latest
    elif str(p).endswith(".index"):
        prefix = str(p)[: -len(".index")]
    elif ".data-" in p.name:
        prefix = str(p.with_name(p.name.split(".data-")[0]))
    else:
        prefix = str(p)
    if not Path(prefix + ".index").exists():
        raise FileNotFoundError(f"no TensorFlow checkpoint at {prefix!r} (expected {prefix}.index)")
    return prefix


def read_tf_checkpoint(path: str | Path) -> tuple[str, dict[str, np.ndarray]]:
    """Read every variable of a TF checkpoint.

    Args:
        path: checkpoint prefix (``model.ckpt-123``), its ``.index`` file, or a folder
            (its latest checkpoint).

    Returns:
        ``(prefix, {name: array})``.

    Raises:
        ImportError: TensorFlow is not installed.
        FileNotFoundError: no checkpoint there.
        InputError: the files are not a readable TF checkpoint (corrupt, truncated, garbage).
    """
    prefix = _resolve_prefix(path)  # before TensorFlow is imported (its start-up lines)
    tf = import_tensorflow()
    try:
        reader = tf.train.load_checkpoint(prefix)
        names = [n for n, _ in tf.train.list_variables(prefix)]
        return prefix, {n: np.asarray(reader.get_tensor(n)) for n in names}
    except Exception as e:  # TF raises its own OpError types for corrupt or foreign files
        raise InputError(f"{prefix} is not a readable TensorFlow checkpoint: {type(e).__name__}: "
                         f"{' '.join(str(e).split())}") from e


def _guess_scope(model: nn.Module, names: Iterable[str]) -> str:
    """The default scope, or the only other top-level scope holding the stem (e.g. ``resnet_v2_101``)."""
    stem = "conv1/weights" if isinstance(model, ResNetV2) else "Conv/weights"
    return _guess_scope_names(default_scope(model), stem, names)


def _guess_scope_names(scope: str, stem: str, names: Iterable[str]) -> str:
    names = set(names)
    if f"{scope}/{stem}" in names:
        return scope
    found = sorted(n[: -len(stem) - 1] for n in names if n.endswith("/" + stem) and n.count("/") == stem.count("/") + 1)
    return found[0] if len(found) == 1 else scope


def convert_arrays(
    arrays: dict[str, np.ndarray],
    model: nn.Module,
    *,
    scope: str | None = None,
    fresh_halting: bool = False,
) -> dict[str, object]:
    """Load TF arrays (``{name: array}``) into ``model`` in place.

    Args:
        arrays: the checkpoint's variables.
        model: target model (:class:`ResNetV2` / :class:`CifarResNet`, any mode).
        scope: top-level TF scope; default: ``resnet_v2`` / ``resnet_residual``, or the
            only top-level scope that holds the stem convolution.
        fresh_halting: halting-branch variables absent from the checkpoint keep their
            fresh initialisation (to fine-tune ACT/SACT from a vanilla checkpoint, as the
            reference's ``finetuning_init_fn`` does).

    Returns:
        ``{"scope", "loaded": int, "ignored": [names], "fresh": [our keys]}``.

    Raises:
        TFCheckpointMismatch: missing, unexpected or mis-shaped variables (all listed).
    """
    scope = scope or _guess_scope(model, arrays)
    mapping = tf_name_map(model, scope=scope)
    own = model.state_dict()
    wanted = {tf: key for key, (tf, _) in mapping.items()}
    ignored = sorted(n for n in arrays if n not in wanted and _ignored(n))
    unexpected = sorted(n for n in arrays if n not in wanted and not _ignored(n))
    missing, fresh, wrong = [], [], []
    for key, (tf, fn) in mapping.items():
        if tf not in arrays:
            if fresh_halting and ".halting." in key:
                fresh.append(key)
            else:
                missing.append(f"{tf} (-> {key}, TF shape {_inverse_shape(key, tuple(own[key].shape), fn)})")
            continue
        expect = _inverse_shape(key, tuple(own[key].shape), fn)
        if tuple(arrays[tf].shape) != expect:
            wrong.append(f"{tf}: checkpoint {tuple(arrays[tf].shape)} vs model {expect} (-> {key})")
    if missing or unexpected or wrong:
        name = getattr(model, "sact_config", {}).get("name", type(model).__name__)
        raise TFCheckpointMismatch(sorted(missing), unexpected, sorted(wrong), context=f"{name} ({model.mode}), scope {scope!r}")
    with torch.no_grad():
        for key, (tf, fn) in mapping.items():
            if tf in arrays:
                own[key].copy_(torch.from_numpy(np.array(fn(arrays[tf]), dtype=np.float32)))
    return {"scope": scope, "loaded": len(mapping) - len(fresh), "ignored": ignored, "fresh": fresh}


def _family(name: str) -> type:
    """The model class a registered name builds, found without building it."""
    import inspect

    from ..models import _REGISTRY

    if name not in _REGISTRY:
        create_model(name)  # raises the registry's "unknown model" error
    params = inspect.signature(_REGISTRY[name]).parameters
    if "stem_width" in params:
        return ResNetV2
    if "base_channels" in params:
        return CifarResNet
    raise ValueError(
        f"convert-tf supports the reference layouts (resnet*_v2, resnet*_cifar), got {name!r}; "
        "the torchvision-style resnet50/101/152 have no TF counterpart"
    )


def _infer_kwargs(arrays: dict[str, np.ndarray], name: str, scope: str | None) -> dict:
    """num_classes, in_chans and width read off the checkpoint (used when not given)."""
    family = _family(name)
    out = {}
    if family is ResNetV2:
        scope = scope or _guess_scope_names("resnet_v2", "conv1/weights", arrays)
        stem, logits = f"{scope}/conv1/weights", f"{scope}/logits/biases"
        first = f"{scope}/block1/unit_1/bottleneck_v2/conv1/weights"
        if first in arrays:
            out["base_width"] = int(arrays[first].shape[-1])
        if stem in arrays:
            out["stem_width"] = int(arrays[stem].shape[-1])
    else:
        scope = scope or _guess_scope_names("resnet_residual", "Conv/weights", arrays)
        stem, logits = f"{scope}/Conv/weights", f"{scope}/logits/biases"
        if stem in arrays:
            out["base_channels"] = int(arrays[stem].shape[-1])
    if stem in arrays:
        out["in_chans"] = int(arrays[stem].shape[2])
    if logits in arrays:
        out["num_classes"] = int(arrays[logits].shape[0])
    return out


def convert_tf_checkpoint(
    path: str | Path,
    *,
    model: str,
    mode: str = "sact",
    out: str | Path | None = None,
    tau: float | None = None,
    scope: str | None = None,
    fresh_halting: bool = False,
    **model_kwargs,
) -> nn.Module:
    """Convert a reference TF checkpoint and optionally save it as an sact checkpoint.

    Args:
        path: TF checkpoint prefix, ``.index`` file or folder.
        model: registered model name (``resnet101_v2``, ``resnet32_cifar``, ...).
        mode: ``"vanilla"``, ``"act"`` or ``"sact"`` -- must be the mode it was trained in.
        out: where to write the sact checkpoint (folder -> ``out/model.*``), or None.
        tau: ponder cost weight it was trained with (stored in the meta).
        scope: top-level TF scope (default: guessed, see :func:`convert_arrays`).
        fresh_halting: allow halting branches missing from the checkpoint.
        **model_kwargs: model options; ``num_classes``, ``in_chans`` and the width are
            read from the checkpoint when not given.

    Returns:
        The converted model (eval mode) with ``checkpoint_meta`` set.

    Raises:
        ValueError: an unknown or unsupported model, a ``tau`` that is not finite and
            >= 0 (both checked before TensorFlow is imported), or a checkpoint that does
            not fit the model.
        FileNotFoundError, InputError: see :func:`read_tf_checkpoint`.
    """
    import math

    from ..data import cifar_preprocess, imagenet_preprocess

    _family(model)  # an unknown or unsupported name fails before TensorFlow is imported
    if tau is not None and (isinstance(tau, bool) or not isinstance(tau, (int, float))
                            or not (math.isfinite(tau) and tau >= 0)):
        raise ValueError(f"tau must be a finite number >= 0, got {tau!r}")
    prefix, arrays = read_tf_checkpoint(path)
    kwargs = {**_infer_kwargs(arrays, model, scope), **model_kwargs}
    net = create_model(model, mode=mode, **kwargs)
    report = convert_arrays(arrays, net, scope=scope, fresh_halting=fresh_halting)
    imagenet = isinstance(net, ResNetV2)
    meta = {
        "source": {
            "format": "tensorflow-checkpoint",
            "prefix": str(prefix),
            "scope": report["scope"],
            "reference": "github.com/mfigurnov/sact",
            "ignored_variables": len(report["ignored"]),
            "fresh_halting": report["fresh"],
        },
        "preprocess": (imagenet_preprocess() if imagenet else cifar_preprocess()).to_dict(),
        # lets `sact eval CKPT --data-dir DIR` pick the right dataset (TrainConfig keys)
        "config": {"model": model, "mode": mode, "model_kwargs": kwargs,
                   "dataset": "imagenet" if imagenet else "cifar10", "image_size": 224 if imagenet else 32},
    }
    if imagenet and kwargs.get("num_classes", 1001) == 1001:
        # TF-Slim ImageNet labels: 0 = background, 1..1000 = synsets sorted by WordNet id
        # (the order of torchvision ImageFolder), so class c of a 1000-class folder is logit c + 1.
        meta["label_offset"] = 1
    if tau is not None:
        meta["tau"] = float(tau)
        meta["config"]["tau"] = float(tau)
    net.checkpoint_meta = meta
    net.eval()
    if out is not None:
        from ..models.loading import save_checkpoint

        Path(out).mkdir(parents=True, exist_ok=True)  # a folder: OUT/model.safetensors + OUT/model.json
        save_checkpoint(net, out, meta=meta)
    return net


def convert_to_folder(checkpoint: str | Path, *, model: str, mode: str, out: str | Path, tau: float | None = None,
                      scope: str | None = None, num_classes: int | None = None, fresh_halting: bool = False,
                      overwrite: bool = False) -> nn.Module:
    """``sact convert-tf``: :func:`convert_tf_checkpoint` into ``out/model.*``, after the checks (no file
    in the way, no checkpoint replaced unless ``overwrite``, the arguments) and before TensorFlow is
    imported; TensorFlow's start-up log lines are silenced (failures are reported by sact)."""
    import logging
    import os

    from ..io.checkpoint import checkpoint_paths
    from ..io.files import prepare_outputs

    names = [p.name for p in checkpoint_paths(Path("model"))]
    with prepare_outputs(out, files=names, overwrite=overwrite, what="--out checkpoint"):
        if num_classes is not None and num_classes < 1:
            raise InputError(f"--num-classes must be >= 1, got {num_classes}")
        # TensorFlow's C++ start-up lines (INFO and the oneDNN notice; converting reads values, it
        # computes nothing with oneDNN)
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
        logging.getLogger("tensorflow").setLevel(logging.CRITICAL)
        kwargs = {} if num_classes is None else {"num_classes": num_classes}
        return convert_tf_checkpoint(checkpoint, model=model, mode=mode, out=out, tau=tau, scope=scope,
                                     fresh_halting=fresh_halting, **kwargs)
