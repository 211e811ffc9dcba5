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
from cluster.hardware import GIB, Accelerator, get_accelerator, quantization_support
from cluster.modelspec import ModelSpec, QuantSpec

GPU_BLOCK_SIZE = 16  # vLLM's default KV block size on CUDA
CPU_BLOCK_SIZE = 128  # vLLM's default on the CPU backend (platforms/cpu.py)
VOCAB_PADDING = 64  # vLLM pads the embedding and lm_head rows to a multiple of this

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


def _linear_bytes(in_f: int, out_f: int, quant: QuantSpec | None, method: str, dtype_bytes: int) -> int:
    """Bytes of one (sharded) linear layer's weight and its quantization metadata."""
    n = in_f * out_f
    if method == "none" or quant is None:
        return n * dtype_bytes
    if method in ("awq", "gptq"):
        g = quant.group_size if quant.group_size > 0 else in_f
        groups = math.ceil(in_f / g)
        codes = n * quant.bits // 8
        scales = groups * out_f * 2  # fp16
        zeros = groups * out_f * quant.bits // 8  # packed like the codes
        g_idx = in_f * 4 if method == "gptq" else 0  # int32 per input row
        return codes + scales + zeros + g_idx
    if method == "fp8":
        return n + 2 * 4  # fp8 codes, fp32 weight and input scales per tensor
    if method == "int8":
        return n + out_f * 4  # int8 codes, fp32 scale per output channel
    if method == "bitsandbytes":
        bits = quant.bits if quant else 4
        if bits == 8:
            return n + out_f * 4
        blocks = math.ceil(n / 64)
        if quant and quant.double_quant:  # absmax itself 8-bit, fp32 per 256 absmax
            return n // 2 + blocks + math.ceil(blocks / 256) * 4
        return n // 2 + blocks * 4  # fp32 absmax per 64 weights
    raise ValueError(f"quantization: {method!r} has no weight formula")


