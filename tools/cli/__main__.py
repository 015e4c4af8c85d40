"""``python -m tools.cli``: the casfs command line."""
from __future__ import annotations

import sys

from tools.cli import main

sys.exit(main())
