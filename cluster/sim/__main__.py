"""``python -m cluster.sim ...``: the ``kvpilot simulate`` command on its own (same flags)."""

from __future__ import annotations

import sys

from cluster.cli.simulate import add_simulate_parser, run_simulate
from cluster.cli.standalone import run_alone


def main(argv: list[str] | None = None) -> int:
    return run_alone("python -m cluster.sim", "simulate", add_simulate_parser, run_simulate, argv)


if __name__ == "__main__":
    sys.exit(main())
