"""The tools layer: harnesses and reports built on the library.

For now the benchmark harness of the sparse engine, :mod:`sact.tools.bench` (``sact bench``).
The library (models, halting, the sparse engine :mod:`sact.sparse`, data) never imports this
layer; the commands in :mod:`sact.commands` parse arguments and call it.
"""
