"""``sact.ponder_map``: where did the network spend its computation on one image?

The summed map follows the reference ``summary_utils.sact_map`` (spec section 8): each
stage's ``[h_s, w_s]`` ponder-cost map is nearest-neighbour resized to the input
resolution and the stages are summed (for SACT at least 2 per stage).

Preprocessing: the model's own (``model.checkpoint_meta["preprocess"]`` for a model
from :func:`sact.load_checkpoint`), else the ``preprocess`` argument, else
:func:`default_preprocess` (values in [0, 1], channels converted to ``model.in_chans``).
Like the reference ``imagenet_ponder_map.py``, the whole image is kept: only the
preprocess's pixel mapping (``kind``, ``in_chans``, ``mean``/``std``) is applied, its
crop and resize are not, unless ``crop=True``. ``max_side`` resizes (bicubic, aspect
kept) so that the longer side has that length.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import vanilla_flops  # noqa: F401 (re-exported: sact.tools.ponder.vanilla_flops)
from ..viz import summed_map

__all__ = ["PonderMap", "ponder_map", "total_stride", "default_preprocess", "model_preprocess", "resize_longer_side",
           "input_mismatch", "vanilla_flops", "evaluating", "SCALE_TOLERANCE"]

_STRIDES: "weakref.WeakKeyDictionary[nn.Module, int]" = weakref.WeakKeyDictionary()
#: :func:`input_mismatch` warns when the image's longer side differs from the training
#: images' by more than this factor.
SCALE_TOLERANCE = 3.0


@dataclass
class PonderMap:
    """Ponder-cost maps of one image.

    Attributes:
        summed: ``[H, W]`` float, the stages' ponder maps nearest-upsampled to the input
            resolution and summed (reference ``sact_map``).
        stages: per stage, its ``[h_s, w_s]`` ponder map.
        num_units: ``[H, W]`` float, the same sum over the stages' executed-unit counts.
        flops: FLOPs the model spent on this image (2 x multiply-adds).
        ponder_cost: the model's ponder cost of this image: sum over stages of the
            mean of the stage's map (what the loss uses; differs slightly from
            ``summed.mean()`` when the input size is not a multiple of the stride).
        logits: ``[K]``.
        predicted_class: ``argmax(logits)``.
        input: ``[C, H, W]`` the tensor the model saw (after preprocessing).
        image: ``[C, H, W]`` in [0, 1]: the same pixels before the value mapping
            (for display).
        upscaled: True when the image was enlarged to reach the total stride.
    """

    summed: Tensor
    stages: list[Tensor]
    num_units: Tensor
    flops: int
    ponder_cost: float
    logits: Tensor
    predicted_class: int
    input: Tensor
    image: Tensor
    upscaled: bool = False


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """Eval mode (batch statistics untouched) without gradients, restoring the mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def total_stride(model: nn.Module) -> int:
    """The network's total stride: input size / last stage's size (CIFAR 4, ImageNet 32).

    From ``model.feature_info`` (the stride of the last stage, known from the modules)
    for models of the package's protocol (:class:`sact.models.AdaptiveResNet`); for any
    other model measured once with a small zero input through ``forward_features`` and
    cached (the model's train/eval mode is restored).
    """
    from ..models.base import AdaptiveResNet, stage_feature_info

    if isinstance(model, AdaptiveResNet):
        return int(stage_feature_info(model)[-1]["reduction"])
    if model in _STRIDES:
        return _STRIDES[model]
    param = next(model.parameters())
    probe = 64
    with evaluating(model):
        while True:
            x = torch.zeros(1, model.in_chans, probe, probe, device=param.device, dtype=param.dtype)
            h = model.forward_features(x).features[-1].shape[-2]
            if h >= 2 or probe >= 4096:  # a 1-pixel output cannot tell the stride apart from more
                break
            probe *= 2
    stride = max(1, round(probe / h))
    _STRIDES[model] = stride
    return stride


def default_preprocess(model: nn.Module):
    """Values in [0, 1], channels converted to ``model.in_chans``, no resize."""
    from ..data import Preprocess

    return Preprocess(kind="unit", in_chans=int(model.in_chans))


