"""The one config object: the ``args:`` of kvpilot's application in a Serve config file.

Example (``configs/llama70b-awq.yaml``)::

    applications:
    - name: kvpilot
      route_prefix: /
      import_path: deployments.app:build_app
      args:
        models:
        - name: llama-2-70b-awq
          source: TheBloke/Llama-2-70B-AWQ
          quantization: awq
          accelerator: A10G
          tensor_parallel_size: 2
          gpu_memory_utilization: 0.95
          max_model_len: 4096

Every error names the YAML path and the value. Derived facts (the model's
architecture, the memory plan) are computed from this object, never written
back into it.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cluster.planning.hardware import CATALOG, GIB, QUANTIZATIONS, get_accelerator, quantization_support
from cluster.planning.modelspec import ModelSpec, load_spec
from cluster.routing.policies import DEFAULT_POLICY, POLICIES, make_policy
from cluster.vllm_args import engine_arg_names

APP_IMPORT_PATH = "deployments.app:build_app"

# Methods vLLM dropped, with what to use instead.
REMOVED_QUANTIZATIONS = {
    "squeezellm": "SqueezeLLM was removed from vLLM in September 2024 (vllm-project/vllm#8220); "
    "use awq or gptq for 4-bit weights, or fp8/int8 for 8-bit",
}

# vLLM's quantization argument for each kvpilot method (int8 is compressed-tensors W8A8).
VLLM_QUANTIZATION: dict[str, str | None] = {
    "auto": None,  # vLLM reads the checkpoint's quantization_config itself
    "compressed-tensors": "compressed-tensors",
    "modelopt": "modelopt",
    "modelopt_fp4": "modelopt_fp4",
    "mxfp4": "mxfp4",
    "none": None,
    "awq": "awq",
    "gptq": "gptq",
    "fp8": "fp8",
    "int8": "compressed-tensors",
    "bitsandbytes": "bitsandbytes",
}

DEFAULT_CPU_KV_CACHE_SPACE_GIB = 1.0  # small enough for a 2-core, few-GiB laptop
DEFAULT_GPU_MEMORY_UTILIZATION = 0.92  # vLLM 0.32's own default


class FieldError(ValueError):
    """A cross-field check failed on one named field; the formatter appends it to the path."""

    def __init__(self, field: str, value: Any, message: str):
        self.field = field
        self.value = value
        self.detail = f"{value!r} {message}"
        super().__init__(f"{field}: {self.detail}")


class ConfigError(ValueError):
    """One or more config errors, each ``path: value message``."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("\n".join(errors))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RoutingConfig(_Strict):
    """How requests for one model pick a replica.

    Example::

        routing:
          policy: kvpilot        # or round_robin, pow2, least_kv, prefix_affinity, llmd, dynamo, sglang
          params: {load_weight: 1.0}
          stats_period_s: 1.0
    """

    policy: str = Field(default=DEFAULT_POLICY, description=f"Routing policy: one of {', '.join(POLICIES)}.")
    params: dict[str, Any] = Field(default_factory=dict, description="Keyword parameters of the policy.")
    stats_period_s: float = Field(
        default=1.0, gt=0.0, le=60.0,
        description="Seconds between each replica's engine-stats reports to the router (Ray's default is 10).",
    )
    max_index_blocks: int = Field(
        default=1_000_000, ge=1_000, le=100_000_000,
        description="Bound on the router's prefix index, in KV blocks (about 200 bytes each).",
    )

    @model_validator(mode="after")
    def _known_policy(self) -> RoutingConfig:
        if self.policy not in POLICIES:
            raise FieldError("policy", self.policy, f"is not a routing policy; choose one of {', '.join(POLICIES)}")
        try:
            make_policy(self.policy, self.params)
        except (ValueError, TypeError) as e:
            raise FieldError("params", self.params, f"refused: {e}") from e
        return self


