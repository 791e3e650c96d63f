"""The sparse engine's speed benchmark: now ``sact bench`` / ``python -m sact.tools.bench``.

Kept so that ``python benchmarks/sparse_speed.py [options]`` still works; the code and the
options are those of :mod:`sact.tools.bench` (results in ``./sact_bench/`` unless ``--out``).
"""

import sys

from sact.commands.bench import main

if __name__ == "__main__":
    sys.exit(main())
