"""Every metric kvpilot exports, defined once.

Names follow Prometheus conventions (base units, ``_seconds``, ``_bytes``,
``_ratio``, counters end in ``_total``). The components record them through
Ray's metrics API (``ray.util.metrics``), which every Ray node serves on its
metrics export port (8080 in the chart, ``ray start --metrics-export-port``);
Ray prepends ``ray_`` to each name, so Prometheus sees ``ray_kvpilot_...``.
``exported_name`` gives that name; dashboards and tests use it.

Labels: ``model`` (served model name), ``replica`` (Serve replica id),
``gpu`` (NVML index), ``policy`` (routing policy), ``code`` (HTTP status),
``kind`` (error kind), ``reason`` (autoscaling decision reason), ``adapter`` (LoRA
adapter name: the configured ones and those loaded at run time), ``source`` (where a
calibration fact came from: ``override`` in the config, ``measured`` by the replicas,
``plan`` estimate, or ``learned`` from traffic).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

RAY_PREFIX = "ray_"

# Latency buckets, seconds: sub-10 ms ITL on small models up to minutes of queueing.
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# Ray refuses a histogram boundary <= 0, so "no match at all" is the le="0.01" bucket.
RATIO_BUCKETS = (0.01, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@dataclass(frozen=True)
class Metric:
    name: str
    kind: Literal["counter", "gauge", "histogram"]
    description: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not (self.name + self.description).isascii():  # Ray's Cython layer encodes them as ASCII
            raise ValueError(f"{self.name}: name and description must be ASCII")
        # Checked here, not when the first value is recorded in a live router: Ray's Histogram
        # raises on a boundary <= 0, and there that error failed the request being routed.
        if self.kind == "histogram":
            b = self.buckets or ()
            if not b or b[0] <= 0 or any(x >= y for x, y in zip(b, b[1:])):
                raise ValueError(f"{self.name}: buckets {b} must be positive and strictly increasing")
        elif self.buckets is not None:
            raise ValueError(f"{self.name}: only a histogram has buckets, not a {self.kind}")


def exported_name(m: Metric, series: str = "") -> str:
    """The name Prometheus stores: Ray's prefix, plus ``_bucket``/``_sum``/``_count`` for histograms."""
    return RAY_PREFIX + m.name + series


_ENGINE = ("model", "replica")

# --- engine (per replica), recorded by the replica's vLLM stat logger ------
ENGINE_KV_CACHE_USAGE = Metric("kvpilot_engine_kv_cache_usage_ratio", "gauge", "Fraction of KV cache blocks in use.", _ENGINE)
ENGINE_RUNNING = Metric("kvpilot_engine_requests_running", "gauge", "Requests in the engine's running batch.", _ENGINE)
ENGINE_WAITING = Metric("kvpilot_engine_requests_waiting", "gauge", "Requests waiting in the engine's queue.", _ENGINE)
ENGINE_PREEMPTIONS = Metric("kvpilot_engine_preemptions_total", "counter", "Requests preempted (KV cache full).", _ENGINE)
ENGINE_PREFIX_QUERIES = Metric(
    "kvpilot_engine_prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.", _ENGINE
)
ENGINE_PREFIX_HITS = Metric(
    "kvpilot_engine_prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache.", _ENGINE
)
ENGINE_PROMPT_TOKENS = Metric("kvpilot_engine_prompt_tokens_total", "counter", "Prompt tokens processed.", _ENGINE)
ENGINE_GENERATION_TOKENS = Metric("kvpilot_engine_generation_tokens_total", "counter", "Tokens generated.", _ENGINE)
ENGINE_REQUESTS_FINISHED = Metric(
    "kvpilot_engine_requests_finished_total", "counter", "Requests the engine finished, by finish reason.",
    (*_ENGINE, "reason"),
)
ENGINE_TTFT = Metric(
    "kvpilot_engine_time_to_first_token_seconds", "histogram", "Time from arrival to first token.", _ENGINE,
    LATENCY_BUCKETS_S,
)
ENGINE_ITL = Metric(
    "kvpilot_engine_inter_token_latency_seconds", "histogram", "Time between consecutive output tokens.", _ENGINE,
    LATENCY_BUCKETS_S,
)
ENGINE_E2E = Metric(
    "kvpilot_engine_e2e_request_latency_seconds", "histogram", "Time from arrival to the last token.", _ENGINE,
    LATENCY_BUCKETS_S,
)

