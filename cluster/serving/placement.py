"""Where a model replica runs: Ray Serve deployment options derived from its config.

GPU replica: one placement group per replica with one bundle per tensor ×
pipeline parallel worker, ``{"GPU": 1, "CPU": cpus_per_worker}``; the replica
actor itself (which drives vLLM's Ray executor) shares the first bundle, as Ray
Serve LLM does. CPU replica: the vLLM CPU build runs only its multiprocessing
executor, so the replica reserves one CPU per worker and binds each worker to
its core through ``VLLM_CPU_OMP_THREADS_BIND``.

Pure: no Ray import, so tests check placement without starting anything.
"""

from __future__ import annotations

from typing import Any, Sequence

from cluster.config import ModelConfig
from cluster.planning.hardware import GPU_BLOCK_SIZE, get_accelerator

REPLICA_ACTOR_CPUS = 1  # the replica process: tokenization, streaming, the engine's front end
# Seconds: a 70B engine needs minutes to load before its first health check.
HEALTH_CHECK_PERIOD_S = 10.0
HEALTH_CHECK_TIMEOUT_S = 60.0
# Draining. A stopping replica (scale-down, Serve config change, cluster upgrade) gets as long
# as its longest allowed generation takes at a pessimistic decode speed. 100 ms per token is
# 10 tokens/s per stream: an assumption, chosen slower than a full batch of the largest model
# the shipped configs serve (Llama-2-70B AWQ, TP=2 on A10G) is expected to decode; not measured.
DRAIN_MS_PER_TOKEN = 100
# Seconds on top: a full-length prompt's prefill, the engine's shutdown, the last bytes out.
DRAIN_MARGIN_S = 30
# Ray Serve runs a replica's user code on a second event loop in its own thread, and the
# handle's router on a third, by default; every streamed token then crosses threads twice.
# kvpilot's code is async throughout (AsyncLLM, the ingress) and never blocks its loop, so it
# runs on the replica's main loop and a token crosses no thread. These are Ray's own switches
# (its RAY_SERVE_THROUGHPUT_OPTIMIZED mode sets the same two).
SERVE_LOOP_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}


def worker_bundles(cfg: ModelConfig) -> list[dict[str, float]]:
    """One bundle per engine worker (GPU configs only); the first also holds the replica actor."""
    accel = get_accelerator(cfg.accelerator)
    bundle: dict[str, float] = {"GPU": 1, "CPU": cfg.cpus_per_worker}
    if accel.ray_type:
        # Ray labels each node with its GPU type; a sliver of that resource pins the GPU model.
        bundle[f"accelerator_type:{accel.ray_type}"] = 0.001
    bundles = [dict(bundle) for _ in range(cfg.world_size)]
    bundles[0]["CPU"] += REPLICA_ACTOR_CPUS
    return bundles


def longest_generation_tokens(cfg: ModelConfig) -> int:
    """Most tokens one request can keep a replica busy for: max_model_len bounds prompt +
    output, ``limits.max_tokens`` (when set and smaller) bounds the output."""
    tokens = cfg.effective_max_model_len()
    if cfg.limits.max_tokens is not None:
        tokens = min(tokens, cfg.limits.max_tokens)
    return tokens


