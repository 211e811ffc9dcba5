"""The model deployment: each replica owns one vLLM ``AsyncLLM``.

Undecorated on purpose: ``deployments/app.py`` turns it into a Serve deployment
with options from ``cluster.placement.deployment_options(model)``.

A replica streams plain dicts to the ingress, one per engine step:

    {"prompt_tokens": 12}                                   first
    {"choices": [{"index", "text", "num_tokens", "logprobs", "finish_reason"}]}
    {"error": {"message", "type", "param", "code"}, "status": 400}   instead of the above

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


class RequestRejected(ValueError):
    """A request the engine must not see; becomes a 4xx OpenAI error at the ingress."""

    def __init__(self, message: str, param: str | None, code: str):
        super().__init__(message)
        self.param = param
        self.code = code

    def to_event(self) -> dict[str, Any]:
        err = {"message": str(self), "type": "invalid_request_error", "param": self.param, "code": self.code}
        return {"error": err, "status": 400}


class ModelServer:
    """One replica of one model: a vLLM engine, its tokenizer, and its live stats."""

    def __init__(self, model: ModelConfig, engine_factory: Callable[[ModelConfig, EngineStats], Any] = start_vllm_engine):
        self._model = model
        self._stats = EngineStats()
        started = time.monotonic()
        self._engine = engine_factory(model, self._stats)
        self._tokenizer = self._engine.get_tokenizer()
        self._max_model_len = model.effective_max_model_len()
        logger.info("model %s: engine ready in %.1f s", model.name, time.monotonic() - started)

    # --- requests --------------------------------------------------------

    def _prompt_ids(self, req: GenerationRequest) -> list[int]:
        if req.messages is not None:
            if getattr(self._tokenizer, "chat_template", None) is None:
                raise RequestRejected(f"model {self._model.name} has no chat template", "messages", "no_chat_template")
            text = self._tokenizer.apply_chat_template(req.messages, tokenize=False, add_generation_prompt=True)
            return self._tokenizer.encode(text, add_special_tokens=False)
        if isinstance(req.prompt, str):
            return self._tokenizer.encode(req.prompt)
        assert req.prompt is not None
        vocab = len(self._tokenizer)
        bad = [t for t in req.prompt if not 0 <= t < vocab]
        if bad:
            raise RequestRejected(f"token id {bad[0]} is outside the vocabulary (size {vocab})", "prompt", "invalid_token")
        return list(req.prompt)

    def _sampling_params(self, req: GenerationRequest, n_prompt: int) -> Any:
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        room = self._max_model_len - n_prompt
        if room <= 0 or (req.max_tokens is not None and req.max_tokens > room):
            asked = f" + max_tokens {req.max_tokens}" if req.max_tokens is not None else ""
            raise RequestRejected(
                f"this model's maximum context length is {self._max_model_len} tokens; the prompt has "
                f"{n_prompt} tokens{asked}",
                "max_tokens" if room > 0 else "messages" if req.messages is not None else "prompt",
                "context_length_exceeded",
            )
        s = req.sampling
        return SamplingParams(
            n=s["n"],
            temperature=s["temperature"],
            top_p=s["top_p"],
            stop=s["stop"],
            seed=s["seed"],
            presence_penalty=s["presence_penalty"],
            frequency_penalty=s["frequency_penalty"],
            ignore_eos=s["ignore_eos"],
            max_tokens=req.max_tokens if req.max_tokens is not None else room,
            logprobs=req.logprobs,
            output_kind=RequestOutputKind.DELTA,
        )

    async def generate(self, req: GenerationRequest) -> AsyncIterator[dict[str, Any]]:
        """Stream one request's outputs (see the module docstring for the events)."""
        try:
            prompt_ids = self._prompt_ids(req)
            params = self._sampling_params(req, len(prompt_ids))
        except RequestRejected as e:
            yield e.to_event()
            return
        yield {"prompt_tokens": len(prompt_ids)}
        # On cancellation (client gone) vLLM's generate() aborts the request in the engine.
        async for out in self._engine.generate({"prompt_token_ids": prompt_ids}, params, req.request_id):
            choices = [_choice_delta(c, req.logprobs) for c in out.outputs]
            if any(c["num_tokens"] or c["finish_reason"] for c in choices):
                yield {"choices": choices}

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