def model_preprocess(model: nn.Module, preprocess=None):
    """The preprocessing :func:`ponder_map` uses (checkpoint's, else given, else default).

    Raises:
        ValueError: a checkpoint preprocess dict that :meth:`Preprocess.from_dict` rejects,
            or one whose ``in_chans`` differs from the model's.
    """
    from ..data import Preprocess

    meta = getattr(model, "checkpoint_meta", None) or {}
    if meta.get("preprocess") is not None:
        pre = Preprocess.from_dict(meta["preprocess"])
    elif preprocess is not None:
        pre = preprocess if isinstance(preprocess, Preprocess) else Preprocess.from_dict(preprocess)
    else:
        pre = default_preprocess(model)
    if pre.in_chans != model.in_chans:
        raise ValueError(f"preprocess gives {pre.in_chans} channels but the model takes {model.in_chans}")
    return pre


def resize_longer_side(image: Tensor, max_side: int) -> Tensor:
    """Bicubic (antialiased) resize of ``[C, H, W]`` in [0, 1] so that ``max(H, W) == max_side``."""
    if not isinstance(max_side, int) or max_side < 1:
        raise ValueError(f"max_side must be a positive int, got {max_side!r}")
    h, w = image.shape[-2:]
    scale = max_side / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    if size == (h, w):
        return image
    out = F.interpolate(image[None].float(), size=size, mode="bicubic", align_corners=False, antialias=True)[0]
    return out.clamp_(0.0, 1.0)  # bicubic overshoots at edges


def _reach_stride(image: Tensor, stride: int, upscale: bool) -> tuple[Tensor, bool]:
    h, w = image.shape[-2:]
    if min(h, w) >= stride:
        return image, False
    if not upscale:
        raise ValueError(
            f"image of {h}x{w} pixels is smaller than the network's total stride {stride}: "
            "pass a larger image or upscale=True"
        )
    # Why: below the total stride the last stage sees less than one input cell per
    # position, and its map would cover pixels that do not exist.
    scale = stride / min(h, w)
    size = (max(stride, math.ceil(h * scale)), max(stride, math.ceil(w * scale)))
    warnings.warn(f"image of {h}x{w} pixels is smaller than the total stride {stride}; upscaled to {size[0]}x{size[1]}",
                  stacklevel=3)
    out = F.interpolate(image[None], size=size, mode="bicubic", align_corners=False)[0]
    return out.clamp_(0.0, 1.0), True


