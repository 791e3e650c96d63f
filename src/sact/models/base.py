"""The shared skeleton of every adaptive network: stem -> adaptive stages -> head.

:class:`AdaptiveResNet` is also **the protocol for your own model**. Subclass it, set a
few attributes, write two methods, register a builder, and every tool of the package
works on the model (``sact.ponder_map``, ``sact.to_sparse``, ``sact.save_checkpoint`` /
``sact.load_checkpoint``, ``features_only``, the detection backbone, export):

=========================================  ==============================================
member                                     contract
=========================================  ==============================================
``stage_names: tuple[str, ...]``           attribute names of the :class:`~sact.AdaptiveStage`
                                           modules, in order (``("layer1", "layer2")``)
``stem_stride: int``                       total stride of the stem (1: none)
``mode, in_chans, num_classes,``           set in ``__init__``: the mode the stages were built
``num_features``                           in, input channels, classifier outputs (0: none),
                                           channels entering the classifier
``forward_stem(x) -> (x, flops)``          ``[B, C_in, H, W]`` -> features ``[B, C, h, w]`` and
                                           their FLOPs ``[B]`` (convention of :mod:`sact.flops`)
``forward_pre_logits(x) -> Tensor``        the head up to the classifier: last stage's
                                           features ``[B, C, h, w]`` -> ``[B, num_features]``
classifier module                          an attribute named ``classifier_name`` (default
                                           ``"fc"``): ``nn.Linear(num_features, num_classes)``,
                                           or ``nn.Identity()`` for ``num_classes=0``
=========================================  ==============================================

Optional: ``classifier_name``, ``first_conv`` (``pretrained_cfg``), ``default_input_size``
and :meth:`default_preprocess`, :meth:`head_flops` (a head that computes more than its
classifier). A unit that changes the resolution states it as ``unit.stride`` (the
built-in units do), so :attr:`feature_info` knows the strides without running the model.

The builder, registered with :func:`sact.register_model`, takes ``mode`` and keyword
arguments, and the model is built with :func:`sact.create_model` (which records
``sact_config``, what checkpoints store to rebuild it). See ``docs/custom_units.md``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from ..flops import conv_flops, linear_flops
from ..output import FeaturesOutput, ModelOutput
from ..stage import AdaptiveStage, StageExecutor

__all__ = ["AdaptiveResNet", "FeatureInfo", "stage_feature_info", "make_classifier"]


class FeatureInfo(list):
    """Per returned stage ``{"num_chs", "reduction", "module", "stage"}`` (timm's ``feature_info``).

    A list of dicts, with timm's accessors: :meth:`channels`, :meth:`reduction`,
    :meth:`module_name` (all of them, or the one at ``idx``).
    """

    def _get(self, key: str, idx: int | None):
        return [d[key] for d in self] if idx is None else self[idx][key]

    def channels(self, idx: int | None = None):
        """Output channels of each returned stage."""
        return self._get("num_chs", idx)

    def reduction(self, idx: int | None = None):
        """Stride of each returned stage's map relative to the input."""
        return self._get("reduction", idx)

    def module_name(self, idx: int | None = None):
        """Attribute name of each returned stage (``"layer1"``...)."""
        return self._get("module", idx)


def stage_feature_info(model: "AdaptiveResNet") -> FeatureInfo:
    """:class:`FeatureInfo` of every stage of ``model``, from its modules (no forward pass).

    ``reduction`` is ``model.stem_stride`` times the strides of unit 0 of every stage up to
    this one (``unit.stride``, 1 when absent); ``num_chs`` is the last unit's ``out_channels``.
    """
    info, reduction = FeatureInfo(), int(model.stem_stride)
    for i, (name, stage) in enumerate(zip(model.stage_names, model.stages)):
        stride = getattr(stage.units[0], "stride", 1)
        reduction *= int(stride[0] if isinstance(stride, (tuple, list)) else stride)
        info.append({"num_chs": int(stage.units[-1].out_channels), "reduction": reduction, "module": name, "stage": i})
    return info


def make_classifier(num_features: int, num_classes: int) -> nn.Module:
    """``nn.Linear(num_features, num_classes)``, or ``nn.Identity()`` for ``num_classes == 0`` (timm)."""
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
        raise ValueError(f"num_classes must be a non-negative int (0: no classifier), got {num_classes!r}")
    return nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()


class AdaptiveResNet(nn.Module):
    """Base class of the adaptive networks: stem -> :class:`~sact.AdaptiveStage` s -> head.

    See the module docstring for what a subclass defines. The base class provides the
    forward pass (written once; the sparse engine and the detection backbone pass their
    stage executors through it) and the conventions of timm / torchvision:
    :meth:`forward_features`, :meth:`forward_head`, :meth:`get_classifier`,
    :meth:`reset_classifier`, :attr:`feature_info`, :attr:`pretrained_cfg`
    (``default_cfg``), ``features_only`` (set by ``create_model(..., features_only=True)``).
    """

    stage_names: tuple[str, ...] = ()
    #: attribute name of the classifier module
    classifier_name: str = "fc"
    #: attribute name of the first convolution (``pretrained_cfg["first_conv"]``)
    first_conv: str = "conv1"
    #: stride of :meth:`forward_stem`'s output relative to the input
    stem_stride: int = 1
    #: side of the images the architecture is meant for (``pretrained_cfg["input_size"]``)
    default_input_size: int = 224
    #: ``features_only`` models return the maps of the stages in ``out_indices`` (see :meth:`set_features_only`)
    features_only: bool = False
    out_indices: tuple[int, ...] = ()
    mode: str
    in_chans: int
    num_classes: int
    num_features: int
    #: set by :func:`sact.create_model`: ``{"name": ..., "kwargs": {...}}`` to rebuild the model.
    sact_config: dict

    @property
    def stages(self) -> list[AdaptiveStage]:
        """The adaptive stages in order."""
        return [getattr(self, n) for n in self.stage_names]

    # ---- what a subclass defines --------------------------------------------------------

    def forward_stem(self, x: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        """``[B, C_in, H, W]`` -> (``[B, C, h, w]``, FLOPs ``[B]``)."""
        raise NotImplementedError(f"{type(self).__name__} must define forward_stem(x) -> (features, flops [B])")

    def forward_pre_logits(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Last stage's features ``[B, C, h, w]`` -> ``[B, num_features]`` (the head before the classifier)."""
        raise NotImplementedError(f"{type(self).__name__} must define forward_pre_logits(x) -> [B, num_features]")

    def default_preprocess(self):
        """The :class:`sact.data.Preprocess` the architecture's weights expect (None: not stated).

        Used by :attr:`pretrained_cfg` when the model carries no checkpoint preprocessing.
        """
        return None

    def train(self, mode: bool = True) -> "AdaptiveResNet":
        """``nn.Module.train``; also remembers the mode before the switch (see :meth:`forward_features`)."""
        self.__dict__["_training_before_switch"] = self.training
        return super().train(mode)

    # ---- the forward pass -----------------------------------------------------------------

    def forward_features(
        self,
        x: Tensor,
        *,
        executors: Sequence[StageExecutor | None] | None = None,
        num_stages: int | None = None,
        stem: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None,
    ) -> FeaturesOutput:
        """Stem and stages. ``x`` ``[B, C_in, H, W]`` -> :class:`FeaturesOutput`.

        Unlike timm, the result is typed: ``.features`` (every stage's map, the last one is
        timm's ``forward_features``), ``.stages`` (ponder maps, unit counts) and ``.flops``.

        Args:
            x: the image batch.
            executors: one per stage (``None`` entries or ``None``: the dense reference
                execution); the sparse engine passes its own (:func:`sact.to_sparse`).
            num_stages: run only the first ``num_stages`` stages (detection backbones).
            stem: computes :meth:`forward_stem`'s ``(features, flops)`` in its place (the sparse
                engine passes its folded stem: the same values up to float rounding).
        """
        if isinstance(x, torch.fx.Proxy):
            # torchvision's create_feature_extractor switched the model to train mode before
            # tracing and does not switch it back when tracing fails: undo that switch.
            nn.Module.train(self, self.__dict__.get("_training_before_switch", self.training))
            raise TypeError(
                "sact models cannot be traced by torch.fx (the halting loop is data-dependent), so torchvision's "
                "create_feature_extractor does not apply: use sact.create_model(name, features_only=True) or "
                "model.forward_features(x) (docs/api.md, 'Features')"
            )
        if x.dim() != 4:
            raise ValueError(f"expected an image batch [B, C, H, W], got shape {tuple(x.shape)}")
        stages_to_run = self.stages[:num_stages]
        if executors is not None and len(executors) < len(stages_to_run):
            raise ValueError(f"got {len(executors)} executors for {len(stages_to_run)} stages")
        x, flops = (stem or self.forward_stem)(x)
        features, stages = [], []
        for i, stage in enumerate(stages_to_run):
            x, out = stage(x, None if executors is None else executors[i])
            features.append(x)
            stages.append(out)
            flops = flops + out.flops
        return FeaturesOutput(features, stages, flops)

    def forward_head(self, x: FeaturesOutput | Tensor, *, pre_logits: bool = False) -> Tensor:
        """The head, as in timm: ``model.forward_head(model.forward_features(x))`` are the logits.

        Args:
            x: a :class:`FeaturesOutput` or the last stage's features ``[B, C, h, w]``.
            pre_logits: return the pooled features ``[B, num_features]`` that enter the classifier.

        Returns:
            Logits ``[B, num_classes]`` (the pooled features when ``num_classes == 0``).
            Their FLOPs per image are :meth:`head_flops`.
        """
        if isinstance(x, FeaturesOutput):
            x = x.features[-1]
        pooled = self.forward_pre_logits(x)
        return pooled if pre_logits else self.get_classifier()(pooled)

    def head_flops(self) -> int:
        """FLOPs of :meth:`forward_head` per image: the classifier's (linear or 1x1 convolutions).

        Override for a head whose pre-logits part has convolutions or linear layers.
        """
        total = 0
        for m in self.get_classifier().modules():
            if isinstance(m, nn.Linear):
                total += linear_flops(m)
            elif isinstance(m, nn.Conv2d):
                total += conv_flops(m, 1)
        return total

    def forward(self, x: Tensor, *, executors: Sequence[StageExecutor | None] | None = None,
                stem: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None) -> ModelOutput | list[Tensor]:
        """``x`` ``[B, C_in, H, W]`` -> :class:`ModelOutput` (``executors``, ``stem``: see :meth:`forward_features`).

        A ``features_only`` model returns, like timm, the list of the ``out_indices`` stages'
        maps ``[B, C_s, H_s, W_s]`` (:attr:`feature_info` describes them); its
        :meth:`forward_features` still returns the typed output with ponder maps and FLOPs.
        """
        if self.features_only:
            feats = self.forward_features(x, executors=executors, num_stages=max(self.out_indices) + 1, stem=stem)
            return [feats.features[i] for i in self.out_indices]
        feats = self.forward_features(x, executors=executors, stem=stem)
        logits = self.forward_head(feats)
        flops = feats.flops + self.head_flops()
        ponder = sum(s.ponder_cost for s in feats.stages)
        return ModelOutput(logits=logits, ponder_cost=ponder, flops=flops, stages=feats.stages)

    # ---- timm / torchvision conventions ---------------------------------------------------

    def get_classifier(self) -> nn.Module:
        """The classifier module (``nn.Identity`` when ``num_classes == 0``)."""
        return getattr(self, self.classifier_name)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier by a fresh ``nn.Linear(num_features, num_classes)`` (0: ``nn.Identity``).

        Updates ``num_classes`` and ``sact_config`` (so a checkpoint saved afterwards rebuilds
        the new head). A sparse wrapper (:func:`sact.to_sparse`) of the model sees the new
        head at once: the head is never folded.
        """
        old = self.get_classifier()
        new = make_classifier(self.num_features, num_classes)
        ref = next(old.parameters(), None)
        if ref is not None:
            new = new.to(device=ref.device, dtype=ref.dtype)
        setattr(self, self.classifier_name, new)
        self.num_classes = num_classes
        config = getattr(self, "sact_config", None)
        if config is not None:
            config["kwargs"]["num_classes"] = num_classes

    @property
    def feature_info(self) -> FeatureInfo:
        """Channels, stride (``reduction``) and module name of each stage (of each returned
        stage for a ``features_only`` model), computed from the modules, without a forward pass."""
        info = stage_feature_info(self)
        return FeatureInfo(info[i] for i in self.out_indices) if self.features_only else info

    def set_features_only(self, out_indices: Sequence[int] | None = None) -> "AdaptiveResNet":
        """Make :meth:`forward` return the maps of the stages in ``out_indices`` (default: all).

        Stages after the last index do not run; the head and those stages keep their
        weights (so checkpoints and torchvision weights still load) but are never used.
        ``create_model(name, features_only=True, out_indices=...)`` calls this.
        """
        n = len(self.stage_names)
        idx = tuple(range(n)) if out_indices is None else tuple(int(i) for i in out_indices)
        idx = tuple(i + n if i < 0 else i for i in idx)
        if not idx or any(not 0 <= i < n for i in idx) or len(set(idx)) != len(idx) or list(idx) != sorted(idx):
            raise ValueError(f"out_indices must be distinct increasing stage indices in [0, {n}), got {out_indices!r}")
        self.features_only = True
        self.out_indices = idx
        return self

    @property
    def pretrained_cfg(self) -> dict:
        """What the weights expect, as timm's ``pretrained_cfg``.

        Keys: ``architecture``, ``input_size`` ``(C, H, W)``, ``mean`` / ``std`` (``None`` for
        per-image standardisation or no stated preprocessing), ``interpolation``, ``crop_pct``, ``num_classes``,
        ``classifier``, ``first_conv``, ``preprocess`` (the :class:`sact.data.Preprocess`
        dict), and ``file`` / ``url`` when the weights came from ``create_model(pretrained=...)``.
        The preprocessing is the checkpoint's (``checkpoint_meta["preprocess"]``) when the
        model carries one, else the architecture's :meth:`default_preprocess`.
        """
        from ..data.transforms import Preprocess

        meta = getattr(self, "checkpoint_meta", None) or {}
        pre = Preprocess.from_dict(meta["preprocess"]) if isinstance(meta.get("preprocess"), dict) else None
        pre = pre or self.default_preprocess()
        size = (pre.image_size if pre is not None else None) or self.default_input_size
        mean = std = None  # unknown, or per-image standardisation
        kind = pre.kind if pre is not None else None
        if kind == "unit":
            mean, std = (0.0,) * self.in_chans, (1.0,) * self.in_chans
        elif kind == "inception":
            mean, std = (0.5,) * self.in_chans, (0.5,) * self.in_chans
        elif kind == "normalize":
            mean, std = tuple(pre.mean), tuple(pre.std)
        cfg = {
            "architecture": (getattr(self, "sact_config", None) or {}).get("name", type(self).__name__),
            "input_size": (self.in_chans, size, size),
            "mean": mean,
            "std": std,
            "interpolation": "bilinear",
            "crop_pct": (pre.central_crop if pre is not None and pre.central_crop else 1.0),
            "num_classes": self.num_classes,
            "classifier": self.classifier_name,
            "first_conv": self.first_conv,
            "preprocess": pre.to_dict() if pre is not None else None,
        }
        cfg.update(getattr(self, "_pretrained_source", {}))
        return cfg

    @property
    def default_cfg(self) -> dict:
        """Alias of :attr:`pretrained_cfg` (timm's older name)."""
        return self.pretrained_cfg

