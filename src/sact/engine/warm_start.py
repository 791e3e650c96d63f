"""Warm start ("fine-tuning init"): a plain state dict (torchvision's ResNet weights) or an sact checkpoint.

As the reference's ``finetuning_init_fn``, every tensor of the network is restored
except the halting branches (``*.halting.*``), which keep their fresh initialisation
whenever the source has none or was trained in another mode.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..models.loading import load_checkpoint
from ..io.checkpoint import CheckpointError, file_kind, read_state_dict

__all__ = ["warm_start", "is_state_dict_file"]

_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".tar", ".ckpt")


def is_state_dict_file(path: str | Path) -> bool:
    """True when ``path`` names a plain state dict, not an sact checkpoint: a ``torch.save`` file (by
    its suffix, or its first bytes) or a ``.safetensors`` without an sact header (:func:`sact.checkpoint.file_kind`)."""
    return Path(path).suffix in _TORCH_SUFFIXES or file_kind(path)[0] in ("torch", "safetensors")


def warm_start(model: nn.Module, path: str | Path, *, skip_classifier: bool = False, sum_rgb_stem: bool = False) -> str:
    """Loads the weights of ``path`` into ``model`` (halting branches fresh where needed).

    The one warm start of classification and detection; what detection needs differently
    are the two options (``sact train`` with ``task: detection`` turns both on: the
    detector never runs the classifier, and its images may be greyscale).

    Args:
        model: built with :func:`sact.create_model`.
        path: a plain state dict, e.g. torchvision's ResNet weights (a ``torch.save``
            file read with ``weights_only=True``, or a ``.safetensors`` without an sact
            header; a classifier of another size is always skipped, a 3-channel stem is
            summed for a 1-channel model) or an sact checkpoint (same architecture, any mode).
        skip_classifier: sact checkpoints: skip a classifier (``fc``) of another size
            instead of refusing the file.
        sum_rgb_stem: sact checkpoints: a 3-channel stem loads into a 1-channel model
            by summing its filters over the colour channels.

    Returns:
        A one-line description of what was loaded.

    Raises:
        CheckpointError: unreadable file, or tensors that do not fit the model.
    """
    from ..models import load_torchvision_weights

    path = Path(path)
    if is_state_dict_file(path):
        try:
            load_torchvision_weights(model, read_state_dict(path), strict_head=False)
        except ValueError as e:
            raise CheckpointError(f"{path} does not fit {model.sact_config['name']}: {e}") from e
        return f"state dict {path} (halting branches it lacks fresh)"
    source = load_checkpoint(path)
    src, own = source.state_dict(), model.state_dict()
    same_mode = source.mode == model.mode
    keep = {k: v for k, v in src.items() if same_mode or ".halting." not in k}
    notes = [] if same_mode else ["halting branches fresh"]
    stem = _stem_key(own)
    if sum_rgb_stem and stem in keep and stem in own and keep[stem].shape[1] == 3 and own[stem].shape[1] == 1:
        keep[stem] = keep[stem].sum(1, keepdim=True)
        notes.append("RGB stem summed")
    skipped = [k for k in _CLASSIFIER if skip_classifier and k in keep and k in own and keep[k].shape != own[k].shape]
    for k in skipped:
        del keep[k]
    if skipped:
        notes.append("classifier of another size skipped")
    missing = sorted(k for k in own if k not in keep and k not in skipped and (same_mode or ".halting." not in k))
    unexpected = sorted(k for k in keep if k not in own)
    shapes = sorted(f"{k}: {tuple(keep[k].shape)} vs {tuple(own[k].shape)}" for k in keep if k in own and keep[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{path} ({source.sact_config['name']}, {source.mode}) does not fit {model.sact_config['name']} "
            f"({model.mode}): missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shapes {shapes[:5]}"
        )
    model.load_state_dict(keep, strict=False)
    return f"sact checkpoint {path} ({source.mode})" + (f" ({', '.join(notes)})" if notes else "")


_CLASSIFIER = ("fc.weight", "fc.bias", "logits.weight", "logits.bias")  # torchvision layout, ResNet-v2


def _stem_key(state: dict) -> str:
    """The first convolution's weight: ``conv1.weight`` (ImageNet ResNets) or the CIFAR stem's."""
    return "conv1.weight" if "conv1.weight" in state else next(
        (k for k in state if k.startswith("stem") and k.endswith("weight") and state[k].dim() == 4), "conv1.weight")
