"""`python -m loadtest ...` (the guard matters: worker processes are spawned)."""

from __future__ import annotations

import sys

from loadtest.cli import main

if __name__ == "__main__":
    sys.exit(main())
