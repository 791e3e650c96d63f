"""``python -m sact.tools.bench [options]``: ``sact bench`` without the ``sact`` front end."""

import sys

from ...commands.bench import main

if __name__ == "__main__":
    sys.exit(main())
