"""sact: Spatially Adaptive Computation Time for residual networks (Figurnov et al., CVPR 2017)."""

from .act import adaptive_computation_time, halting_step
from .models import create_model, list_models, load_torchvision_weights, register_model
from .output import FeaturesOutput, ModelOutput, ponder_loss
from .stage import AdaptiveStage, StageOutput
from ._version import __version__

__all__ = [
    "adaptive_computation_time",
    "halting_step",
    "create_model",
    "list_models",
    "register_model",
    "load_torchvision_weights",
    "ModelOutput",
    "FeaturesOutput",
    "StageOutput",
    "AdaptiveStage",
    "ponder_loss",
]

from .io.checkpoint import CheckpointError  # noqa: E402
from .models.loading import load_checkpoint, save_checkpoint  # noqa: E402

__all__ += ["load_checkpoint", "save_checkpoint", "CheckpointError"]

from .tools.ponder import PonderMap, ponder_map  # noqa: E402

__all__ += ["ponder_map", "PonderMap"]

from .sparse import to_sparse  # noqa: E402

# the training loop's tasks register themselves on import (sact.engine imports no task)
from . import classification, detection  # noqa: E402,F401

__all__ += ["to_sparse"]

from .tools.inference import Prediction, predict  # noqa: E402

__all__ += ["predict", "Prediction"]

# Sub-packages the docs use as ``sact.<name>.X`` after a plain ``import sact`` (e.g.
# ``sact.data.Preprocess``); imported on first use so ``import sact`` stays light.
_LAZY_SUBMODULES = frozenset({"data", "saliency", "engine", "export", "viz", "plots", "gallery",
                              "convert_tf", "fileio", "errors", "flops", "halting", "units", "tb", "tools", "io"})


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
