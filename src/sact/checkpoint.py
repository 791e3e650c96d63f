"""Moved to :mod:`sact.io.checkpoint` (format) and :mod:`sact.models.loading` (building models); this
module re-exports them for one release.

Import :func:`sact.load_checkpoint`, :func:`sact.save_checkpoint` and
:class:`sact.CheckpointError` from ``sact``; the file format (reading and writing the
safetensors file and its JSON document) from :mod:`sact.io.checkpoint`; what checks and
builds the model a checkpoint describes from :mod:`sact.models.loading`.
"""

from __future__ import annotations

from .io.checkpoint import (CheckpointError, atomic_write_bytes, checkpoint_paths, file_kind, header_document,
                            non_finite_tensors, not_a_checkpoint, read_safetensors_header, read_state_dict,
                            read_verified_state, state_signature, trained_input_size)
from .models.loading import (MAX_MODEL_ELEMENTS, expected_state, load_checkpoint, meta_state, read_checkpoint_meta,
                             save_checkpoint, validate_model_spec)

__all__ = ["checkpoint_paths", "save_checkpoint", "load_checkpoint", "read_checkpoint_meta", "validate_model_spec",
           "trained_input_size", "non_finite_tensors", "read_safetensors_header", "read_verified_state",
           "state_signature", "meta_state", "expected_state", "file_kind", "not_a_checkpoint", "read_state_dict",
           "header_document", "atomic_write_bytes",
           "CheckpointError", "MAX_MODEL_ELEMENTS"]
