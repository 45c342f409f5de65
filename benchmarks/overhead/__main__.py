"""``python -m benchmarks.overhead``: the benchmark, or with ``--worker NAME`` one of its workers."""

import sys

from .cli import main

sys.exit(main())
