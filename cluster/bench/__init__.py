"""``kvpilot bench``: an async load generator for any OpenAI-compatible endpoint.

Pure client code (no Ray, no vLLM): arrivals (``arrivals``), workloads and prompt
synthesis (``workload``), one streamed request (``client``), the run itself
(``runner``), per-request metrics and their summary (``metrics``), and the
terminal table, JSON and plots (``report``). ``cluster/cli/bench.py`` holds
the ``kvpilot bench`` sub-command. Names below are imported on first use, so ``kvpilot`` starts fast.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SLO": "cluster.bench.metrics",
    "RequestRecord": "cluster.bench.metrics",
    "summarize": "cluster.bench.metrics",
    "BenchConfig": "cluster.bench.runner",
    "BenchResult": "cluster.bench.runner",
    "run_benchmark": "cluster.bench.runner",
    "RequestSpec": "cluster.bench.workload",
    "Workload": "cluster.bench.workload",
    "build_workload": "cluster.bench.workload",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
