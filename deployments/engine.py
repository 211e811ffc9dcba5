"""The model deployment: each replica owns one vLLM ``AsyncLLM``.

Undecorated on purpose: ``deployments/app.py`` turns it into a Serve deployment
with options from ``cluster.placement.deployment_options(model)``.

A replica streams plain dicts to the ingress, one per engine step that produced tokens:

    {"choices": [{"index", "text", "num_tokens", "logprobs", "finish_reason"}], "cached_tokens": 0}

(``cached_tokens``, the prompt tokens vLLM found in its prefix cache, rides on the first.)

Cancelling the stream (the client went away) aborts the engine request, which
frees its slot in the engine's batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from typing import Any

from cluster.config import ModelConfig
from deployments.protocol import GenerationRequest

logger = logging.getLogger("kvpilot.engine")


@dataclass
class EngineStats:
    """The engine's live load, updated by a vLLM stat logger on every engine step."""

    kv_cache_usage: float = 0.0
    num_running: int = 0
    num_waiting: int = 0
    prefix_cache_queries: int = 0  # tokens looked up, cumulative
    prefix_cache_hits: int = 0  # tokens found, cumulative
    generation_tokens: int = 0  # tokens generated, cumulative
    updated_at: float = 0.0


def _stat_logger_factory(stats: EngineStats) -> Callable[..., Any]:
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _ReplicaStatLogger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0):
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):  # noqa: ANN001
            if iteration_stats is not None:
                stats.generation_tokens += iteration_stats.num_generation_tokens
            if scheduler_stats is None:
                return
            stats.kv_cache_usage = scheduler_stats.kv_cache_usage
            stats.num_running = scheduler_stats.num_running_reqs
            stats.num_waiting = scheduler_stats.num_waiting_reqs
            pcs = scheduler_stats.prefix_cache_stats
            if pcs is not None:
                stats.prefix_cache_queries += pcs.queries
                stats.prefix_cache_hits += pcs.hits
            stats.updated_at = time.time()

        def log_engine_initialized(self) -> None:
            pass

    return _ReplicaStatLogger


def start_vllm_engine(model: ModelConfig, stats: EngineStats) -> Any:
    """Build the replica's AsyncLLM from the config; on GPUs, inside this replica's placement group."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.executor.abstract import Executor

    kwargs = model.engine_args()
    if not model.on_cpu:
        # The workers go into this replica's bundles through vLLM's Ray executor.
        kwargs["distributed_executor_backend"] = "ray"
    args = AsyncEngineArgs(**kwargs, disable_log_stats=False)
    vllm_config = args.create_engine_config(UsageContext.OPENAI_API_SERVER)
    if not model.on_cpu:
        import ray.util

        vllm_config.parallel_config.placement_group = ray.util.get_current_placement_group()
    return AsyncLLM(
        vllm_config=vllm_config,
        executor_class=Executor.get_class(vllm_config),
        log_stats=True,
        log_requests=False,
        usage_context=UsageContext.OPENAI_API_SERVER,
        stat_loggers=[_stat_logger_factory(stats)],
    )


class ModelServer:
    """One replica of one model: a vLLM engine, its tokenizer, and its live stats."""

    def __init__(self, model: ModelConfig, engine_factory: Callable[[ModelConfig, EngineStats], Any] = start_vllm_engine):
        self._model = model
        self._stats = EngineStats()
        started = time.monotonic()
        self._engine = engine_factory(model, self._stats)
        logger.info("model %s: engine ready in %.1f s", model.name, time.monotonic() - started)

    # --- requests --------------------------------------------------------

    async def generate(self, req: GenerationRequest) -> AsyncIterator[dict[str, Any]]:
        """Stream one request's outputs (see the module docstring for the events).

        The ingress has tokenized the prompt and checked it against max_model_len.
        """
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        s = req.sampling
        params = SamplingParams(
            n=s["n"],
            temperature=s["temperature"],
            top_p=s["top_p"],
            stop=s["stop"],
            seed=s["seed"],
            presence_penalty=s["presence_penalty"],
            frequency_penalty=s["frequency_penalty"],
            ignore_eos=s["ignore_eos"],
            max_tokens=req.max_tokens,
            logprobs=req.logprobs,
            output_kind=RequestOutputKind.DELTA,
        )
        cached_reported = False
        # On cancellation (client gone) vLLM's generate() aborts the request in the engine.
        async for out in self._engine.generate({"prompt_token_ids": req.prompt_token_ids}, params, req.request_id):
            choices = [_choice_delta(c, req.logprobs) for c in out.outputs]
            if not any(c["num_tokens"] or c["finish_reason"] for c in choices):
                continue
            event: dict[str, Any] = {"choices": choices}
            if not cached_reported and out.num_cached_tokens is not None:
                event["cached_tokens"] = out.num_cached_tokens  # prompt tokens served from the prefix cache
                cached_reported = True
            yield event

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
        return {**asdict(self._stats), "unfinished_requests": self._engine.get_num_unfinished_requests()}

    def record_routing_stats(self) -> dict[str, Any]:
        return self.stats()

    def __del__(self) -> None:
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.shutdown()


def _choice_delta(c: Any, logprobs: int | None) -> dict[str, Any]:
    delta: dict[str, Any] = {
        "index": c.index,
        "text": c.text,
        "num_tokens": len(c.token_ids),
        "finish_reason": c.finish_reason,
        "logprobs": None,
    }
    if logprobs is not None and c.logprobs is not None:
        tokens, token_lps, tops = [], [], []
        for tid, entries in zip(c.token_ids, c.logprobs):
            chosen = entries[tid]
            tokens.append(chosen.decoded_token or "")
            token_lps.append(chosen.logprob)
            tops.append(
                {
                    (lp.decoded_token or ""): lp.logprob
                    for lp in sorted(entries.values(), key=lambda lp: lp.rank or 0)
                    if lp.rank is not None and lp.rank <= logprobs
                }
            )
        delta["logprobs"] = {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops}
    return delta
