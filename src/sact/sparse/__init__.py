"""The sparse inference engine: halted positions cost nothing.

``to_sparse(model)`` wraps an adaptive ResNet into an inference module that returns the
same :class:`~sact.ModelOutput` as the dense model but executes residual units and
halting branches only where the positions (SACT) or images (ACT) are still active.
See ``docs/sparse.md`` for the layout, the measured speed and the limitations.
"""

from .executors import ImageSubsetExecutor, RowExecutor, make_executor
from .model import SparseModel, to_sparse
from .unit_kernels import DEFAULT_DENSE_ABOVE

__all__ = ["to_sparse", "SparseModel", "RowExecutor", "ImageSubsetExecutor", "make_executor", "DEFAULT_DENSE_ABOVE"]
