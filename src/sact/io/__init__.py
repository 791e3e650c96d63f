"""File formats: what sact writes and reads, with no model code.

:mod:`sact.io.checkpoint` is the checkpoint format (safetensors plus a JSON header and
sidecar, written atomically, validated before use). Building a model from a checkpoint is
:mod:`sact.models.loading`'s job; nothing here imports :mod:`sact.models`.
"""
