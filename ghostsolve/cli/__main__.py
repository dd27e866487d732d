"""``python -m ghostsolve.cli`` (and ``torchrun -m ghostsolve.cli``): the command line."""

from __future__ import annotations

import sys

from ghostsolve.cli import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
