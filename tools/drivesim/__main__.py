"""``python -m tools.drivesim``: run the Drive v3 test server (see :mod:`tools.drivesim.cli`)."""
from __future__ import annotations

import sys

from tools.drivesim.cli import main

if __name__ == "__main__":
    sys.exit(main())
