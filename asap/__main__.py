"""``python -m asap ...`` is the ``asap`` command (see :mod:`asap.cli`)."""

from __future__ import annotations

import sys

from asap.cli import main

if __name__ == "__main__":
    sys.exit(main())
