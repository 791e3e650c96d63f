"""The benchmark's workloads: models with imposed object halting, and a trained checkpoint on real canvases.

**Imposed object halting** (:func:`object_model`). The input is zero except for one
textured disc per image (the "object", :func:`object_inputs`); background positions away
from the disc then carry zero features (or only what the convolutions' biases add). Each
SACT halting branch is set to

    local logit = 8 - alpha * d . act(bn(x)) / |d|^2,    global term 0,

where ``d`` is the mean of ``act(bn(x))`` over the object's positions at that branch,
measured once per model on a calibration image with nothing halting
(:func:`object_directions`). Background positions (``x = 0``) get ``sigmoid(8) = 0.9997``
and halt after unit 0; positions whose features point along ``d`` (the object, and the
background its receptive field reaches) get ``sigmoid(8 - 40 * projection)`` and keep
running once the projection is above about 0.3, so even a 23-unit stage runs to its end
there. Projecting on ``d`` (rather than summing the channels) works for every layout: the
features of the pre-activation ``*_v2`` models are signed. The disc radius sets the FLOP
ratio; :func:`calibrate_radius` finds the radius for a target ratio.

**Trained model** (:func:`load_trained`): a SACT / ACT checkpoint with its own halting, on
the Cluttered Fashion-MNIST test canvases of its own evaluation set (canvas size, seed and
preprocessing from the checkpoint's metadata).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...io.checkpoint import CheckpointError
from ...models.loading import load_checkpoint
from ...errors import InputError
from ...halting import ACTHalting, SACTHalting
from ...models import create_model

__all__ = ["object_inputs", "object_directions", "impose_object_halting", "impose_no_halting", "object_model",
           "vanilla_twin", "calibrate_radius", "TrainedModel", "load_trained", "WorkloadError"]

#: Logit of the local halting term on zero (background) features: sigmoid(8) = 0.9997 halts.
BACKGROUND_LOGIT = 8.0
#: Logit drop on object features (``alpha``): a projection of 0.3 on the object's direction
#: gives sigmoid(8 - 12) = 0.018 per unit, the object itself sigmoid(-32). Large enough that
#: the 17-22 branches of a deep stage do not add up to halting on the object.
OBJECT_ALPHA = 40.0
#: Local halting bias that makes nothing halt (sigmoid(-30) ~ 1e-13 per unit).
NO_HALT_LOGIT = -30.0


class WorkloadError(InputError):
    """A workload cannot be built from what the user gave (bad checkpoint, missing data): exit 2."""


def object_inputs(batch: int, size: int, radius: float | None, *, in_chans: int = 3,
                  seed: int = 0) -> tuple[Tensor, Tensor]:
    """Zero images with one textured disc each.

    Args:
        batch: images.
        size: image side.
        radius: disc radius as a fraction of the side (centres drawn in the middle 40% of
            the image; the same centres for every radius); ``None``: texture everywhere.
        in_chans: channels.
        seed: seed of the texture and the centres.

    Returns:
        ``(x [B, C, S, S], mask [B, 1, S, S])``, ``mask`` 1.0 inside the disc.
    """
    if batch < 1 or size < 1:
        raise ValueError(f"batch and size must be positive, got batch={batch}, size={size}")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, in_chans, size, size, generator=g)
    centres = (0.3 + 0.4 * torch.rand(batch, 2, generator=g)) * size
    if radius is None:
        return x, torch.ones(batch, 1, size, size)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    mask = ((yy - centres[:, 0, None, None]) ** 2 + (xx - centres[:, 1, None, None]) ** 2) <= (radius * size) ** 2
    mask = mask.unsqueeze(1).float()  # [B, 1, S, S]
    return x * mask, mask


def _sact_branches(model: nn.Module) -> list[list[SACTHalting]]:
    branches = []
    for i, stage in enumerate(model.stages):
        if stage.mode != "sact":
            raise ValueError(f"imposed object halting needs SACT stages; stage {i + 1} is {stage.mode!r}")
        for j, b in enumerate(stage.halting):
            if not isinstance(b, SACTHalting):
                raise ValueError(f"stage {i + 1} branch {j}: {type(b).__name__} is not a SACTHalting branch")
        branches.append(list(stage.halting))
    return branches


def impose_no_halting(model: nn.Module) -> nn.Module:
    """Set every halting branch so that nothing halts (logit -30); in place.

    SACT branches: local conv zero with bias -30, no global term; ACT branches: the 1x1
    conv zero with bias -30.
    """
    with torch.no_grad():
        for stage in model.stages:
            for b in stage.halting or []:
                if isinstance(b, SACTHalting):
                    b.local_conv.weight.zero_()
                    b.local_conv.bias.fill_(NO_HALT_LOGIT)
                    b.global_conv.weight.zero_()
                elif isinstance(b, ACTHalting):
                    b.global_conv.weight.zero_()
                    b.global_conv.bias.fill_(NO_HALT_LOGIT)
                else:
                    raise ValueError(f"cannot switch off halting of a {type(b).__name__} branch")
    return model


def object_directions(model: nn.Module, *, image_size: int, seed: int = 1234) -> list[list[Tensor]]:
    """Mean halting-branch input ``act(bn(x))`` over the object, per stage and branch.

    Runs ``model`` (whose branches must not halt, see :func:`impose_no_halting`) on one
    calibration image (a centred disc of radius 0.35) and averages the features each
    branch sees over the disc's positions at the branch's resolution.

    Returns:
        ``d[stage][branch]`` ``[C]``.
    """
    branches = _sact_branches(model)
    x, mask = object_inputs(1, image_size, 0.35, in_chans=model.in_chans, seed=seed)
    dirs: list[list[Tensor | None]] = [[None] * len(s) for s in branches]
    hooks = []

    def hook_for(i: int, j: int):
        def hook(module: SACTHalting, args, out):
            with torch.no_grad():
                f = module.local_act(module.local_bn(args[0].float()))  # [1, C, h, w]
                m = F.interpolate(mask, size=f.shape[-2:], mode="nearest")[0, 0] > 0.5
                if not m.any():
                    m = f[0].abs().sum(0) > 0
                dirs[i][j] = f[0].permute(1, 2, 0)[m].mean(0)

        return hook

    for i, stage in enumerate(branches):
        for j, b in enumerate(stage):
            hooks.append(b.register_forward_hook(hook_for(i, j)))
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    return dirs  # type: ignore[return-value]


def impose_object_halting(model: nn.Module, directions: list[list[Tensor]], *,
                          alpha: float = OBJECT_ALPHA) -> nn.Module:
    """Set every SACT branch to halt zero (background) positions after unit 0; in place.

    ``local logit = 8 - alpha * d . act(bn(x)) / |d|^2`` (the centre tap of the 3x3 conv),
    no global term. See the module docstring.
    """
    with torch.no_grad():
        for stage, dirs in zip(_sact_branches(model), directions):
            for b, d in zip(stage, dirs):
                b.local_conv.weight.zero_()
                k = b.local_conv.kernel_size[0] // 2
                b.local_conv.weight[0, :, k, k] = (-alpha * d / d.dot(d).clamp_min(1e-12)).to(b.local_conv.weight)
                b.local_conv.bias.fill_(BACKGROUND_LOGIT)
                b.global_conv.weight.zero_()
    return model


def vanilla_twin(model: nn.Module) -> nn.Module:
    """The vanilla network with ``model``'s unit, stem and head weights (eval mode)."""
    cfg = dict(model.sact_config["kwargs"])
    cfg.pop("mode", None)
    vanilla = create_model(model.sact_config["name"], mode="vanilla", **cfg)
    missing, _unexpected = vanilla.load_state_dict(model.state_dict(), strict=False)  # halting weights are extra
    if missing:
        raise RuntimeError(f"vanilla twin of {model.sact_config['name']} lacks weights {missing[:3]}...")
    return vanilla.eval()


