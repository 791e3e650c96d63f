"""The tools layer: harnesses and reports built on the library.

The sparse benchmark and profiler (:mod:`sact.tools.bench`, ``sact bench``), ponder maps and
galleries (:mod:`~sact.tools.ponder`, :mod:`~sact.tools.gallery`), plots, export, the TF
converter, ``predict`` (:mod:`~sact.tools.inference`) and the demo. The library (models,
halting, the engines, the tasks, data) never imports this layer; the commands in
:mod:`sact.commands` parse arguments and call it (docs/layout.md).
"""
