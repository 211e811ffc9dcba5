"""``kvpilot bench``: an async load generator for any OpenAI-compatible endpoint.

Pure client code (no Ray, no vLLM): arrivals (``arrivals``), workloads and prompt
synthesis (``workload``), one streamed request (``client``), the run itself
(``runner``), per-request metrics and their summary (``metrics``), and the
terminal table, JSON and plots (``report``). ``cli`` holds the ``kvpilot bench``
sub-command.
"""

from cluster.bench.metrics import RequestRecord, SLO, summarize
from cluster.bench.runner import BenchConfig, BenchResult, run_benchmark
from cluster.bench.workload import RequestSpec, Workload

__all__ = [
    "SLO",
    "BenchConfig",
    "BenchResult",
    "RequestRecord",
    "RequestSpec",
    "Workload",
    "run_benchmark",
    "summarize",
]