def object_model(name: str, *, image_size: int, **kwargs) -> tuple[nn.Module, nn.Module]:
    """``(object_halting, nothing_halts)``: the same random SACT network with both halting settings.

    Args:
        name: registry name (``sact.list_models()``).
        image_size: input side (for the calibration of the object directions).
        **kwargs: registry keyword arguments (e.g. ``base_channels``).
    """
    full = impose_no_halting(create_model(name, mode="sact", **kwargs).eval())
    obj = impose_object_halting(copy.deepcopy(full), object_directions(full, image_size=image_size))
    return obj.eval(), full


def calibrate_radius(flop_ratio, target: float, *, lo: float = 0.0, hi: float = 0.75, tol: float = 0.005,
                     steps: int = 12) -> tuple[float, float]:
    """The disc radius whose FLOP ratio is closest to ``target`` (bisection; the ratio grows with the radius).

    Args:
        flop_ratio: ``radius -> FLOP ratio`` (runs the model).
        target: wanted ratio.
        lo, hi: radius bracket.
        tol: stop when within this of the target.
        steps: most bisection steps.

    Returns:
        ``(radius, ratio)`` of the best radius tried (the target may be out of reach: the
        ratio at ``lo`` or ``hi`` is then returned).
    """
    f_lo, f_hi = flop_ratio(lo), flop_ratio(hi)
    best = min(((lo, f_lo), (hi, f_hi)), key=lambda p: abs(p[1] - target))
    if not f_lo < target < f_hi:
        return best
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        f = flop_ratio(mid)
        if abs(f - target) < abs(best[1] - target):
            best = (mid, f)
        if abs(f - target) <= tol:
            break
        lo, hi = (mid, hi) if f < target else (lo, mid)
    return best


