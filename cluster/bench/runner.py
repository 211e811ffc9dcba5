"""The run: send a workload under one arrival mode and collect the records.

Modes:

* ``concurrency``: a closed loop; ``concurrency`` clients each send their next request as
  soon as their last one ends.
* ``rate``: an open loop; arrivals Poisson (``burstiness`` 1) or Gamma at ``rate``
  requests/s, whatever the server's backlog (``max_concurrency`` optionally caps requests
  in flight, as vLLM's ``--max-concurrency`` does).
* ``trace``: an open loop on the trace's own timestamps, divided by ``time_scale``.
"""

from __future__ import annotations

import asyncio
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import aiohttp

from cluster.bench.arrivals import random_arrivals, trace_arrivals
from cluster.bench.client import request_body, send_request
from cluster.bench.metrics import DEFAULT_PERCENTILES, RequestRecord, summarize, throughput_timeline
from cluster.bench.workload import RequestSpec, Workload
from cluster.traces import SLO

MODES = ("concurrency", "rate", "trace")


@dataclass(frozen=True)
class BenchConfig:
    base_url: str
    model: str
    mode: str  # one of MODES
    concurrency: int | None = None
    rate: float | None = None
    burstiness: float = 1.0
    time_scale: float = 1.0
    max_concurrency: int | None = None
    endpoint: str = "completions"  # or "chat"
    ignore_eos: bool = True
    temperature: float = 0.0
    request_timeout_s: float = 600.0
    seed: int = 0
    slo: SLO = field(default_factory=SLO)
    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES
    api_key: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mode == "concurrency" and not (self.concurrency and self.concurrency >= 1):
            raise ValueError(f"--concurrency must be >= 1, got {self.concurrency}")
        if self.mode == "rate" and not (self.rate and self.rate > 0):
            raise ValueError(f"--rate must be > 0 requests/s, got {self.rate}")
        if self.endpoint not in ("completions", "chat"):
            raise ValueError(f"endpoint must be completions or chat, got {self.endpoint!r}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be >= 1, got {self.max_concurrency}")

    @property
    def url(self) -> str:
        path = "chat/completions" if self.endpoint == "chat" else "completions"
        return f"{self.base_url.rstrip('/')}/v1/{path}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("api_key")
        return d


@dataclass
class BenchResult:
    config: BenchConfig
    workload: Workload
    records: list[RequestRecord]
    summary: dict[str, Any]
    environment: dict[str, Any]

    def timeline(self) -> dict[str, Any]:
        return throughput_timeline(self.records)

    def to_dict(self, save_requests: bool = False) -> dict[str, Any]:
        d = {
            "kvpilot_bench": 1,
            "config": self.config.to_dict(),
            "workload": self.workload.describe(),
            "environment": self.environment,
            "summary": self.summary,
            "timeline": self.timeline(),
        }
        if save_requests:
            d["requests"] = [r.to_dict() for r in self.records]
        return d


def arrival_offsets(cfg: BenchConfig, workload: Workload) -> list[float] | None:
    """Send times (s from the start) for open-loop modes; None for the closed loop."""
    n = len(workload.requests)
    if cfg.mode == "concurrency":
        return None
    if cfg.mode == "rate":
        return random_arrivals(cfg.rate, n, cfg.burstiness, cfg.seed)
    if not workload.has_timestamps:
        raise ValueError(f"{workload.source} has no timestamps: give --rate or --concurrency")
    return trace_arrivals([r.arrival_s for r in workload.requests], cfg.time_scale)


def _environment() -> dict[str, Any]:
    return {
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "loadavg_before": list(os.getloadavg()),
    }


async def _run(cfg: BenchConfig, workload: Workload, warmup: list[RequestSpec],
               on_done: Callable[[RequestRecord], None] | None) -> tuple[list[RequestRecord], float]:
    chat = cfg.endpoint == "chat"
    bodies = {id(s): request_body(s, cfg.model, chat, cfg.ignore_eos, cfg.temperature)
              for s in [*warmup, *workload.requests]}  # built before the clock starts
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else None
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
    timeout = aiohttp.ClientTimeout(total=cfg.request_timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers,
                                     auto_decompress=False) as session:
        if warmup:
            width = min(len(warmup), cfg.concurrency or cfg.max_concurrency or 16)
            await _closed_loop(session, cfg.url, warmup, bodies, width, time.perf_counter(), chat, None)
        start = time.perf_counter()
        offsets = arrival_offsets(cfg, workload)
        if offsets is None:
            records = await _closed_loop(session, cfg.url, workload.requests, bodies, cfg.concurrency, start, chat,
                                         on_done)
        else:
            records = await _open_loop(session, cfg.url, workload.requests, bodies, offsets, cfg.max_concurrency,
                                       start, chat, on_done)
    return records, start


async def _closed_loop(session: aiohttp.ClientSession, url: str, specs: list[RequestSpec], bodies: dict,
                       width: int, start: float, chat: bool,
                       on_done: Callable[[RequestRecord], None] | None) -> list[RequestRecord]:
    queue = list(reversed(specs))
    records: list[RequestRecord] = []

    async def client() -> None:
        while queue:
            spec = queue.pop()
            rec = await send_request(session, url, bodies[id(spec)], spec, start, chat)
            records.append(rec)
            if on_done:
                on_done(rec)

    await asyncio.gather(*(client() for _ in range(min(width, len(specs)))))
    return sorted(records, key=lambda r: r.index)


async def _open_loop(session: aiohttp.ClientSession, url: str, specs: list[RequestSpec], bodies: dict,
                     offsets: list[float], cap: int | None, start: float, chat: bool,
                     on_done: Callable[[RequestRecord], None] | None) -> list[RequestRecord]:
    gate = asyncio.Semaphore(cap) if cap else None

    async def one(spec: RequestSpec) -> RequestRecord:
        if gate is None:
            rec = await send_request(session, url, bodies[id(spec)], spec, start, chat)
        else:
            async with gate:
                rec = await send_request(session, url, bodies[id(spec)], spec, start, chat)
        if on_done:
            on_done(rec)
        return rec

    tasks = []
    for spec, at in sorted(zip(specs, offsets), key=lambda p: p[1]):
        delay = start + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(spec)))
    return sorted(await asyncio.gather(*tasks), key=lambda r: r.index)


def run_benchmark(cfg: BenchConfig, workload: Workload, warmup: list[RequestSpec] | None = None,
                  on_done: Callable[[RequestRecord], None] | None = None) -> BenchResult:
    """Run the workload against the server; blocking (runs its own event loop)."""
    env = _environment()
    records, _ = asyncio.run(_run(cfg, workload, warmup or [], on_done))
    env["loadavg_after"] = list(os.getloadavg())
    summary = summarize(records, cfg.slo, percentiles=cfg.percentiles)
    return BenchResult(cfg, workload, records, summary, env)