def ponder_map(
    model: nn.Module,
    image,
    *,
    preprocess=None,
    max_side: int | None = None,
    upscale: bool = True,
    crop: bool = False,
) -> PonderMap:
    """Ponder-cost maps of one image.

    Args:
        model: a model from :func:`sact.create_model` / :func:`sact.load_checkpoint`
            (any mode; ACT maps are constant per stage, vanilla ones equal ``U``), a
            or a model of your own following :class:`sact.models.AdaptiveResNet`'s protocol.
            Run in eval mode (restored afterwards) without gradients.
        image: PIL image (any mode: L, RGB, RGBA, P, CMYK, I;16, 1, ...), tensor
            ``[H, W]`` / ``[C, H, W]`` (uint8 in [0, 255], floats in [0, 1]) or numpy
            ``[H, W]`` / ``[H, W, C]``. EXIF orientation is NOT applied here (use
            ``PIL.ImageOps.exif_transpose`` first; the CLI does).
        preprocess: a :class:`sact.data.Preprocess` (or its dict); ignored when the model
            carries a checkpoint preprocess.
        max_side: resize (bicubic, aspect kept) so that the longer side is this long.
        upscale: an image whose shorter side is below :func:`total_stride` is enlarged
            (bicubic) until it reaches it, with a warning; False raises instead.
        crop: apply the preprocess's central crop and resize too (as in evaluation)
            instead of keeping the whole image; ``max_side`` is then ignored.

    Returns:
        A :class:`PonderMap` whose ``summed`` is ``[H, W]`` at the resolution the model saw.

    Raises:
        ValueError: bad image shape/dtype, ``max_side``, or a too-small image with
            ``upscale=False``.

    Warns (``UserWarning``) when the image is unlike the training data of a checkpoint's
    model (:func:`input_mismatch`): colour given to a greyscale model (or the reverse),
    or a size more than :data:`SCALE_TOLERANCE` times larger or smaller than the
    training images (objects at another scale; ``max_side`` or ``crop`` fixes it).
    """
    from ..data import to_float_image

    if getattr(model, "features_only", False):
        raise ValueError("ponder_map needs a classification model, got a features_only one; build it without "
                         "features_only (or call model.forward_features(x): its .stages hold the ponder maps)")
    pre = model_preprocess(model, preprocess)
    x01 = to_float_image(image, pre.in_chans)  # [C, H, W] in [0, 1]
    if crop:
        x01 = dataclasses.replace(pre, kind="unit", mean=None, std=None)(x01)  # geometry only
    elif max_side is not None:
        x01 = resize_longer_side(x01, max_side)
    for problem in input_mismatch(model, image, tuple(x01.shape[-2:])):
        warnings.warn(problem, stacklevel=2)
    x01, upscaled = _reach_stride(x01.float(), total_stride(model), upscale)
    x = dataclasses.replace(pre, image_size=None, central_crop=None)(x01)  # value mapping only
    param = next(model.parameters())
    with evaluating(model):
        out = model(x[None].to(device=param.device, dtype=param.dtype))
    size = tuple(x.shape[-2:])
    logits = out.logits[0].float().cpu()
    return PonderMap(
        summed=summed_map(out.stages, size)[0].cpu(),
        stages=[s.ponder_map[0].float().cpu() for s in out.stages],
        num_units=summed_map(out.stages, size, field="num_units")[0].cpu(),
        flops=int(out.flops[0].item()),
        ponder_cost=float(out.ponder_cost[0].item()),
        logits=logits,
        predicted_class=int(logits.argmax().item()),
        input=x.cpu(),
        image=x01.cpu(),
        upscaled=upscaled,
    )


def _channels(image) -> int:
    """Colour channels of an image as given (alpha not counted): 1 or 3."""
    if hasattr(image, "getbands"):  # PIL
        if image.mode in ("P", "PA"):  # a palette holds colours
            return 3
        return 1 if len([b for b in image.getbands() if b != "A"]) == 1 else 3
    shape = tuple(image.shape)
    if len(shape) == 2:
        return 1
    c = shape[0] if isinstance(image, Tensor) else shape[-1]
    return 1 if c in (1, 2) else 3


def _is_colour(image) -> bool:
    """Whether an image holds colour: 3 channels that differ by more than 2/255 somewhere."""
    from ..data import to_float_image

    if _channels(image) == 1:
        return False
    rgb = to_float_image(image, 3)
    return bool((rgb.amax(0) - rgb.amin(0)).max() > 2 / 255)


def input_mismatch(model: nn.Module, image, size: tuple[int, int]) -> list[str]:
    """How an image differs from the data a checkpoint's model was trained on (empty: no difference known).

    Args:
        model: a model from :func:`sact.load_checkpoint` (others have no training data to compare with).
        image: the image as given to :func:`ponder_map`.
        size: ``(H, W)`` the model will see (after ``max_side`` / ``crop``).

    Returns:
        One sentence per difference: colour vs greyscale channels, and a longer side more
        than :data:`SCALE_TOLERANCE` times the training images' (or less than its inverse).
    """
    from ..io.checkpoint import trained_input_size

    trained = trained_input_size(getattr(model, "checkpoint_meta", None))
    if trained is None:
        return []
    problems = []
    if trained[0] == 1 and _is_colour(image):
        problems.append("the model was trained on greyscale images; this colour image is converted to greyscale")
    elif trained[0] == 3 and _channels(image) == 1:
        problems.append("the model was trained on colour images; this greyscale image is repeated to 3 channels")
    side, trained_side = max(size), max(trained[1:])
    if side > SCALE_TOLERANCE * trained_side or side * SCALE_TOLERANCE < trained_side:
        problems.append(f"the image is {size[1]}x{size[0]} px, the model was trained on {trained[2]}x{trained[1]} px "
                        f"images: objects at another scale may not be recognised and the map may not mean much; "
                        f"resize it (max_side={trained_side}, CLI --max-side {trained_side}) or use crop=True (--crop)")
    return problems