class AutoscalingConfig(_Strict):
    """KV-memory autoscaling of one model between ``min_replicas`` and ``max_replicas``.

    Example::

        min_replicas: 0
        max_replicas: 4
        autoscaling:
          target_kv_usage: 0.7
          downscale_delay_s: 300
          startup_s: 180        # how long a new replica takes to serve (a 70B model: minutes)
    """

    target_kv_usage: float = Field(
        default=0.7, gt=0.05, lt=1.0, description="KV-cache usage per replica the policy sizes for."
    )
    high_kv_usage: float = Field(
        default=0.9, gt=0.05, le=1.0, description="KV usage that counts as pressure (scale up if sustained)."
    )
    upscale_sustained_s: float = Field(
        default=10.0, ge=0.0, le=3600.0, description="Seconds of pressure before adding a replica."
    )
    downscale_delay_s: float = Field(
        default=300.0, ge=0.0, le=86400.0, description="Seconds demand must stay low before removing a replica."
    )
    startup_s: float = Field(
        default=120.0, ge=0.0, le=3600.0,
        description="Seconds a new replica takes to serve: demand is predicted this far ahead.",
    )
    trend_window_s: float = Field(
        default=60.0, gt=0.0, le=3600.0, description="Seconds of history the demand growth rate is fitted over."
    )
    target_compute_usage: float = Field(
        default=0.7, gt=0.05, lt=1.0,
        description="Decode compute usage per replica the policy sizes for: 1 − (lowest inter-token latency seen) / "
        "(inter-token latency over trend_window_s), the latency estimated as running sequences / generated tokens per second.",
    )
    itl_floor_s: float | None = Field(
        default=None, gt=0.0, le=60.0,
        description="Override: inter-token latency of one replica with a single sequence (its step cost). Default: "
        "what the replicas measure of their engines (decode steps at low batch, cluster/serving/calibration.py), or before "
        "any measurement the lowest seen over a half-full trend_window_s window.",
    )
    high_waiting_per_replica: float = Field(
        default=0.5, gt=0.0, le=1000.0,
        description="Requests waiting in the engines per serving replica, averaged over trend_window_s, "
        "that count as pressure (scale up if sustained; no scale-down while above).",
    )
    idle_to_zero_s: float = Field(
        default=600.0, gt=0.0, le=86400.0, description="Seconds without traffic before scaling to zero (min_replicas 0)."
    )
    metrics_interval_s: float = Field(
        default=2.0, gt=0.0, le=60.0, description="Seconds between replica reports and policy runs."
    )

    @model_validator(mode="after")
    def _thresholds(self) -> AutoscalingConfig:
        if self.high_kv_usage <= self.target_kv_usage:
            raise FieldError("high_kv_usage", self.high_kv_usage, f"must exceed target_kv_usage {self.target_kv_usage}")
        return self


class ModelLimits(_Strict):
    """Per-model bounds the ingress enforces before the engine sees a request (400 or 503).

    Example::

        limits:
          max_prompt_tokens: 3072      # longer prompts get 400 prompt_too_long
          max_tokens: 1024             # larger max_tokens gets 400; the default when a request omits it
          max_queued_requests: 256     # in flight at the ingress for this model; beyond: 503 + Retry-After
          first_token_timeout_s: 900   # no first token by then (no replica ready, queue too long): 503
    """

    max_prompt_tokens: int | None = Field(
        default=None, ge=1, le=10_000_000,
        description="Most prompt tokens a request may carry; default: bounded only by max_model_len.",
    )
    max_tokens: int | None = Field(
        default=None, ge=1, le=10_000_000,
        description="Most output tokens a request may ask for (per choice); also the default when it asks none.",
    )
    max_queued_requests: int | None = Field(
        default=None, ge=1, le=1_000_000,
        description="Requests in flight at the ingress for this model beyond which new ones get 503; "
        "default: 4 × max_num_seqs × max_replicas.",
    )
    first_token_timeout_s: float = Field(
        default=900.0, gt=0, le=86_400,
        description="Seconds a request may wait for its first token, including for a replica to start when the "
        "model is scaled to zero; then 503 + Retry-After. Set it above the model's load time.",
    )


