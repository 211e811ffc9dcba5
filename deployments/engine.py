"""The model deployment: each replica owns one vLLM ``AsyncLLM`` and vLLM's OpenAI app over it.

Undecorated on purpose: ``deployments/app.py`` turns it into a Serve deployment
with options from ``cluster.serving.placement.deployment_options(model)``.

The ingress sends each request as an ``HttpCall``; the replica answers it with
vLLM's own server code and streams the response bytes back
(``deployments/vllm_frontend.py``).
"""

from __future__ import annotations

import logging
import logging.handlers
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

from cluster import metrics
from cluster.config import ModelConfig
from cluster.serving.calibration import EngineCalibrator, warmup_requests
from deployments import reaper
from deployments.gpu import GpuMemoryProbe
from deployments.protocol import LORA_ADMIN_ROUTES, HttpCall
from deployments.telemetry import Recorder, log_where_serve_logs
from deployments.vllm_frontend import VllmHttpApp

logger = logging.getLogger("kvpilot.engine")


@dataclass
class EngineStats:
    """The engine's live load, updated by a vLLM stat logger on every engine step."""

    kv_cache_usage: float = 0.0
    num_running: int = 0
    num_waiting: int = 0
    prefix_cache_queries: int = 0  # tokens looked up, cumulative
    prefix_cache_hits: int = 0  # tokens found, cumulative
    prompt_tokens: int = 0  # cumulative
    generation_tokens: int = 0  # cumulative
    preemptions: int = 0  # cumulative
    updated_at: float = 0.0

    def __post_init__(self) -> None:
        # Not fields: asdict (the stats dict) leaves them out.
        self.calibration = EngineCalibrator()
        self.warming = False  # the start-up measurement runs: its steps feed the calibrator only

    def update(self, scheduler_stats: Any, iteration_stats: Any, rec: Recorder | None) -> None:
        if iteration_stats is not None:
            it, cal = iteration_stats, self.calibration  # what the policies need of this engine, measured
            cal.observe_step(it.inter_token_latencies_iter, len(it.time_to_first_tokens_iter), it.num_prompt_tokens)
            for f in it.finished_requests:
                cal.observe_prefill(f.num_prompt_tokens - f.num_cached_tokens, f.prefill_time)
        if self.warming:
            return
        if iteration_stats is not None:
            self.prompt_tokens += iteration_stats.num_prompt_tokens
            self.generation_tokens += iteration_stats.num_generation_tokens
            self.preemptions += iteration_stats.num_preempted_reqs
            if rec is not None:
                _export_iteration(rec, iteration_stats)
        if scheduler_stats is None:
            return
        self.kv_cache_usage = scheduler_stats.kv_cache_usage
        self.num_running = scheduler_stats.num_running_reqs
        self.num_waiting = scheduler_stats.num_waiting_reqs
        pcs = scheduler_stats.prefix_cache_stats
        if pcs is not None:
            self.prefix_cache_queries += pcs.queries
            self.prefix_cache_hits += pcs.hits
            if rec is not None:
                rec.inc(metrics.ENGINE_PREFIX_QUERIES, pcs.queries)
                rec.inc(metrics.ENGINE_PREFIX_HITS, pcs.hits)
        self.updated_at = time.time()
        if rec is not None:
            rec.set(metrics.ENGINE_KV_CACHE_USAGE, self.kv_cache_usage)
            rec.set(metrics.ENGINE_RUNNING, self.num_running)
            rec.set(metrics.ENGINE_WAITING, self.num_waiting)


def _export_iteration(rec: Recorder, it: Any) -> None:
    rec.inc(metrics.ENGINE_PROMPT_TOKENS, it.num_prompt_tokens)
    rec.inc(metrics.ENGINE_GENERATION_TOKENS, it.num_generation_tokens)
    rec.inc(metrics.ENGINE_PREEMPTIONS, it.num_preempted_reqs)
    for v in it.time_to_first_tokens_iter:
        rec.observe(metrics.ENGINE_TTFT, v)
    for v in it.inter_token_latencies_iter:
        rec.observe(metrics.ENGINE_ITL, v)
    for f in it.finished_requests:
        rec.observe(metrics.ENGINE_E2E, f.e2e_latency)
        rec.inc(metrics.ENGINE_REQUESTS_FINISHED, 1, reason=str(f.finish_reason))


