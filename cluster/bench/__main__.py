"""``python -m cluster.bench ARGS``: the same as ``kvpilot bench ARGS``."""

import sys

from cluster.bench.cli import main

sys.exit(main())