def _rank_linears(spec: ModelSpec, tp: int) -> list[tuple[int, int]]:
    """(in, out) of each linear of one decoder layer as one TP rank holds it."""
    kv_rank = max(1, spec.num_kv_heads // tp)
    q_out = spec.num_heads // tp * spec.head_dim
    return [
        (spec.hidden_size, q_out + 2 * kv_rank * spec.head_dim),  # qkv (column parallel)
        (spec.num_heads * spec.head_dim // tp, spec.hidden_size),  # o_proj (row parallel)
        (spec.hidden_size, 2 * spec.intermediate_size // tp),  # gate_up (column parallel)
        (spec.intermediate_size // tp, spec.hidden_size),  # down (row parallel)
    ]


def weight_bytes_per_gpu(spec: ModelSpec, method: str, dtype: str, tp: int = 1, pp: int = 1) -> int:
    """Weight bytes held by one GPU of the fullest pipeline stage."""
    db = _DTYPE_BYTES[dtype]
    quant = spec.quant if spec.quant else (QuantSpec(method, bits=8 if method in ("fp8", "int8") else 4) if method != "none" else None)
    layer = sum(_linear_bytes(i, o, quant, method, db) for i, o in _rank_linears(spec, tp))
    if spec.attention_bias:
        layer += _rank_linears(spec, tp)[0][1] * db
    layer += 2 * spec.hidden_size * db  # input and post-attention RMSNorm, replicated
    layers_per_stage = math.ceil(spec.num_layers / pp)
    vocab_rank = math.ceil(spec.vocab_size / VOCAB_PADDING) * VOCAB_PADDING // tp
    embed = vocab_rank * spec.hidden_size * db
    if spec.tie_word_embeddings:
        lm_head = 0 if pp == 1 else embed
    elif quant is not None and quant.lm_head_quantized:
        lm_head = _linear_bytes(spec.hidden_size, vocab_rank, quant, method, db)
    else:
        lm_head = vocab_rank * spec.hidden_size * db
    final_norm = spec.hidden_size * db
    if pp == 1:
        ends = embed + lm_head + final_norm
    else:
        ends = max(embed, lm_head + final_norm)
    return layers_per_stage * layer + ends


def kv_bytes_per_token(spec: ModelSpec, kv_cache_dtype: str, dtype: str, tp: int = 1, pp: int = 1) -> int:
    """KV cache bytes one token costs on one GPU: 2 (K and V) × KV heads per rank × head_dim × bytes × layers."""
    elem = 1 if kv_cache_dtype.startswith("fp8") else _DTYPE_BYTES[dtype]
    return math.ceil(spec.num_layers / pp) * 2 * max(1, spec.num_kv_heads // tp) * spec.head_dim * elem


def activation_bytes(spec: ModelSpec, dtype: str, tp: int, batched_tokens: int, max_num_seqs: int) -> int:
    """Estimate of the profile run's activation peak on one GPU.

    One layer's live tensors for ``batched_tokens`` tokens (residual, normed
    input, sharded qkv, gate_up and its activated half) plus the sampler's fp32
    logits and probabilities for ``max_num_seqs`` rows.
    """
    db = _DTYPE_BYTES[dtype]
    qkv = _rank_linears(spec, tp)[0][1]
    per_token = (2 * spec.hidden_size + qkv + 3 * spec.intermediate_size // tp) * db
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
    if accelerator is not None and accelerator != cfg.accelerator:
        accel = get_accelerator(accelerator)
        if accel.is_gpu != get_accelerator(cfg.accelerator).is_gpu:
            raise ValueError(f"--gpu: {accelerator!r} cannot stand in for {cfg.accelerator!r} (GPU vs CPU)")
        cfg = cfg.model_copy(update={"accelerator": accelerator})
    accel = get_accelerator(cfg.accelerator)
    spec = cfg.spec()
    tp, pp = cfg.tensor_parallel_size, cfg.pipeline_parallel_size
    dtype = cfg.effective_dtype()
    mml = cfg.effective_max_model_len()
    weights = weight_bytes_per_gpu(spec, cfg.quantization, dtype, tp, pp)
    per_token = kv_bytes_per_token(spec, cfg.kv_cache_dtype, dtype, tp, pp)
    batched = _batched_tokens(cfg, accel)
    act = activation_bytes(spec, dtype, tp, batched, cfg.max_num_seqs)
    assumptions = [
        f"architecture: {spec.describe()}",
        f"weights in {dtype}" + (f", linear layers {cfg.quantization}" if cfg.quantization != "none" else ""),
        f"activation peak for {batched} batched tokens and {cfg.max_num_seqs} sequences (estimate)",
    ]
    if accel.is_gpu:
        assert accel.memory_bytes is not None
        block = GPU_BLOCK_SIZE
        budget = int(cfg.gpu_memory_utilization * accel.memory_bytes)
        eager = bool(cfg.engine_kwargs.get("enforce_eager", False))
        overhead = NON_TORCH_BYTES + (NCCL_BYTES if cfg.world_size > 1 else 0) + (0 if eager else CUDA_GRAPH_BYTES)
        assumptions.append(
            f"runtime overhead {overhead / GIB:.2f} GiB: non-torch 0.50"
            + (", NCCL 0.25" if cfg.world_size > 1 else "")
            + (", CUDA graphs 0.50" if not eager else ", no CUDA graphs (enforce_eager)")
        )
        kv_budget = budget - weights - act - overhead
    else:
        block = CPU_BLOCK_SIZE
        kv_budget = int(cfg.cpu_kv_cache_space_gib * GIB)
        budget = kv_budget
        overhead = 0
        assumptions.append(
            f"CPU: KV cache fixed at {cfg.cpu_kv_cache_space_gib} GiB per worker; weights and activations "
            "use host memory beside it"
        )
    num_blocks = max(0, kv_budget) // (block * per_token)
    blocks_per_request = math.ceil(mml / block)
    concurrency = num_blocks / blocks_per_request
    kv_tokens = int(concurrency * mml)  # the figure vLLM logs as "KV cache size: N tokens"
    fits = num_blocks >= blocks_per_request
    shortfall = 0 if fits else blocks_per_request * block * per_token - max(0, kv_budget) + max(0, -kv_budget)
    plan = Plan(
        name=cfg.name,
        source=cfg.source,
        gpu=accel.name,
        quantization=cfg.quantization,
        kv_cache_dtype=cfg.kv_cache_dtype,
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        max_model_len=mml,
        fits=fits,
        per_gpu=PerGpu(weights, max(0, num_blocks * block * per_token), act, overhead, budget),
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
        for q in ("fp8", "int8", "bitsandbytes"):
            if q == cfg.quantization or not quantization_support(accel, q).supported:
                continue
            candidate = _try(cfg, quantization=q)
            if candidate is not None and candidate.fits:
                out.append(f"quantization: {q} fits at the same TP ({candidate.kv_cache_tokens:,} KV tokens)")
    if spec.quant is None or spec.quant.bits > 4:
        four_bit = replace(spec, quant=QuantSpec("awq"))
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
    """Whole-model weight bytes (TP=1) under each storage format."""
    base = replace(spec, quant=None)
    rows = [
        ("fp32", weight_bytes_per_gpu(base, "none", "float32")),
        ("fp16/bf16", weight_bytes_per_gpu(base, "none", "bfloat16")),
        ("int8 (W8A8, per-channel scales)", weight_bytes_per_gpu(base, "int8", "bfloat16")),
        ("fp8 (per-tensor scales)", weight_bytes_per_gpu(base, "fp8", "bfloat16")),
        ("4-bit AWQ g128", weight_bytes_per_gpu(replace(spec, quant=QuantSpec("awq")), "awq", "float16")),
        ("4-bit GPTQ g128 (+g_idx)", weight_bytes_per_gpu(replace(spec, quant=QuantSpec("gptq")), "gptq", "float16")),
        ("bitsandbytes nf4", weight_bytes_per_gpu(base, "bitsandbytes", "bfloat16")),
    ]
    return rows


def parameter_count(spec: ModelSpec) -> int:
    """Parameters of the unsharded model (without vocabulary padding)."""
    per_layer = sum(i * o for i, o in _rank_linears(spec, 1)) + 2 * spec.hidden_size
    if spec.attention_bias:
        per_layer += _rank_linears(spec, 1)[0][1]
    embeds = spec.vocab_size * spec.hidden_size * (1 if spec.tie_word_embeddings else 2)
    return spec.num_layers * per_layer + embeds + spec.hidden_size