def _stat_logger_factory(stats: EngineStats, rec: Recorder | None) -> Callable[..., Any]:
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _ReplicaStatLogger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0):
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):  # noqa: ANN001
            stats.update(scheduler_stats, iteration_stats, rec)

        def log_engine_initialized(self) -> None:
            pass

    return _ReplicaStatLogger


def _host_has_amx() -> bool:
    """Whether this host's CPU has AMX tiles (what vLLM's CPU kernels choose by)."""
    import torch

    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe()) if probe is not None else False


def start_vllm_engine(model: ModelConfig, stats: EngineStats, rec: Recorder | None = None) -> Any:
    """Build the replica's AsyncLLM from the config; on GPUs, inside this replica's placement group."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.executor.abstract import Executor

    from vllm.config import StructuredOutputsConfig

    kwargs = model.engine_args(host_has_amx=_host_has_amx())
    if kwargs["dtype"] != model.dtype:
        logger.info("model %s: dtype %s runs as %s on this host", model.name, model.dtype, kwargs["dtype"])
    kwargs["structured_outputs_config"] = StructuredOutputsConfig(
        backend=model.openai.structured_outputs_backend,
        disable_any_whitespace=model.openai.disable_any_whitespace,
    )
    if model.openai.reasoning_parser is not None:
        kwargs["reasoning_parser"] = model.openai.reasoning_parser
    if not model.on_cpu:
        # The workers go into this replica's bundles through vLLM's Ray executor.
        kwargs["distributed_executor_backend"] = "ray"
    args = AsyncEngineArgs(**kwargs, disable_log_stats=False)
    vllm_config = args.create_engine_config(UsageContext.OPENAI_API_SERVER)
    if not model.on_cpu:
        import ray.util

        vllm_config.parallel_config.placement_group = ray.util.get_current_placement_group()
    reaper.install()  # its engine core and workers die with this replica, however it dies
    return AsyncLLM(
        vllm_config=vllm_config,
        executor_class=Executor.get_class(vllm_config),
        log_stats=True,
        log_requests=False,
        usage_context=UsageContext.OPENAI_API_SERVER,
        stat_loggers=[_stat_logger_factory(stats, rec)],
    )


def _buffered_handlers() -> list[logging.handlers.MemoryHandler]:
    loggers = [logging.getLogger(), *(lg for lg in logging.root.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    return [h for lg in loggers for h in lg.handlers if isinstance(h, logging.handlers.MemoryHandler)]


@contextmanager
def log_handlers_kept() -> Iterator[None]:
    """Keep the process's buffered log handlers working while vLLM builds its engine.

    vLLM sets its logging up with ``logging.config.dictConfig`` when it creates an engine's
    config, and dictConfig closes every handler the process has. Closing a ``MemoryHandler``
    (Serve's per-replica log buffer, flushed to the replica's log file) drops its target, and a
    handler without a target keeps every record it is given: the replica's log would stop at
    engine start-up and its memory grow by one access-log record (~4 KB) per request.
    """
    targets = [(h, h.target) for h in _buffered_handlers()]
    try:
        yield
    finally:
        for handler, target in targets:
            if handler.target is None and target is not None:
                handler.setTarget(target)  # a closed file handler reopens its file on the next record
                handler.flush()


class ModelServer:
    """One replica of one model: a vLLM engine, vLLM's OpenAI app over it, its live stats and its metrics."""

    async def __init__(
        self,
        model: ModelConfig,
        planned_kv_bytes_per_gpu: int = 0,
        engine_factory: Callable[..., Any] = start_vllm_engine,
    ):
        from ray import serve

        log_where_serve_logs()
        self._model = model
        self._replica = serve.get_replica_context().replica_id.unique_id
        self._rec = Recorder(model=model.name, replica=self._replica)
        self._stats = EngineStats()
        self._gpu = GpuMemoryProbe(enabled=not model.on_cpu)
        self._planned_kv_bytes = planned_kv_bytes_per_gpu
        self._last_rate_sample = (time.monotonic(), 0, 0)  # (time, prompt + generated tokens, generated tokens)
        started = time.monotonic()
        with log_handlers_kept():
            self._engine = engine_factory(model, self._stats, self._rec)
            self._http = await VllmHttpApp.build(model, self._engine)
        self._resident_adapters: list[str] = []
        self._adapter_queries = self._adapters_applied = 0  # order of resident-adapter queries (see _refresh_adapters)
        if model.lora is not None:
            await self._refresh_adapters()
        cache = getattr(getattr(self._engine, "vllm_config", None), "cache_config", None)
        if cache is not None and getattr(cache, "num_gpu_blocks", None):  # KV capacity as the engine allocated it
            self._stats.calibration.kv_capacity_tokens = int(cache.num_gpu_blocks) * int(cache.block_size)
        logger.info("model %s: engine ready in %.1f s", model.name, time.monotonic() - started)
        await self._measure_engine()

    async def _measure_engine(self) -> None:
        """The start-up measurement (``cluster.serving.calibration.warmup_requests``): the ITL floor and prefill
        speed known before the first request. A failure costs only the measurement: traffic refines it anyway."""
        import asyncio

        from vllm import SamplingParams

        started = time.monotonic()
        self._stats.warming = True
        try:
            model_config = self._engine.vllm_config.model_config
            if model_config.runner_type != "generate":  # a pooling model has no decode to time
                return
            plan = warmup_requests(model_config.max_model_len, model_config.get_vocab_size(), self._stats.calibration)
            for i, (ids, n) in enumerate(plan):
                params = SamplingParams(max_tokens=n, min_tokens=n, ignore_eos=True, temperature=0.0)
                async for _ in self._engine.generate({"prompt_token_ids": ids}, params, f"kvpilot-measure-{i}"):
                    pass
            await asyncio.sleep(0.05)  # the last step's stats reach the stat logger after its output
        except Exception as e:  # noqa: BLE001  (the replica serves without it)
            logger.warning("model %s: start-up measurement failed (%s: %s); the plan's figures serve until traffic "
                           "measures them", self._model.name, type(e).__name__, e)
            return
        finally:
            self._stats.warming = False
        facts = self._stats.calibration.snapshot()
        logger.info("model %s: measured in %.1f s (%d requests): ITL floor %s, prefill %s", self._model.name,
                    time.monotonic() - started, len(plan),
                    "unknown" if facts.itl_floor_s is None else f"{facts.itl_floor_s * 1e3:.2f} ms",
                    "unknown" if facts.prefill_tokens_per_s is None else f"{facts.prefill_tokens_per_s:,.0f} tokens/s")

    # --- requests --------------------------------------------------------

    async def serve_http(self, call: HttpCall) -> AsyncIterator[Any]:
        """Answer one OpenAI request with vLLM's own server code (items: see ``deployments.vllm_frontend``).

        Cancelling the stream (the client went away) aborts the engine request, which frees its
        slot in the engine's batch.
        """
        adapter = getattr(call, "adapter", None)
        if adapter is not None:  # an adapter loaded at run time through another replica: register it here
            self._http.ensure_adapter(adapter, call.adapter_path, self._model.name)
        async for item in self._http.call(call.method, call.path, call.query, call.headers, call.body):
            if adapter is not None and type(item) is dict and "usage" in item:
                self._count_adapter_use(adapter, item["usage"])
            yield item
        if adapter is not None or call.path in LORA_ADMIN_ROUTES:
            await self._refresh_adapters()

    def _count_adapter_use(self, adapter: str, usage: dict[str, int]) -> None:
        self._rec.inc(metrics.LORA_REQUESTS, adapter=adapter)
        self._rec.inc(metrics.LORA_PROMPT_TOKENS, usage.get("prompt_tokens", 0), adapter=adapter)
        self._rec.inc(metrics.LORA_GENERATION_TOKENS, usage.get("completion_tokens", 0), adapter=adapter)

    async def _refresh_adapters(self) -> None:
        """Ask the engine which adapters its cache holds; count what came and went since.

        Concurrent requests ask concurrently: only an answer newer than the last one applied
        counts, so an older answer arriving late cannot undo a newer one (a false eviction).
        """
        self._adapter_queries += 1
        query = self._adapter_queries
        now = await self._http.resident_adapters()
        if query <= self._adapters_applied:
            return
        self._adapters_applied = query
        before = set(self._resident_adapters)
        self._rec.inc(metrics.LORA_LOADS, len(set(now) - before))
        self._rec.inc(metrics.LORA_EVICTIONS, len(before - set(now)))
        self._rec.set(metrics.LORA_RESIDENT, len(now))
        self._resident_adapters = now

    # --- replica lifecycle and stats -------------------------------------

    async def check_health(self) -> None:
        """Serve calls this periodically; raising marks the replica unhealthy and replaces it."""
        if self._engine.errored:
            raise RuntimeError(f"vLLM engine of {self._model.name} is dead: {self._engine.dead_error!r}")
        await self._engine.check_health()

    def ready(self) -> bool:
        """A no-op the ingress calls to learn that a replica of this model is up."""
        return True

    def stats(self) -> dict[str, Any]:
        """Live load: the engine's last step stats and the requests this replica has in the engine."""
        unfinished = self._engine.get_num_unfinished_requests()
        out = {**asdict(self._stats), "unfinished_requests": unfinished}
        if unfinished == 0:
            # An idle engine takes no more steps, so its last step's gauges would linger:
            # with nothing in flight, nothing runs or waits and every KV block is free (cached or not).
            out.update(kv_cache_usage=0.0, num_running=0, num_waiting=0)
        return out

    def record_routing_stats(self) -> dict[str, Any]:
        """Serve calls this every ``routing.stats_period_s``; it also refreshes the gauges of an idle engine."""
        live = self.stats()
        self._rec.set(metrics.ENGINE_KV_CACHE_USAGE, live["kv_cache_usage"])
        self._rec.set(metrics.ENGINE_RUNNING, live["num_running"])
        self._rec.set(metrics.ENGINE_WAITING, live["num_waiting"])
        out = {**live, **self._calibration()}
        if self._model.lora is not None:  # the adapters in the engine's cache: the router prefers them
            out["adapters"] = list(self._resident_adapters)
            self._rec.set(metrics.LORA_RESIDENT, len(self._resident_adapters))  # Ray drops gauges not set for a while
        return out

    def _calibration(self) -> dict[str, float]:
        """What this replica measured of its engine (cluster.serving.calibration): only the facts known so far."""
        facts = self._stats.calibration.snapshot().as_stats()
        for key, metric in (("itl_floor_s", metrics.ENGINE_ITL_FLOOR), ("prefill_tokens_per_s", metrics.ENGINE_PREFILL_RATE),
                            ("kv_capacity_tokens", metrics.ENGINE_KV_CAPACITY)):
            if key in facts:
                self._rec.set(metric, facts[key])
        return facts

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Signals for kvpilot's autoscaling policy (cluster/autoscaling/policy.py), every few seconds."""
        now, generated = time.monotonic(), self._stats.generation_tokens
        tokens = self._stats.prompt_tokens + generated
        then, before, generated_before = self._last_rate_sample
        self._last_rate_sample = (now, tokens, generated)
        live = self.stats()
        out = {
            "kv_cache_usage": float(live["kv_cache_usage"]),
            "num_running": float(live["num_running"]),
            "num_waiting": float(live["num_waiting"]),
            "token_rate": (tokens - before) / (now - then) if now > then else 0.0,
            # with num_running: the inter-token latency, the policy's compute signal
            "generation_rate": (generated - generated_before) / (now - then) if now > then else 0.0,
        }
        out.update(self._calibration())
        gpus = self._export_gpu_memory()
        if gpus:
            out["gpu_memory_used_ratio"] = max(used / total for _, used, total in gpus)
        return out

    def _export_gpu_memory(self) -> list[tuple[int, int, int]]:
        gpus = self._gpu.sample()
        for index, used, total in gpus:
            self._rec.set(metrics.GPU_MEMORY_USED, used, gpu=str(index))
            self._rec.set(metrics.GPU_MEMORY_TOTAL, total, gpu=str(index))
            self._rec.set(metrics.GPU_KV_CACHE_BYTES, self._stats.kv_cache_usage * self._planned_kv_bytes, gpu=str(index))
        return gpus

    def __del__(self) -> None:
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.shutdown()

