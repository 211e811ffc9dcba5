"""Memory plan of one model replica: does it fit its accelerators, and how much KV cache is left.

Per GPU (one tensor-parallel rank of the fullest pipeline stage), following
vLLM's own accounting:

    budget   = gpu_memory_utilization × GPU memory
    kv_cache = budget − weights − activation peak − runtime overhead
    blocks   = kv_cache // (block_size × KV bytes per token)

On the CPU engine the KV cache is set explicitly (``cpu_kv_cache_space_gib``,
vLLM's ``kv_cache_memory_bytes`` / ``VLLM_CPU_KVCACHE_SPACE``), so weights and
activations live beside it in host memory and the KV arithmetic is exact.

Weights are counted tensor by tensor from the architecture: what tensor
parallelism shards (attention and MLP projections, the vocabulary-parallel
embedding and lm_head) and what it replicates (norms), with each quantization
method's real storage (packed 4-bit codes, fp16 scales, packed zeros, GPTQ's
int32 ``g_idx``, FP8/INT8 scales, bitsandbytes absmax).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from cluster.config import ModelConfig
from cluster.planning.hardware import GIB, Accelerator, get_accelerator, quantization_support
from cluster.planning.hub import TensorInfo
from cluster.planning.modelspec import ModelSpec, QuantSpec
from cluster.planning.weights import (VOCAB_PADDING, config_tensors, drop_at_load, load_time_bytes, online_quant,
                                      rank_bytes)

# Runtime memory outside torch tensors, and the CUDA-graph pool; rough figures
# from vLLM's startup logs ("non-torch memory", "Graph capturing finished ...").
NON_TORCH_BYTES = int(0.5 * GIB)  # CUDA context, cuBLAS workspace, allocator slack
NCCL_BYTES = int(0.25 * GIB)  # communicator buffers when a replica spans >1 GPU
CUDA_GRAPH_BYTES = int(0.5 * GIB)  # captured decode graphs; zero with enforce_eager

# max_num_batched_tokens when the config leaves it to vLLM (engine/arg_utils.py):
# 8192 on >=70 GiB GPUs other than A100, 2048 elsewhere; CPU: 2048 per worker.
BIG_GPU_BATCHED_TOKENS = 8192
DEFAULT_BATCHED_TOKENS = 2048

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class PerGpu:
    weights_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    overhead_bytes: int
    budget_bytes: int
    lora_bytes: int = 0  # vLLM's LoRA slots (max_loras × max_lora_rank × the wrapped layers' widths)


@dataclass(frozen=True)
class Plan:
    """The memory plan of one model; ``fits`` is the verdict."""

    name: str
    source: str
    gpu: str
    quantization: str
    kv_cache_dtype: str
    tensor_parallel_size: int
    pipeline_parallel_size: int
    max_model_len: int
    fits: bool
    per_gpu: PerGpu
    kv_bytes_per_token: int
    block_size: int
    num_blocks: int
    kv_cache_tokens: int
    max_concurrency: float
    shortfall_bytes: int
    assumptions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    suggestions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# --- weights -------------------------------------------------------------


def _stage_layers(num_layers: int, pp: int) -> list[range]:
    """vLLM's pipeline split (distributed/utils.py get_pp_indices): even, the remainder to the last stages."""
    base, extra = divmod(num_layers, pp)
    sizes = [base + (1 if i >= pp - extra else 0) for i in range(pp)]
    starts = [sum(sizes[:i]) for i in range(pp)]
    return [range(s, s + n) for s, n in zip(starts, sizes)]


def weight_tensors(spec: ModelSpec, method: str) -> tuple[dict[str, TensorInfo], str]:
    """The tensors vLLM loads for ``spec`` under ``method``, and where they came from."""
    if spec.quant is None and method not in ("none", "auto"):
        return config_tensors(spec, online_quant(method)), f"config.json arithmetic, {method} applied at load"
    if spec.tensors:
        return spec.tensors, spec.tensors_note or "safetensors headers"
    why = f" ({spec.tensors_note})" if spec.tensors_note else ""
    return config_tensors(spec), f"config.json arithmetic{why}"