def graceful_shutdown_s(cfg: ModelConfig) -> int:
    """Seconds a stopping replica waits for its streams to finish (Serve's
    ``graceful_shutdown_timeout_s``); the Helm chart derives the pods' grace periods from it.

    Example: max_model_len 4096 -> ceil(4096 × 100 ms) + 30 s = 440 s.
    """
    drain_ms = longest_generation_tokens(cfg) * DRAIN_MS_PER_TOKEN
    return -(-drain_ms // 1000) + DRAIN_MARGIN_S


def ingress_options(models: Sequence[ModelConfig]) -> dict[str, int]:
    """The ingress relays every stream, so a stopping ingress replica (an upgrade, a scale-down)
    waits as long as the longest model drain; Serve's default of 20 s would cut long streams."""
    return {"graceful_shutdown_timeout_s": max(graceful_shutdown_s(m) for m in models)}


def cpu_threads_bind(cfg: ModelConfig) -> str:
    """vLLM CPU core binding: one core per TP worker ("0|1"), vLLM's own choice for one worker."""
    if cfg.world_size == 1:
        return "auto"
    return "|".join(str(i) for i in range(cfg.world_size))


# Requests per engine slot: what a replica takes at once, and the ingress's default in-flight
# bound per slot (limits.max_queued_requests): a few batches' worth may wait in the engine.
ONGOING_PER_SLOT = 4
ROUTER_CLASS = "deployments.router:KVPilotRouter"
AUTOSCALER_CLASS = "deployments.autoscaling:KVPilotAutoscaler"


def deployment_options(cfg: ModelConfig, kv_capacity_tokens: int = 0, block_tokens: int = GPU_BLOCK_SIZE) -> dict[str, Any]:
    """Ray Serve ``.options(...)`` for the model's deployment.

    ``kv_capacity_tokens`` and ``block_tokens`` come from the model's memory plan: the
    router sizes its prefix index per replica with them.
    """
    opts: dict[str, Any] = {
        "name": deployment_name(cfg.name),
        "request_router_config": _router_config(cfg, kv_capacity_tokens, block_tokens),
        # Serve's router holds back a request (with growing backoff) when every replica has this
        # many; with the bound at max_num_seqs, a burst as large as the engine's slots waited
        # seconds for a slot freed milliseconds before. Beyond the slots, requests wait in the
        # engine's own FIFO queue, which the router sees (num_waiting) and the ingress bounds.
        "max_ongoing_requests": ONGOING_PER_SLOT * cfg.max_num_seqs,
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        "health_check_timeout_s": HEALTH_CHECK_TIMEOUT_S,
        "graceful_shutdown_timeout_s": graceful_shutdown_s(cfg),
    }
    if cfg.min_replicas == cfg.max_replicas:
        opts["num_replicas"] = cfg.min_replicas
    else:
        opts["autoscaling_config"] = _autoscaling_config(cfg, kv_capacity_tokens)
    opts.update(_actor_options(cfg))
    return opts


def _router_config(cfg: ModelConfig, kv_capacity_tokens: int, block_tokens: int) -> dict[str, Any]:
    """Serve's ``request_router_config``: kvpilot's router with the model's routing policy."""
    return {
        "request_router_class": ROUTER_CLASS,
        "request_router_kwargs": {
            "model": cfg.name,
            "policy": cfg.routing.policy,
            "params": dict(cfg.routing.params),
            "kv_capacity_tokens": kv_capacity_tokens,
            "block_tokens": block_tokens,
            "max_index_blocks": cfg.routing.max_index_blocks,
            # The engine's slots (batch, LoRA): a policy that prices the wait for one gets them.
            "engine": {"max_num_seqs": cfg.max_num_seqs, "max_loras": cfg.lora.max_loras if cfg.lora else 0},
        },
        "request_routing_stats_period_s": cfg.routing.stats_period_s,
    }


def _autoscaling_config(cfg: ModelConfig, kv_capacity_tokens: int) -> dict[str, Any]:
    """Serve's ``autoscaling_config``: kvpilot's policy between ``min_replicas`` and ``max_replicas``."""
    a = cfg.autoscaling
    return {
        "min_replicas": cfg.min_replicas,
        "max_replicas": cfg.max_replicas,
        "metrics_interval_s": a.metrics_interval_s,
        "look_back_period_s": 2 * a.metrics_interval_s,
        # kvpilot's policy keeps its own delays; Serve's would stack on top of them.
        "upscale_delay_s": 0.0,
        "downscale_delay_s": 0.0,
        "policy": {
            "policy_function": AUTOSCALER_CLASS,
            "policy_kwargs": {
                "model": cfg.name,
                "config": a.model_dump(),
                "kv_capacity_tokens": kv_capacity_tokens,
                "min_replicas": cfg.min_replicas,
                "max_replicas": cfg.max_replicas,
            },
        },
    }


def _actor_options(cfg: ModelConfig) -> dict[str, Any]:
    """The replica actor's resources and environment; on GPUs, the workers' placement group."""
    # vLLM mounts /v1/load_lora_adapter and /v1/unload_lora_adapter only with this switch; the
    # ingress lets only admin keys reach them.
    lora_env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"} if cfg.lora is not None else {}
    if get_accelerator(cfg.accelerator).is_gpu:
        return {
            "ray_actor_options": {"num_cpus": REPLICA_ACTOR_CPUS, "num_gpus": 0,
                                  "runtime_env": {"env_vars": {**SERVE_LOOP_ENV, **lora_env}}},
            "placement_group_bundles": worker_bundles(cfg),
            "placement_group_strategy": cfg.placement_strategy,
        }
    return {
        "ray_actor_options": {
            "num_cpus": cfg.world_size,
            "runtime_env": {"env_vars": {**SERVE_LOOP_ENV, "VLLM_CPU_OMP_THREADS_BIND": cpu_threads_bind(cfg),
                                         **lora_env}},
        },
    }


def deployment_name(model_name: str) -> str:
    """Serve deployment names may not contain '/', which hub-style model ids do."""
    return "model-" + model_name.replace("/", "--")