class IngressConfig(_Strict):
    """The OpenAI endpoint's front door: API keys, per-key rate limits, body size, retries.

    Example::

        ingress:
          auth: required                        # auto: on when any key is configured; off: never
          api_keys_file: /etc/kvpilot/api-keys  # one key per line (a mounted Kubernetes Secret)
          requests_per_minute: 600              # per key
          tokens_per_minute: 200000             # per key: prompt + n × max_tokens, unused output refunded
          max_body_bytes: 4194304
          body_timeout_s: 30                    # the whole body by then, or 408 (a client trickling it)
          replica_retries: 2

    Keys also come from the ``KVPILOT_API_KEYS`` environment variable (comma-separated), which
    the Helm chart sets from its Secret. Keys are never written in this config.
    """

    auth: Literal["auto", "required", "off"] = Field(
        default="auto",
        description="auto: check keys when any is configured; required: refuse to start without keys; off: never.",
    )
    api_keys_file: str | None = Field(
        default=None, min_length=1,
        description="File of API keys (one per line or comma-separated, # comments), read by the ingress at start.",
    )
    admin_api_keys_file: str | None = Field(
        default=None, min_length=1,
        description="File of admin API keys (same format; also KVPILOT_ADMIN_API_KEYS): they are accepted keys "
        "that may also load and unload LoRA adapters (/v1/load_lora_adapter, /v1/unload_lora_adapter).",
    )
    requests_per_minute: int | None = Field(
        default=None, ge=1, le=10_000_000, description="Requests per minute per API key (token bucket); none: unlimited."
    )
    tokens_per_minute: int | None = Field(
        default=None, ge=1, le=10_000_000_000,
        description="Tokens per minute per API key, prompt + n × max_tokens charged up front; none: unlimited.",
    )
    max_body_bytes: int = Field(
        default=4 * 2**20, ge=1024, le=256 * 2**20, description="Largest request body in bytes; larger gets 413."
    )
    body_timeout_s: float = Field(
        default=30.0, gt=0, le=3600,
        description="Seconds the ingress waits for a request's whole body; a slower client gets 408 and holds "
        "nothing (no rate budget, no engine slot) beyond it.",
    )
    replica_retries: int = Field(
        default=2, ge=0, le=5,
        description="Times a request is resubmitted to another replica when its replica dies before the first token.",
    )

    @model_validator(mode="after")
    def _keys_with_auth(self) -> IngressConfig:
        if self.auth == "off" and self.api_keys_file is not None:
            raise FieldError("api_keys_file", self.api_keys_file, "is set but auth is off; remove one of them")
        if self.auth == "off" and self.admin_api_keys_file is not None:
            raise FieldError("admin_api_keys_file", self.admin_api_keys_file, "is set but auth is off; remove one of them")
        return self


class OpenAIConfig(_Strict):
    """How vLLM's own OpenAI layer renders and parses this model's requests (checked against vLLM at start).

    Example::

        openai:
          chat_template: templates/llama3.jinja   # a file, or the template inline; default: the tokenizer's
          tool_call_parser: llama3_json           # turns on tools with tool_choice "auto"
          reasoning_parser: deepseek_r1
          structured_outputs_backend: xgrammar
          disable_any_whitespace: false
    """

    chat_template: str | None = Field(
        default=None, min_length=1,
        description="Chat template: a file path or the Jinja template itself; default: the tokenizer's own.",
    )
    tool_call_parser: str | None = Field(
        default=None, min_length=1,
        description="vLLM tool-call parser for this model's output (e.g. hermes, llama3_json); enables "
        "tool_choice auto. Named and required tool choices work with any parser.",
    )
    reasoning_parser: str | None = Field(
        default=None, min_length=1, description="vLLM reasoning parser (e.g. deepseek_r1, qwen3); default: none."
    )
    structured_outputs_backend: Literal["auto", "xgrammar", "guidance", "outlines", "lm-format-enforcer"] = Field(
        default="auto", description="Engine for response_format and forced tool calls."
    )
    disable_any_whitespace: bool = Field(
        default=False,
        description="Structured outputs emit compact JSON (no free whitespace between tokens): keeps small or "
        "weak models from padding forced JSON with whitespace. xgrammar and guidance only.",
    )

    @model_validator(mode="after")
    def _whitespace_backend(self) -> OpenAIConfig:
        if self.disable_any_whitespace and self.structured_outputs_backend not in ("xgrammar", "guidance"):
            raise FieldError("structured_outputs_backend", self.structured_outputs_backend,
                             "must be xgrammar or guidance when disable_any_whitespace is true")
        return self


