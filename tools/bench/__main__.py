"""``python -m tools.bench``: the benchmark (see its --help)."""
from __future__ import annotations

import sys

from tools.bench import main

sys.exit(main())
