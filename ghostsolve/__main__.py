"""``python -m ghostsolve``: the command line (:func:`ghostsolve.cli.main`)."""

from __future__ import annotations

import sys

from ghostsolve.cli import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
