"""Moved to :mod:`sact.tools.bench.workloads`; this alias goes in the next release."""

from ..tools.bench.workloads import (
    TrainedModel,
    WorkloadError,
    calibrate_radius,
    impose_no_halting,
    impose_object_halting,
    load_trained,
    object_directions,
    object_inputs,
    object_model,
    vanilla_twin,
)

__all__ = ["object_inputs", "object_directions", "impose_object_halting", "impose_no_halting", "object_model",
           "vanilla_twin", "calibrate_radius", "TrainedModel", "load_trained", "WorkloadError"]