@dataclass
class TrainedModel:
    """A trained checkpoint and its test canvases.

    Attributes:
        model: the ACT / SACT model (eval mode).
        images: ``[N, C, S, S]`` preprocessed test canvases (the first ``N`` of its evaluation set).
        source: the checkpoint path as given.
        description: how the canvases were drawn (for the report).
    """

    model: nn.Module
    images: Tensor
    source: str
    description: str


def load_trained(path: str | Path, *, num_images: int, data_dir: str | Path | None = None) -> TrainedModel:
    """Load a trained checkpoint and draw its Cluttered Fashion-MNIST test canvases.

    The canvases are those of the checkpoint's own evaluation set: ``ClutterConfig`` from
    ``meta.config.clutter``, seed ``meta.config.data_seed + 1`` (as ``sact train`` and
    ``sact demo`` draw them), then ``meta.preprocess``.

    Raises:
        WorkloadError: unreadable checkpoint, a vanilla model, a model not trained on
            Cluttered Fashion-MNIST, or Fashion-MNIST not found.
    """
    from ... import data as D

    try:
        model = load_checkpoint(path).eval()
    except (CheckpointError, FileNotFoundError, OSError) as e:
        raise WorkloadError(f"cannot load checkpoint {path}: {e}") from e
    if model.mode not in ("act", "sact"):
        raise WorkloadError(f"checkpoint {path} is a {model.mode!r} model; the trained rows need an ACT or SACT model")
    meta = getattr(model, "checkpoint_meta", {}) or {}
    config = meta.get("config") or {}
    dataset = config.get("dataset", "cluttered")
    if dataset != "cluttered":
        raise WorkloadError(f"checkpoint {path} was trained on {dataset!r}; the trained rows draw Cluttered "
                            "Fashion-MNIST test canvases")
    try:
        clutter = D.ClutterConfig.from_dict(config.get("clutter") or {})
        pre = D.Preprocess.from_dict(meta["preprocess"]) if meta.get("preprocess") else D.cluttered_preprocess()
    except (TypeError, ValueError) as e:
        raise WorkloadError(f"checkpoint {path}: unusable data settings in its metadata: {e}") from e
    # a data folder named inside a checkpoint is never opened (docs/trust.md): --data-dir or the system copy
    seed = int(config.get("data_seed", 0)) + 1
    try:
        data = D.ClutteredFashionMNIST(split="test", num_samples=num_images, seed=seed, config=clutter,
                                       data_dir=data_dir)
        images = torch.stack([pre(data[i]["image"]) for i in range(num_images)])
    except FileNotFoundError as e:
        raise WorkloadError(f"Fashion-MNIST not found for the trained rows ({e}); pass --data-dir") from e
    if images.shape[1] != model.in_chans:
        raise WorkloadError(f"checkpoint {path} expects {model.in_chans} input channels, its canvases have "
                            f"{images.shape[1]}")
    desc = (f"Cluttered Fashion-MNIST test canvases {clutter.canvas_size}x{clutter.canvas_size} "
            f"(seed {seed}, first {num_images})")
    return TrainedModel(model, images.contiguous(), str(path), desc)