# --- GPU memory (per GPU of a replica), from NVML; absent on machines without GPUs --
_GPU = ("model", "replica", "gpu")
GPU_MEMORY_USED = Metric("kvpilot_gpu_memory_used_bytes", "gauge", "GPU memory in use (NVML).", _GPU)
GPU_MEMORY_TOTAL = Metric("kvpilot_gpu_memory_total_bytes", "gauge", "GPU memory in total (NVML).", _GPU)
GPU_KV_CACHE_BYTES = Metric(
    "kvpilot_gpu_kv_cache_used_bytes", "gauge", "KV cache bytes in use on the GPU (usage x planned KV bytes).", _GPU
)
ENGINE_ITL_FLOOR = Metric(
    "kvpilot_engine_itl_floor_seconds", "gauge", "Decode step time at batch 1 the replica measured of its engine.",
    _ENGINE,
)
ENGINE_PREFILL_RATE = Metric(
    "kvpilot_engine_prefill_tokens_per_second", "gauge", "Prefill speed (uncached prompt tokens/s) the replica "
    "measured of its engine.", _ENGINE,
)
ENGINE_KV_CAPACITY = Metric(
    "kvpilot_engine_kv_capacity_tokens", "gauge", "KV cache tokens the engine allocated (blocks x block size).", _ENGINE
)

# --- LoRA adapters (per replica), recorded by the model replica ------------------
_ADAPTER = (*_ENGINE, "adapter")
LORA_REQUESTS = Metric(
    "kvpilot_lora_requests_total", "counter", "Requests served with a LoRA adapter, by adapter.", _ADAPTER
)
LORA_PROMPT_TOKENS = Metric(
    "kvpilot_lora_prompt_tokens_total", "counter", "Prompt tokens of requests with a LoRA adapter.", _ADAPTER
)
LORA_GENERATION_TOKENS = Metric(
    "kvpilot_lora_generation_tokens_total", "counter", "Tokens generated with a LoRA adapter.", _ADAPTER
)
LORA_LOADS = Metric(
    "kvpilot_lora_adapter_loads_total", "counter", "Adapters loaded into the engine's adapter cache "
    "(preloads, first uses, reloads after an eviction).", _ENGINE,
)
LORA_EVICTIONS = Metric(
    "kvpilot_lora_adapter_evictions_total", "counter", "Adapters the engine dropped from its adapter cache "
    "(max_cpu_loras full) or unloaded.", _ENGINE,
)
LORA_RESIDENT = Metric(
    "kvpilot_lora_adapters_resident", "gauge", "Adapters in the engine's adapter cache.", _ENGINE
)

# --- router (in the ingress process) -----------------------------------------
ROUTER_DECISIONS = Metric(
    "kvpilot_router_decisions_total", "counter", "Requests routed, by policy and chosen replica.",
    ("model", "policy", "replica"),
)
ROUTER_PREFIX_MATCH = Metric(
    "kvpilot_router_prefix_match_ratio", "histogram", "Share of the prompt's blocks cached on the chosen replica "
    "(router's index).", ("model", "policy"), RATIO_BUCKETS,
)
ROUTER_DECISION_SECONDS = Metric(
    "kvpilot_router_decision_seconds", "histogram", "Time to choose a replica for one request (hashing its prompt blocks, ranking).", ("model", "policy"),
    (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3),
)
ROUTER_TOKENS_IN_FLIGHT = Metric(
    "kvpilot_router_tokens_in_flight", "gauge", "Prompt + decode-budget tokens the router has outstanding per replica.",
    ("model", "replica"),
)
ROUTER_PREFILL_RATE = Metric(
    "kvpilot_router_prefill_tokens_per_second", "gauge", "Prefill speed the routing policy uses per replica, by "
    "source (override, measured, plan).", ("model", "policy", "replica", "source"),
)

# --- ingress ---------------------------------------------------------------------
INGRESS_REQUESTS = Metric(
    "kvpilot_ingress_requests_total", "counter", "HTTP requests answered, by model and status code.", ("model", "code")
)
INGRESS_ERRORS = Metric(
    "kvpilot_ingress_errors_total", "counter", "Requests refused or failed, by error code.", ("model", "kind")
)

# --- autoscaler (in the Serve controller) ---------------------------------------
_SCALE = ("model",)
AUTOSCALER_CURRENT = Metric("kvpilot_autoscaler_current_replicas", "gauge", "Replicas running.", _SCALE)
AUTOSCALER_DESIRED = Metric("kvpilot_autoscaler_desired_replicas", "gauge", "Replicas the policy asks for.", _SCALE)
AUTOSCALER_KV_DEMAND = Metric(
    "kvpilot_autoscaler_kv_demand_ratio", "gauge",
    "Predicted KV tokens needed over the KV capacity of the current replicas.", _SCALE,
)
AUTOSCALER_DECISIONS = Metric(
    "kvpilot_autoscaler_decisions_total", "counter", "Scaling decisions, by reason.", (*_SCALE, "reason")
)
AUTOSCALER_ITL_FLOOR = Metric(
    "kvpilot_autoscaler_itl_floor_seconds", "gauge", "ITL floor the autoscaler's compute signal uses, by source "
    "(override, measured, learned).", (*_SCALE, "source"),
)

ALL: tuple[Metric, ...] = tuple(v for v in list(globals().values()) if isinstance(v, Metric))