def weight_bytes_per_gpu(spec: ModelSpec, method: str, dtype: str, tp: int = 1, pp: int = 1, ep: bool = False,
                         on_gpu: bool = True) -> int:
    """Weight bytes held by one GPU of the fullest pipeline stage."""
    return weight_breakdown(spec, method, dtype, tp, pp, ep, on_gpu)[0]


def weight_breakdown(spec: ModelSpec, method: str, dtype: str, tp: int = 1, pp: int = 1, ep: bool = False,
                     on_gpu: bool = True) -> tuple[int, str, list[str]]:
    """(bytes on the fullest rank, where the tensors came from, load-time additions)."""
    tensors, source = weight_tensors(spec, method)
    tensors = drop_at_load(tensors, spec, on_gpu)
    best = 0
    extras: list[str] = []
    stages = _stage_layers(spec.num_layers, pp)
    for i, layers in enumerate(stages):
        ends = (i == 0, i == pp - 1)
        if spec.tie_word_embeddings and pp > 1 and ends[1] and not ends[0]:
            tensors = {**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"]}
        held = rank_bytes(tensors, spec, dtype, tp, ep, layers, ends)
        extra, notes = load_time_bytes(spec, dtype, tp, on_gpu, len(layers))
        if held + extra > best:
            best, extras = held + extra, notes
    return best, source, extras


def kv_layers(spec: ModelSpec, kv_cache_dtype: str, dtype: str, tp: int = 1, pp: int = 1) -> list[tuple[str, int]]:
    """(kind, bytes per token on one GPU) of each attention layer of the fullest pipeline stage.

    Standard attention: K and V of the rank's KV heads (at least one; replicated beyond the
    KV head count). MLA: one latent vector of kv_lora_rank + qk_rope_head_dim, the same on
    every rank (vLLM does not split it by TP).
    """
    elem = 1 if kv_cache_dtype.startswith("fp8") else _DTYPE_BYTES[dtype]
    stage = max(_stage_layers(spec.num_layers, pp), key=len)
    if spec.is_mla:
        per = (spec.kv_lora_rank + spec.qk_rope_head_dim) * elem
        return [("mla", per) for _ in stage]
    per = 2 * max(1, spec.num_kv_heads // tp) * spec.head_dim * elem
    return [(spec.layer_kind(i), per) for i in stage]


def kv_bytes_per_token(spec: ModelSpec, kv_cache_dtype: str, dtype: str, tp: int = 1, pp: int = 1) -> int:
    """KV cache bytes one token costs on one GPU, summed over the stage's layers."""
    return sum(b for _, b in kv_layers(spec, kv_cache_dtype, dtype, tp, pp))


def kv_capacity(spec: ModelSpec, kv_budget: int, block: int, mml: int, kv_cache_dtype: str, dtype: str, tp: int,
                pp: int, in_flight_tokens: int) -> tuple[int, float, int]:
    """(blocks, concurrency, tokens) as vLLM's KV cache manager computes them (v1/core/kv_cache_utils.py).

    Layers are bucketed by kind; the smallest bucket's size is the group size (the largest if it
    is under 1.5x the smallest); each block id holds one page of every layer of a group, and a
    request takes ceil(mml / block) blocks in a full-attention group and
    ceil(min(window - 1 + in-flight tokens, mml) / block) + 1 in a sliding-window group.
    """
    layers = kv_layers(spec, kv_cache_dtype, dtype, tp, pp)
    buckets: dict[str, list[int]] = {}
    for kind, per in layers:
        buckets.setdefault(kind, []).append(per)
    sizes = [len(v) for v in buckets.values()]
    group = min(sizes) if max(sizes) >= 1.5 * min(sizes) else max(sizes)
    page = max(per for _, per in layers) * block
    num_blocks = max(0, kv_budget) // (group * page)
    per_request = 0
    for kind, members in buckets.items():
        groups = math.ceil(len(members) / group)
        if kind == "sliding":
            need = math.ceil(min(spec.sliding_window - 1 + in_flight_tokens, mml) / block) + 1
        else:
            need = math.ceil(mml / block)
        per_request += groups * need
    concurrency = num_blocks / per_request
    return num_blocks, concurrency, int(concurrency * mml)


def activation_bytes(spec: ModelSpec, dtype: str, tp: int, batched_tokens: int, max_num_seqs: int) -> int:
    """Estimate of the profile run's activation peak on one GPU.

    One layer's live tensors for ``batched_tokens`` tokens (residual, normed input, sharded
    qkv, gate_up and its activated half; for MoE the routed copies of the tokens through the
    experts' intermediate) plus the sampler's fp32 logits and probabilities for
    ``max_num_seqs`` rows.
    """
    db = _DTYPE_BYTES[dtype]
    qkv = (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim // tp
    inter = spec.intermediate_size
    if spec.is_moe:
        inter = max(inter if not all(spec.moe_layers or [True]) else 0, spec.experts_per_token * spec.moe_intermediate_size)
    per_token = (2 * spec.hidden_size + qkv + 3 * inter // tp) * db
    vocab_rank = math.ceil(spec.vocab_size / VOCAB_PADDING) * VOCAB_PADDING
    sampler = max_num_seqs * vocab_rank * 4 * 2
    return batched_tokens * per_token + sampler


# --- the plan ------------------------------------------------------------


def _batched_tokens(cfg: ModelConfig, accel: Accelerator) -> int:
    if "max_num_batched_tokens" in cfg.engine_kwargs:
        return int(cfg.engine_kwargs["max_num_batched_tokens"])
    if not accel.is_gpu:
        return DEFAULT_BATCHED_TOKENS * cfg.world_size
    big = (accel.memory_bytes or 0) >= 70 * GIB and not accel.name.startswith("A100")
    return BIG_GPU_BATCHED_TOKENS if big else DEFAULT_BATCHED_TOKENS


def plan_model(cfg: ModelConfig, accelerator: str | None = None) -> Plan:
    """Plan one model on its configured accelerator (or ``accelerator``, to ask "what if")."""
    cfg = _on_accelerator(cfg, accelerator)
    accel = get_accelerator(cfg.accelerator)
    spec = cfg.spec()
    tp, pp = cfg.tensor_parallel_size, cfg.pipeline_parallel_size
    dtype = cfg.effective_dtype()
    mml = cfg.effective_max_model_len()
    method = cfg.effective_quantization()
    ep = bool(cfg.engine_kwargs.get("enable_expert_parallel", False))
    weights, weights_from, load_notes = weight_breakdown(spec, method, dtype, tp, pp, ep, accel.is_gpu)
    per_token = kv_bytes_per_token(spec, cfg.kv_cache_dtype, dtype, tp, pp)
    batched = _batched_tokens(cfg, accel)
    act = activation_bytes(spec, dtype, tp, batched, cfg.max_num_seqs)
    assumptions = _model_assumptions(cfg, spec, dtype, method, ep, batched, weights_from, load_notes)
    lora = _lora_buffers(cfg, spec, dtype, tp, pp, per_token, accel.is_gpu, assumptions)
    block, budget, kv_budget, overhead = _kv_budget(cfg, accel, weights, act, lora, assumptions)
    num_blocks, concurrency, kv_tokens = kv_capacity(
        spec, kv_budget, block, mml, cfg.kv_cache_dtype, dtype, tp, pp, batched * pp)
    fits = concurrency >= 1
    one_request = math.ceil(mml / block) * block * per_token
    shortfall = 0 if fits else max(0, one_request - max(0, kv_budget)) + max(0, -kv_budget)
    plan = Plan(
        name=cfg.name,
        source=cfg.source,
        gpu=accel.name,
        quantization=method,
        kv_cache_dtype=cfg.kv_cache_dtype,
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        max_model_len=mml,
        fits=fits,
        per_gpu=PerGpu(weights, max(0, kv_budget // (block * per_token)) * block * per_token, act, overhead, budget,
                       lora),
        kv_bytes_per_token=per_token,
        block_size=block,
        num_blocks=num_blocks,
        kv_cache_tokens=kv_tokens,
        max_concurrency=round(concurrency, 2),
        shortfall_bytes=shortfall,
        assumptions=assumptions,
        notes=cfg.notes(),
    )
    if not fits:
        plan = replace(plan, suggestions=_suggestions(cfg, spec, accel))
    return plan


def _on_accelerator(cfg: ModelConfig, accelerator: str | None) -> ModelConfig:
    """``cfg`` moved to ``accelerator`` (a GPU for a GPU, the CPU for the CPU); ``cfg`` itself for None."""
    if accelerator is None or accelerator == cfg.accelerator:
        return cfg
    accel = get_accelerator(accelerator)
    if accel.is_gpu != get_accelerator(cfg.accelerator).is_gpu:
        raise ValueError(f"--gpu: {accelerator!r} cannot stand in for {cfg.accelerator!r} (GPU vs CPU)")
    return cfg.model_copy(update={"accelerator": accelerator})


def _model_assumptions(cfg: ModelConfig, spec: ModelSpec, dtype: str, method: str, ep: bool, batched: int,
                       weights_from: str, load_notes: list[str]) -> list[str]:
    """What the plan assumes of the model: source commit, architecture, weight storage, activations, KV layout."""
    qdesc = spec.quant.describe() if spec.quant else (f"{method} applied at load" if method != "none" else "")
    assumptions = [
        f"architecture: {spec.describe()}",
        f"weights in {dtype}" + (f", {qdesc}" if qdesc else "") + (", experts split by expert (EP)" if ep and spec.is_moe else ""),
        f"weights from {weights_from}" + (f"; plus {', '.join(load_notes)}" if load_notes else ""),
        f"activation peak for {batched} batched tokens and {cfg.max_num_seqs} sequences (estimate)",
    ]
    if spec.revision:
        assumptions.insert(0, f"source: {cfg.source} at commit {spec.revision}")
    if spec.is_mla:
        assumptions.append("KV cache: MLA latent vectors, the same on every TP rank (not split)")
    if spec.sliding_window:
        assumptions.append(
            f"KV cache: {spec.layer_types.count('sliding')} sliding-window layers hold at most "
            f"{spec.sliding_window} + {batched} tokens per request (vLLM's hybrid KV cache manager)"
        )
    return assumptions


def _kv_budget(cfg: ModelConfig, accel: Accelerator, weights: int, act: int, lora: int,
               assumptions: list[str]) -> tuple[int, int, int, int]:
    """(block size, memory budget, bytes left for the KV cache, runtime overhead) per GPU or CPU worker.

    On a GPU the KV cache gets what the weights, the activation peak, the LoRA slots and the runtime
    overhead leave of the budget; on the CPU it is fixed. Says which in ``assumptions``.
    """
    if not accel.is_gpu:
        kv_budget = int(cfg.cpu_kv_cache_space_gib * GIB)
        assumptions.append(
            f"CPU: KV cache fixed at {cfg.cpu_kv_cache_space_gib} GiB per worker; weights and activations "
            "use host memory beside it"
        )
        return accel.kv_block_size, kv_budget, kv_budget, 0
    assert accel.memory_bytes is not None
    budget = int(cfg.gpu_memory_utilization * accel.memory_bytes)
    eager = bool(cfg.engine_kwargs.get("enforce_eager", False))
    overhead = NON_TORCH_BYTES + (NCCL_BYTES if cfg.world_size > 1 else 0) + (0 if eager else CUDA_GRAPH_BYTES)
    assumptions.append(
        f"runtime overhead {overhead / GIB:.2f} GiB: non-torch 0.50"
        + (", NCCL 0.25" if cfg.world_size > 1 else "")
        + (", CUDA graphs 0.50" if not eager else ", no CUDA graphs (enforce_eager)")
    )
    return accel.kv_block_size, budget, budget - weights - act - overhead - lora, overhead


def _lora_buffers(cfg: ModelConfig, spec: ModelSpec, dtype: str, tp: int, pp: int, per_token: int, on_gpu: bool,
                  assumptions: list[str]) -> int:
    """Bytes per GPU of vLLM's LoRA slots (0 without ``lora:``); says what they cost in KV tokens."""
    if cfg.lora is None:
        return 0
    from cluster.planning.lora import DENSE_TARGETS, adapter_bytes, buffer_bytes_per_gpu

    lo = cfg.lora
    nbytes = _DTYPE_BYTES.get(dtype, 2)
    gpu = buffer_bytes_per_gpu(spec, lo.max_loras, lo.max_lora_rank, tp, nbytes, pp)
    cache = lo.effective_max_cpu_loras * adapter_bytes(spec, lo.max_lora_rank, DENSE_TARGETS, nbytes)
    where = "per GPU" if on_gpu else "in host memory (the CPU KV cache is fixed)"
    cost = f", {gpu // per_token:,} KV tokens" if on_gpu else ""
    assumptions.append(
        f"LoRA: {lo.max_loras} slots × rank {lo.max_lora_rank} on every q/k/v/o/gate/up/down layer = "
        f"{gpu / 2**20:.1f} MiB {where}{cost}; host cache of {lo.effective_max_cpu_loras} adapters up to "
        f"{cache / 2**20:.1f} MiB"
    )
    return gpu if on_gpu else 0


def _suggestions(cfg: ModelConfig, spec: ModelSpec, accel: Accelerator) -> list[str]:
    """Tensor-parallel sizes (same quantization) and quantizations (same TP) that would fit."""
    out = []
    for tp in (2, 4, 8, 16):
        if tp <= cfg.tensor_parallel_size:
            continue
        candidate = _try(cfg, tensor_parallel_size=tp)
        if candidate is not None and candidate.fits:
            out.append(f"tensor_parallel_size: {tp} fits ({candidate.kv_cache_tokens:,} KV tokens)")
            break
    if spec.quant is None and accel.is_gpu:
        for q in ("fp8", "bitsandbytes"):
            if q == cfg.quantization or not quantization_support(accel, q).supported:
                continue
            candidate = _try(cfg, quantization=q)
            if candidate is not None and candidate.fits:
                out.append(f"quantization: {q} fits at the same TP ({candidate.kv_cache_tokens:,} KV tokens)")
    if spec.quant is None or spec.quant.bits > 4:
        four_bit = replace(spec, quant=QuantSpec("awq"), tensors=None)
        w = weight_bytes_per_gpu(four_bit, "awq", "float16", cfg.tensor_parallel_size, cfg.pipeline_parallel_size)
        out.append(f"a 4-bit AWQ/GPTQ checkpoint of this model needs {w / GIB:.2f} GiB of weights per GPU")
    if cfg.max_model_len:
        out.append("or a smaller max_model_len")
    return out


def _try(cfg: ModelConfig, **update) -> Plan | None:
    try:
        candidate = ModelConfig.model_validate({**cfg.model_dump(exclude_unset=True), **update})
    except ValueError:
        return None
    return plan_model(candidate)


def size_table(spec: ModelSpec) -> list[tuple[str, int]]:
    """Whole-model weight bytes (TP=1) under each storage format, from config.json arithmetic."""
    base = replace(spec, quant=None, tensors=None)

    def fmt(q: QuantSpec | None, dtype: str) -> int:
        return weight_bytes_per_gpu(replace(base, quant=q), q.method if q else "none", dtype)

    return [
        ("fp32", fmt(None, "float32")),
        ("fp16/bf16", fmt(None, "bfloat16")),
        ("int8 (W8A8, per-channel scales)", fmt(QuantSpec("compressed-tensors", 8, -1, scheme="w8a8-int8"), "bfloat16")),
        ("fp8 (per-tensor scales)", fmt(QuantSpec("fp8", 8, -1, scheme="fp8"), "bfloat16")),
        ("fp8 (128×128 blocks)", fmt(QuantSpec("fp8", 8, -1, scheme="fp8-block"), "bfloat16")),
        ("4-bit AWQ g128", fmt(QuantSpec("awq"), "float16")),
        ("4-bit GPTQ g128 (+g_idx)", fmt(QuantSpec("gptq"), "float16")),
        ("W4A16 compressed-tensors g128", fmt(QuantSpec("compressed-tensors", 4, 128, scheme="w4a16"), "bfloat16")),
        ("NVFP4 (fp8 scale per 16)", fmt(QuantSpec("modelopt_fp4", 4, 16, scheme="nvfp4"), "bfloat16")),
        ("bitsandbytes nf4", fmt(QuantSpec("bitsandbytes", 4, 64, scheme="nf4"), "bfloat16")),
    ]


def parameter_count(spec: ModelSpec) -> int:
    """Parameters of the unsharded model (without vocabulary padding), from config.json arithmetic."""
    return sum(math.prod(t.shape) for t in config_tensors(replace(spec, quant=None, tensors=None)).values())
