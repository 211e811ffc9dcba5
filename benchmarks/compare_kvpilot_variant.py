"""kvpilot with one candidate fix, for ``compare_servers.py`` (server ``kvpilot-coalesce``).

The fix under test: a busy replica coalesces its stream. After yielding an event it waits
``KVPILOT_BENCH_COALESCE_MS`` before pulling the next one from vLLM, whose
``RequestOutputCollector`` merges every delta produced meanwhile (``RequestOutputKind.DELTA``).
Each Ray streaming item (replica → ingress → proxy) then carries several tokens instead of one.
The first token is never delayed, and a replica with fewer than
``KVPILOT_BENCH_COALESCE_MIN_STREAMS`` streams in flight does not wait at all.

Nothing in ``deployments/`` changes: ``build_app`` swaps the model server class for the
duration of kvpilot's own builder. Run as ``serve run --app-dir benchmarks CONFIG`` with
``import_path: compare_kvpilot_variant:build_app``.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

from ray import cloudpickle  # Ray's vendored copy: the one Serve pickles deployments with
from ray.serve import Application

from deployments import app as kvpilot_app
from deployments.engine import ModelServer

COALESCE_S = float(os.environ.get("KVPILOT_BENCH_COALESCE_MS", "20")) / 1000.0
MIN_STREAMS = int(os.environ.get("KVPILOT_BENCH_COALESCE_MIN_STREAMS", "4"))


class CoalescingModelServer(ModelServer):
    """``ModelServer`` whose streams carry several tokens per event when the replica is busy."""

    async def generate(self, req: Any) -> AsyncIterator[dict[str, Any]]:
        self._bench_streams = getattr(self, "_bench_streams", 0) + 1
        try:
            async for event in super().generate(req):
                yield event
                done = all(c["finish_reason"] for c in event["choices"])
                if not done and self._bench_streams >= MIN_STREAMS:
                    await asyncio.sleep(COALESCE_S)  # vLLM merges the deltas of the steps taken meanwhile
        finally:
            self._bench_streams -= 1


def build_app(args: dict[str, Any]) -> Application:
    original = kvpilot_app.ModelServer
    kvpilot_app.ModelServer = CoalescingModelServer
    try:
        return kvpilot_app.build_app(args)
    finally:
        kvpilot_app.ModelServer = original


# Ray workers cannot import this file (benchmarks/ is not a package): ship the class by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])
