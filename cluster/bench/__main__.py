"""``python -m cluster.bench ARGS``: the same as ``kvpilot bench ARGS``."""

import sys

from cluster.cli.bench import main

sys.exit(main())
