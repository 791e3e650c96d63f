"""sact: Spatially Adaptive Computation Time for residual networks (Figurnov et al., CVPR 2017)."""

from .act import adaptive_computation_time, halting_step
from .models import create_model, list_models, load_torchvision_weights, register_model
from .output import FeaturesOutput, ModelOutput, ponder_loss
from .stage import AdaptiveStage, StageOutput

__version__ = "0.1.0"

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

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint  # noqa: E402

__all__ += ["load_checkpoint", "save_checkpoint", "CheckpointError"]

from .ponder import PonderMap, ponder_map  # noqa: E402

__all__ += ["ponder_map", "PonderMap"]

from .sparse import to_sparse  # noqa: E402

__all__ += ["to_sparse"]
