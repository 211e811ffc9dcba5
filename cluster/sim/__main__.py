"""``python -m cluster.sim ...``: the ``kvpilot simulate`` command on its own (same flags)."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

from cluster.cli.simulate import add_simulate_parser, run_simulate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.sim")
    add_simulate_parser(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(["simulate", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run_simulate(ns, Console(soft_wrap=True))
    except ValueError as e:
        Console(stderr=True).print(f"[red]error:[/red] {e}", highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
