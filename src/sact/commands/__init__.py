"""Sub-commands of the ``sact`` CLI (see :mod:`sact.cli`)."""