class LoraConfig(_Strict):
    """LoRA adapters served on this model's base (vLLM multi-LoRA); ``model`` in a request may name one.

    Example::

        lora:
          adapters:                      # name -> local PEFT directory or hub id
            sql: /models/adapters/sql
            chat: my-org/llama-chat-lora
          max_loras: 4                   # adapters in one batch (GPU slots)
          max_cpu_loras: 16              # adapters kept in host memory (default: max_loras)
          max_lora_rank: 16              # largest adapter rank (vLLM sizes its buffers for it)
          preload: [sql]                 # loaded at replica start; the others on first use

    Each adapter is checked at config time: its rank against ``max_lora_rank``, its target
    modules and tensor shapes against the base (``cluster.planning.lora``).
    """

    adapters: dict[str, str] = Field(
        default_factory=dict, description="Adapter name (what requests put in `model`) -> a local PEFT adapter "
        "directory or a hub id (ORG/NAME), resolved like model sources.",
    )
    max_loras: int = Field(default=4, ge=1, le=256, description="Adapters resident on the GPU at once (one batch).")
    max_cpu_loras: int | None = Field(
        default=None, ge=1, le=4096, description="Adapters cached in host memory; default: max_loras.",
    )
    max_lora_rank: int = Field(default=16, description="Largest adapter rank: one of 1, 8, 16, 32, 64, 128, 256, 320, 512.")
    preload: list[str] = Field(
        default_factory=list, description="Adapters every replica loads at start; the others load on first use.",
    )

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, v: dict[str, str]) -> dict[str, str]:
        import re

        for name, source in v.items():
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}", name):
                raise ValueError(f"adapter name {name!r} must be 1-128 letters, digits or ._:/- (it is a model id)")
            if not isinstance(source, str) or not source:
                raise ValueError(f"adapter {name!r}: source {source!r} must be a directory or a hub id")
        return v

    @model_validator(mode="after")
    def _lora_bounds(self) -> LoraConfig:
        from cluster.planning.lora import MAX_LORA_RANKS

        if self.max_lora_rank not in MAX_LORA_RANKS:
            raise FieldError("max_lora_rank", self.max_lora_rank,
                             f"is not a rank vLLM supports; choose one of {', '.join(map(str, MAX_LORA_RANKS))}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise FieldError("max_cpu_loras", self.max_cpu_loras, f"is below max_loras {self.max_loras}")
        for name in self.preload:
            if name not in self.adapters:
                raise FieldError("preload", name, f"is not an adapter; adapters: {', '.join(self.adapters) or 'none'}")
        if len(self.preload) > self.effective_max_cpu_loras:
            raise FieldError("preload", self.preload, f"holds {len(self.preload)} adapters, more than max_cpu_loras "
                             f"{self.effective_max_cpu_loras} keeps loaded")
        return self

    @property
    def effective_max_cpu_loras(self) -> int:
        return self.max_cpu_loras or self.max_loras


class ModelConfig(_Strict):
    """One served model: its checkpoint, quantization, parallelism and memory settings."""

    name: str = Field(
        description="The served model id: what clients put in the request's `model` field.",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$",
        max_length=128,
    )
    source: str = Field(
        description="A local model directory (with config.json) or a Hugging Face hub id (ORG/NAME), resolved with "
        "huggingface_hub (HF_TOKEN, HF_HUB_OFFLINE, HF_ENDPOINT honoured).",
    )
    revision: str | None = Field(
        default=None, min_length=1, max_length=256, pattern=r"^[A-Za-z0-9._/-]+$",
        description="Hub branch, tag or commit of source (hub ids only); the plan names the commit it resolved to.",
    )
    quantization: str = Field(
        default="auto",
        description="Weight quantization: auto (what the checkpoint's quantization_config states, else none), none, "
        "awq, gptq, fp8, int8 (compressed-tensors W8A8), compressed-tensors, modelopt, modelopt_fp4, mxfp4, "
        "bitsandbytes; fp8 and bitsandbytes on an unquantized checkpoint quantize it at load.",
    )
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2"] = Field(
        default="auto", description="KV cache element type; fp8 variants halve KV memory against 16-bit."
    )
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        default="auto", description="Activation and unquantized-weight dtype; auto takes the checkpoint's."
    )
    tensor_parallel_size: int = Field(default=1, ge=1, le=64, description="GPUs (or CPU workers) per pipeline stage.")
    pipeline_parallel_size: int = Field(default=1, ge=1, le=64, description="Pipeline stages per replica.")
    gpu_memory_utilization: float = Field(
        default=DEFAULT_GPU_MEMORY_UTILIZATION,
        gt=0.0,
        le=1.0,
        description="Fraction of each GPU's memory the engine may use (GPU accelerators only).",
    )
    cpu_kv_cache_space_gib: float = Field(
        default=DEFAULT_CPU_KV_CACHE_SPACE_GIB,
        gt=0.0,
        le=1024.0,
        description="KV cache size in GiB on the CPU engine (sets VLLM_CPU_KVCACHE_SPACE; accelerator cpu only).",
    )
    max_model_len: int | None = Field(
        default=None, ge=16, description="Longest prompt + output in tokens; default: the model's context length."
    )
    max_num_seqs: int = Field(default=256, ge=1, le=4096, description="Most sequences the engine schedules at once.")
    enable_prefix_caching: bool = Field(default=True, description="Reuse KV blocks of shared prompt prefixes.")
    accelerator: str = Field(description=f"Where each worker runs: one of {', '.join(CATALOG)}.")
    placement_strategy: Literal["PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        default="PACK",
        description="How a replica's GPU bundles spread over nodes; STRICT_PACK keeps a replica on one node.",
    )
    cpus_per_worker: int = Field(default=1, ge=1, le=64, description="CPUs reserved beside each GPU worker.")
    min_replicas: int = Field(default=1, ge=0, description="Fewest replicas (engines) of this model; 0 scales to zero.")
    max_replicas: int = Field(default=1, ge=1, le=1000, description="Most replicas (engines) of this model.")
    autoscaling: AutoscalingConfig = Field(
        default_factory=AutoscalingConfig,
        description="KV-memory autoscaling between min_replicas and max_replicas (used when they differ).",
    )
    routing: RoutingConfig = Field(default_factory=RoutingConfig, description="Replica choice for this model.")
    limits: ModelLimits = Field(default_factory=ModelLimits, description="Bounds the ingress enforces per request.")
    openai: OpenAIConfig = Field(
        default_factory=OpenAIConfig, description="Chat template, tool and reasoning parsers, structured outputs."
    )
    lora: LoraConfig | None = Field(
        default=None, description="LoRA adapters on this base: names, sources, GPU and CPU slots, preloads.",
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra vLLM EngineArgs, passed through as is; names are checked against EngineArgs.",
    )

    @field_validator("quantization")
    @classmethod
    def _known_quantization(cls, v: str) -> str:
        v = {"awq_marlin": "awq", "gptq_marlin": "gptq"}.get(v.lower(), v.lower())
        if v in REMOVED_QUANTIZATIONS:
            raise ValueError(f"{v!r}: {REMOVED_QUANTIZATIONS[v]}")
        if v not in QUANTIZATIONS:
            raise ValueError(f"{v!r} is not a supported quantization; choose one of {', '.join(QUANTIZATIONS)}")
        return v

    @field_validator("source")
    @classmethod
    def _absolute_local_path(cls, v: str) -> str:
        # Replicas run in other processes, maybe other working directories: pin local paths.
        path = Path(v).expanduser()
        return str(path.resolve()) if path.is_dir() else v

    @field_validator("accelerator")
    @classmethod
    def _known_accelerator(cls, v: str) -> str:
        get_accelerator(v)
        return v

    @field_validator("engine_kwargs")
    @classmethod
    def _engine_kwargs_names(cls, v: dict[str, Any]) -> dict[str, Any]:
        shadowed = sorted(set(v) & _FIRST_CLASS_ENGINE_FIELDS)
        if shadowed:
            raise ValueError(f"{shadowed[0]!r} is a field of its own: set it there, not in engine_kwargs")
        known = engine_arg_names()
        if known is not None:
            for key in v:
                if key not in known:
                    close = difflib.get_close_matches(key, known, n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    raise ValueError(f"{key!r} is not a vLLM EngineArgs field{hint}")
        return v

    def spec(self) -> ModelSpec:
        """The model's architecture (read from ``source``)."""
        return load_spec(self.source, self.revision)

    def effective_quantization(self) -> str:
        """The method vLLM will run: ``auto`` resolves to the checkpoint's (``none`` when unquantized)."""
        if self.quantization != "auto":
            return self.quantization
        quant = self.spec().quant
        return quant.method if quant else "none"

    def weight_format(self) -> str:
        """The hardware-support key (cluster.planning.hardware.FORMATS) of the weights vLLM will hold."""
        quant = self.spec().quant
        if quant is not None:
            return quant.format
        return {"bitsandbytes": "bitsandbytes", "fp8": "fp8"}.get(self.effective_quantization(), "none")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def on_cpu(self) -> bool:
        return self.accelerator == "cpu"

    @property
    def serves_prompt_logprobs(self) -> bool:
        """False for LoRA on the CPU engine: vLLM 0.32's CPU LoRA kernels (punica_cpu ``bgmv_shrink``) get every
        prompt token against indices sized for the batch and kill the engine (a fuzz find); the ingress refuses."""
        return not (self.lora is not None and self.on_cpu)

    def effective_max_model_len(self) -> int:
        return self.max_model_len or self.spec().max_position_embeddings

    def effective_dtype(self) -> str:
        """The dtype vLLM will run: ``auto`` resolves to the checkpoint's, fp16 for 4-bit AWQ/GPTQ on CPU."""
        if self.dtype != "auto":
            return self.dtype
        spec = self.spec()
        if self.effective_quantization() in ("awq", "gptq"):
            return "float16"
        return spec.dtype if spec.dtype in ("float16", "bfloat16", "float32") else "bfloat16"

    @model_validator(mode="after")
    def _cross_checks(self) -> ModelConfig:
        if self.min_replicas > self.max_replicas:
            raise FieldError("max_replicas", self.max_replicas, f"is below min_replicas {self.min_replicas}")
        if "autoscaling" in self.model_fields_set and self.min_replicas == self.max_replicas:
            raise FieldError("autoscaling", "set", f"has no effect with min_replicas = max_replicas = {self.max_replicas}")
        accel = get_accelerator(self.accelerator)
        if accel.is_gpu and "cpu_kv_cache_space_gib" in self.model_fields_set:
            raise FieldError(
                "cpu_kv_cache_space_gib", self.cpu_kv_cache_space_gib, f"applies only to accelerator cpu, not {accel.name}"
            )
        if not accel.is_gpu and self.placement_strategy != "PACK":
            raise FieldError(
                "placement_strategy", self.placement_strategy, "applies to GPU replicas; a CPU replica is one process"
            )
        if not accel.is_gpu and "gpu_memory_utilization" in self.model_fields_set:
            raise FieldError(
                "gpu_memory_utilization",
                self.gpu_memory_utilization,
                "applies only to GPU accelerators; on cpu size the KV cache with cpu_kv_cache_space_gib",
            )
        try:
            spec = self.spec()
        except ValueError as e:
            raise FieldError("source", self.source, f"cannot be read: {e}") from e
        self._check_checkpoint(spec)
        support = quantization_support(accel, self.weight_format())
        if not support.supported:
            raise FieldError("quantization", self.quantization, f"cannot run on {accel.name}: {support.note}")
        self._check_parallelism(spec)
        if self.lora is not None:
            self._check_lora(spec)
        if self.max_model_len is not None and self.max_model_len > spec.max_position_embeddings:
            raise FieldError(
                "max_model_len",
                self.max_model_len,
                f"exceeds the {spec.max_position_embeddings} positions {self.source} was trained for",
            )
        return self

    def _check_checkpoint(self, spec: ModelSpec) -> None:
        if self.revision is not None and Path(self.source).is_dir():
            raise FieldError("revision", self.revision, "applies to hub ids; source is a local directory")
        q = self.quantization
        if q == "auto":
            return
        ckpt = spec.quant
        if ckpt is not None:
            same = q == ckpt.method or (q == "int8" and ckpt.scheme == "w8a8-int8")
            if not same:
                raise FieldError(
                    "quantization", q,
                    f"does not match the checkpoint, which is {ckpt.method}-quantized ({ckpt.describe()}): "
                    f"set {ckpt.method} or auto",
                )
        elif q not in ("none", "fp8", "bitsandbytes"):
            raise FieldError(
                "quantization", q,
                f"needs a pre-quantized checkpoint, and {self.source} is not one "
                "(unquantized checkpoints take none, or fp8 / bitsandbytes applied at load)",
            )

    def _check_parallelism(self, spec: ModelSpec) -> None:
        tp = self.tensor_parallel_size
        if spec.num_heads % tp:
            raise FieldError(
                "tensor_parallel_size", tp, f"does not divide the {spec.num_heads} attention heads of {self.source}"
            )
        if spec.num_kv_heads % tp and tp % spec.num_kv_heads:
            raise FieldError(
                "tensor_parallel_size",
                tp,
                f"and the {spec.num_kv_heads} KV heads of {self.source} must divide one another",
            )
        if spec.num_layers < self.pipeline_parallel_size:
            raise FieldError(
                "pipeline_parallel_size", self.pipeline_parallel_size, f"exceeds the {spec.num_layers} layers"
            )
        if spec.quant and spec.quant.group_size > 0 and spec.quant.method in ("awq", "gptq"):
            g = spec.quant.group_size
            for what, dim in (("attention output", spec.num_heads * spec.head_dim), ("MLP", spec.intermediate_size)):
                if (dim // tp) % g:
                    raise FieldError(
                        "tensor_parallel_size",
                        tp,
                        f"splits the {what} input ({dim}) into shards of {dim // tp}, not a multiple of "
                        f"the quantization group size {g}",
                    )

    def _check_lora(self, spec: ModelSpec) -> None:
        from cluster.planning.hub import HubError
        from cluster.planning.lora import AdapterError, check_adapter, lora_quantization_refusal

        why = lora_quantization_refusal(spec, self.effective_quantization(), self.on_cpu)
        if why is not None:
            raise FieldError("lora", self.source, f"cannot serve LoRA adapters: it {why}")
        for name, source in self.lora.adapters.items():
            if name == self.name:
                raise FieldError("lora.adapters", name, "is the model's own name; an adapter needs a name of its own")
            try:
                check_adapter(name, source, *self._resolve_adapter(source), spec, self.lora.max_lora_rank)
            except (AdapterError, HubError) as e:
                raise FieldError(f"lora.adapters.{name}", source, str(e)) from e

    @staticmethod
    def _resolve_adapter(source: str) -> tuple[str, dict[str, Any]]:
        from cluster.planning.hub import resolve_adapter

        return resolve_adapter(source)

    def adapter_paths(self) -> dict[str, str]:
        """Each adapter's local directory (hub adapters in huggingface_hub's cache), as vLLM loads it."""
        if self.lora is None:
            return {}
        return {name: self._resolve_adapter(source)[0] for name, source in self.lora.adapters.items()}

    def notes(self) -> list[str]:
        """Warnings that do not refuse the config: what vLLM will actually do."""
        out = []
        support = quantization_support(get_accelerator(self.accelerator), self.weight_format())
        if support.note:
            out.append(f"quantization {self.effective_quantization()}: {support.note}")
        return out

    def engine_dtype(self, host_has_amx: bool = False) -> str:
        """The ``dtype`` handed to vLLM on a host (``host_has_amx``: the replica's CPU has AMX tiles).

        On a CPU with AMX, vLLM 0.32 runs W8A8 INT8 layers on its AMX int8 kernel, which computes
        bfloat16 only: in float16 the engine aborts at its first request ("scale_C: scalar path not
        implemented!"). ``auto`` then resolves to bfloat16 (a float16 checkpoint would otherwise run in
        float16); an explicit float16 is refused.
        """
        if self.effective_quantization() in ("awq", "gptq"):
            return self.effective_dtype()
        if self.on_cpu and host_has_amx and self.weight_format() == "int8" and self.effective_dtype() == "float16":
            if self.dtype == "float16":
                raise FieldError("dtype", self.dtype, f"(model {self.name!r}) cannot run W8A8 INT8 on this CPU: "
                                 "vLLM's AMX int8 kernel computes bfloat16 only (float16 aborts the engine); "
                                 "use bfloat16 or auto")
            return "bfloat16"
        return self.dtype

    def engine_args(self, host_has_amx: bool = False) -> dict[str, Any]:
        """Keyword arguments for vLLM's ``AsyncEngineArgs``, derived from this config (``engine_dtype``)."""
        args: dict[str, Any] = {
            "model": self.source,
            "revision": self.revision,
            "served_model_name": self.name,
            "quantization": VLLM_QUANTIZATION[self.quantization],
            "dtype": self.engine_dtype(host_has_amx),
            "kv_cache_dtype": self.kv_cache_dtype,
            "tensor_parallel_size": self.tensor_parallel_size,
            "pipeline_parallel_size": self.pipeline_parallel_size,
            "max_model_len": self.effective_max_model_len(),
            "max_num_seqs": self.max_num_seqs,
            "enable_prefix_caching": self.enable_prefix_caching,
        }
        if self.on_cpu:
            args["kv_cache_memory_bytes"] = int(self.cpu_kv_cache_space_gib * GIB)
        else:
            args["gpu_memory_utilization"] = self.gpu_memory_utilization
        if self.lora is not None:
            args.update(enable_lora=True, max_loras=self.lora.max_loras, max_lora_rank=self.lora.max_lora_rank,
                        max_cpu_loras=self.lora.effective_max_cpu_loras)
        args.update(self.engine_kwargs)
        return args


# Fields of ModelConfig that map onto EngineArgs: engine_kwargs may not shadow them.
_FIRST_CLASS_ENGINE_FIELDS = frozenset(
    {
        "model",
        "revision",
        "served_model_name",
        "quantization",
        "dtype",
        "kv_cache_dtype",
        "tensor_parallel_size",
        "pipeline_parallel_size",
        "gpu_memory_utilization",
        "max_model_len",
        "max_num_seqs",
        "enable_prefix_caching",
        "kv_cache_memory_bytes",
        "distributed_executor_backend",
        "enable_lora",
        "max_loras",
        "max_lora_rank",
        "max_cpu_loras",
    }
)


class ClusterConfig(_Strict):
    """kvpilot's application arguments: the models it serves."""

    models: list[ModelConfig] = Field(min_length=1, description="The served models; request `model` picks one.")
    ingress: IngressConfig = Field(default_factory=IngressConfig, description="API keys, rate limits, body size.")

    @model_validator(mode="after")
    def _unique_names(self) -> ClusterConfig:
        seen: set[str] = set()
        for m in self.models:
            if m.name in seen:
                raise FieldError("models", m.name, "is the name of two models; names must be unique")
            seen.add(m.name)
        for m in self.models:  # an adapter's name picks its base's deployment: it must be unique too
            for name in (m.lora.adapters if m.lora else ()):
                if name in seen:
                    raise FieldError("models", name, f"names an adapter of {m.name} and another model or adapter; "
                                     "model and adapter names must be unique")
                seen.add(name)
        return self

    def adapter_bases(self) -> dict[str, str]:
        """Adapter name -> the model whose deployment serves it."""
        return {a: m.name for m in self.models for a in (m.lora.adapters if m.lora else ())}

    def model(self, name: str) -> ModelConfig:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    @classmethod
    def from_args(cls, args: dict[str, Any], path_prefix: str = "args") -> ClusterConfig:
        """Validate application ``args``; errors are a ConfigError whose lines start with ``path_prefix``."""
        try:
            return cls.model_validate(args)
        except ValidationError as e:
            raise ConfigError([_format_error(path_prefix, err) for err in e.errors()]) from e

    @classmethod
    def from_serve_yaml(cls, path: str | Path, app_name: str | None = None) -> ClusterConfig:
        """Read a Serve config file and validate the args of kvpilot's application in it."""
        args, prefix = read_serve_args(path, app_name)
        return cls.from_args(args, prefix)


def read_serve_args(path: str | Path, app_name: str | None = None) -> tuple[dict[str, Any], str]:
    """The raw ``args`` of kvpilot's application in a Serve config, and their YAML path."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigError([f"{path}: cannot read ({e.strerror})"]) from e
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}: not valid YAML ({e})"]) from e
    apps = doc.get("applications") if isinstance(doc, dict) else None
    if not isinstance(apps, list) or not apps:
        raise ConfigError([f"{path}: applications: a Serve config needs a non-empty list of applications"])
    for i, app in enumerate(apps):
        if not isinstance(app, dict) or app.get("import_path") != APP_IMPORT_PATH:
            continue
        if app_name is not None and app.get("name") != app_name:
            continue
        args = app.get("args")
        if not isinstance(args, dict):
            raise ConfigError([f"applications[{i}].args: {args!r} must be a mapping with a models list"])
        return args, f"applications[{i}].args"
    which = f" named {app_name!r}" if app_name else ""
    raise ConfigError([f"{path}: applications: no application{which} with import_path {APP_IMPORT_PATH}"])


def _format_error(prefix: str, err: dict[str, Any]) -> str:
    loc = list(err["loc"])
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, FieldError):
        loc.append(cause.field)
        return f"{_path(prefix, loc)}: {cause.detail}"
    kind = err["type"]
    if kind == "extra_forbidden":
        field = str(loc[-1])
        close = difflib.get_close_matches(field, list(ModelConfig.model_fields) + ["models"], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"{_path(prefix, loc)}: {err['input']!r} is under an unknown field{hint}"
    if kind == "missing":
        return f"{_path(prefix, loc)}: required field is missing"
    msg = err["msg"].removeprefix("Value error, ")
    if kind == "value_error":
        return f"{_path(prefix, loc)}: {msg}"
    return f"{_path(prefix, loc)}: {err['input']!r}: {msg}"


def _path(prefix: str, loc: list[Any]) -> str:
    out = prefix
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out
