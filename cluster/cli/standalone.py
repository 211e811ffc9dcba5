"""One ``kvpilot`` sub-command run on its own (``python -m cluster.sim``, ``python -m cluster.bench``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from rich.console import Console


def run_alone(prog: str, command: str, add_parser: Callable[[Any], Any], run: Callable[..., int],
              argv: list[str] | None = None) -> int:
    """Parse ``argv`` as ``kvpilot COMMAND ARGS`` would and run it; a ValueError is a usage error (exit 2)."""
    parser = argparse.ArgumentParser(prog=prog)
    add_parser(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args([command, *(sys.argv[1:] if argv is None else argv)])
    try:
        return run(ns, Console(soft_wrap=True))
    except ValueError as e:
        Console(stderr=True).print(f"[red]error:[/red] {e}", highlight=False)
        return 2
