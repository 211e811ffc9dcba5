"""Weight bytes per GPU, tensor by tensor, as vLLM shards and stores them.

Two sources of tensors, one accounting:

* the checkpoint's own safetensors headers (``ModelSpec.tensors``: dtype × shape of each);
* ``config_tensors(spec)``: the tensors a checkpoint of that config holds (Hugging Face
  names, each quantization method's stored layout), when no header could be read.

``rank_bytes`` then splits every tensor the way vLLM's layers do under tensor parallelism:
vocabulary-parallel embedding / lm_head (rows padded to 64, then split), column-parallel
q/k/v, gate/up and MLA up-projections (output split; K/V replicated once TP exceeds the KV
heads), row-parallel o/down (input split, bias replicated), replicated norms, router gates,
MLA down-projections and per-tensor scales; experts split by intermediate dimension, or
by expert with ``enable_expert_parallel``. ``load_time_bytes`` adds what vLLM allocates at
load beyond the checkpoint (rotary cos/sin caches, MLA's absorbed ``W_UK``/``W_UV``) and
removes what it drops (GPTQ's implied zero points, and ``g_idx`` without act-order).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import replace

from cluster.planning.hub import TensorInfo
from cluster.planning.modelspec import ModelSpec, QuantSpec

# Each attention layer's fp32 _q/_k/_v/_prob scale buffers (vLLM's Attention, for fp8 KV and attention).
ATTENTION_SCALE_BYTES = 4 * 4
VOCAB_PADDING = 64  # vLLM pads the embedding and lm_head rows to a multiple of this

DTYPE_BYTES = {
    "F64": 8, "I64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "I8": 1, "U8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "BOOL": 1,
}
SERVED_DTYPE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_FLOAT16 = {"F32", "F16", "BF16"}

# Components that stay whole on every rank whatever their layer (per-tensor scales, shapes, maps).
_SCALAR_PARTS = re.compile(
    r"(input_scale|weight_scale_2|_global_scale|weight_shape|quant_map|nested_quant_map|quant_state\..*|k_scale|v_scale)$"
)
_ROUTER = re.compile(r"(block_sparse_moe\.gate|mlp\.gate|mlp\.router|shared_expert_gate|e_score_correction_bias)(\.|$)")
_REPLICATED = re.compile(r"(norm|q_a_proj|kv_a_proj_with_mqa)(\.|$)")
_KV = re.compile(r"\.(k_proj|v_proj)\.")
_COLUMN = re.compile(r"\.(q_proj|q_b_proj|kv_b_proj|gate_proj|up_proj|gate_up_proj|w1|w3)[._]")
_ROW = re.compile(r"\.(o_proj|down_proj|w2)[._]")


def tensor_bytes(info: TensorInfo, served: str | None = None) -> int:
    """Bytes of one tensor; 16/32-bit weights are counted in the served dtype ``served`` (F16, BF16, F32)."""
    dt = served if served and info.dtype in _FLOAT16 else info.dtype
    return math.prod(info.shape) * DTYPE_BYTES[dt]


def _is_weight_like(name: str) -> bool:
    """Tensors vLLM loads into the model's dtype (weights, biases, norms); scales keep theirs."""
    return name.endswith((".weight", ".bias", "_bias", ".sinks")) and "scale" not in name.rsplit(".", 1)[-1]


def shard_fraction(name: str, info: TensorInfo, spec: ModelSpec, tp: int, ep: bool) -> float:
    """Fraction of a checkpoint tensor that one of ``tp`` ranks holds."""
    if tp == 1:
        return 1.0
    if name.endswith(("embed_tokens.weight", "lm_head.weight", "lm_head.qweight", "wte.weight")) or (
        "lm_head." in name and not _SCALAR_PARTS.search(name)
    ):
        v = info.shape[0] if info.shape else spec.vocab_size
        return math.ceil(v / VOCAB_PADDING) * VOCAB_PADDING / tp / v if v else 1.0
    if _SCALAR_PARTS.search(name) or math.prod(info.shape or (1,)) <= 1:
        return 1.0
    if _ROUTER.search(name) or _REPLICATED.search(name):
        return 1.0
    if name.endswith("sinks"):
        return 1 / tp
    experts = ".experts." in name
    if experts and ep:
        return 1 / tp  # whole experts per rank
    is_bias = name.endswith((".bias", "_bias"))
    if _KV.search(name):
        if name.endswith("g_idx"):
            return 1.0
        return max(1, spec.num_kv_heads // tp) / spec.num_kv_heads
    if _COLUMN.search(name):
        return 1.0 if name.endswith("g_idx") else 1 / tp
    if _ROW.search(name):
        per_out = len(info.shape) >= 2 and info.shape[-1] == 1  # per-output-channel scale [out, 1]
        if is_bias or per_out or name.endswith((".SCB", "weight.SCB")):
            return 1.0
        return 1 / tp
    return 1.0


def rank_bytes(tensors: dict[str, TensorInfo], spec: ModelSpec, dtype: str, tp: int = 1, ep: bool = False,
               layers: range | None = None, ends: tuple[bool, bool] = (True, True)) -> int:
    """Bytes one rank holds of ``tensors`` (of the decoder ``layers`` and the model ends asked for)."""
    served = SERVED_DTYPE[dtype]
    total = 0.0
    for name, info in tensors.items():
        m = re.search(r"layers\.(\d+)\.", name)
        if m:
            if layers is not None and int(m.group(1)) not in layers:
                continue
        elif "embed_tokens" in name:
            if not ends[0]:
                continue
        elif not ends[1]:
            continue
        b = tensor_bytes(info, served if _is_weight_like(name) else None)
        total += b * shard_fraction(name, info, spec, tp, ep)
    return int(round(total))


# --- tensors from config.json ------------------------------------------------------


def _t(dtype: str, *shape: int) -> TensorInfo:
    return TensorInfo(dtype, tuple(int(s) for s in shape))


def linear_tensors(prefix: str, out_f: int, in_f: int, q: QuantSpec | None, dt: str, experts: int = 0,
                   bias: bool = False) -> dict[str, TensorInfo]:
    """A linear layer (``[out, in]``) as a checkpoint stores it; ``experts`` > 0 stacks it per expert."""
    e = (experts,) if experts else ()

    def t(dtype: str, *shape: int) -> TensorInfo:
        return _t(dtype, *e, *shape)

    out: dict[str, TensorInfo] = {}
    if bias:
        out[f"{prefix}.bias"] = t(dt, out_f)
    if q is None:
        out[f"{prefix}.weight"] = t(dt, out_f, in_f)
        return out
    for layout in (_integer_layout, _fp8_layout, _fp4_layout, _bitsandbytes_layout):
        tensors = layout(prefix, out_f, in_f, q, dt, t)
        if tensors is not None:
            return out | tensors
    raise ValueError(f"quantization: no tensor layout for {q.describe()}")


# A layout: (prefix, out_f, in_f, quantization, unquantized dtype, shape maker) -> the layer's tensors, or
# None when the quantization is not one of its formats. The shape maker prepends the expert dimension.
_Shape = Callable[..., TensorInfo]


def _integer_layout(prefix: str, out_f: int, in_f: int, q: QuantSpec, dt: str,
                    t: _Shape) -> dict[str, TensorInfo] | None:
    """Packed integer codes with group scales (AWQ, GPTQ, compressed-tensors W4A16/W8A16), and W8A8-INT8."""
    g = q.group_size if q.group_size > 0 else in_f
    groups = math.ceil(in_f / g)
    per_int = 32 // q.bits
    if q.method == "awq":
        return {f"{prefix}.qweight": t("I32", in_f, out_f // per_int), f"{prefix}.qzeros": t("I32", groups, out_f // per_int),
                f"{prefix}.scales": t("F16", groups, out_f)}
    if q.method == "gptq":
        return {f"{prefix}.qweight": t("I32", in_f // per_int, out_f), f"{prefix}.qzeros": t("I32", groups, out_f // per_int),
                f"{prefix}.scales": t("F16", groups, out_f), f"{prefix}.g_idx": t("I32", in_f)}
    if q.scheme in ("w4a16", "w8a16"):
        out = {f"{prefix}.weight_packed": t("I32", out_f, in_f // per_int), f"{prefix}.weight_scale": t(dt, out_f, groups),
               f"{prefix}.weight_shape": t("I64", 2)}
        if q.desc_act:
            out[f"{prefix}.weight_g_idx"] = t("I32", in_f)
        return out
    if q.scheme == "w8a8-int8":
        return {f"{prefix}.weight": t("I8", out_f, in_f), f"{prefix}.weight_scale": t("F32", out_f, 1)}
    return None


def _fp8_layout(prefix: str, out_f: int, in_f: int, q: QuantSpec, dt: str, t: _Shape) -> dict[str, TensorInfo] | None:
    """FP8 weights with per-tensor, per-channel or 128×128-block scales."""
    if q.scheme not in ("fp8", "fp8-channel", "fp8-block"):
        return None
    out = {f"{prefix}.weight": t("F8_E4M3", out_f, in_f)}
    if q.scheme == "fp8-block":
        key = "weight_scale" if q.method == "compressed-tensors" else "weight_scale_inv"
        out[f"{prefix}.{key}"] = t("F32", math.ceil(out_f / q.block[0]), math.ceil(in_f / q.block[1]))
    elif q.scheme == "fp8-channel":
        out[f"{prefix}.weight_scale"] = t("F32", out_f, 1)
    else:
        out[f"{prefix}.weight_scale"] = t("F32")
    if q.static_input_scale:
        out[f"{prefix}.input_scale"] = t("F32")
    return out


def _fp4_layout(prefix: str, out_f: int, in_f: int, q: QuantSpec, dt: str, t: _Shape) -> dict[str, TensorInfo] | None:
    """NVFP4 (compressed-tensors or ModelOpt) and MXFP4 (gpt-oss's blocks and scales)."""
    if q.scheme == "nvfp4":
        w = "weight_packed" if q.method == "compressed-tensors" else "weight"
        out = {f"{prefix}.{w}": t("U8", out_f, in_f // 2), f"{prefix}.weight_scale": t("F8_E4M3", out_f, in_f // 16)}
        if q.method == "compressed-tensors":
            return out | {f"{prefix}.weight_global_scale": t("F32", 1), f"{prefix}.input_global_scale": t("F32", 1)}
        return out | {f"{prefix}.weight_scale_2": t("F32"), f"{prefix}.input_scale": t("F32")}
    if q.scheme == "mxfp4":
        return {f"{prefix}_blocks": t("U8", out_f, in_f // 32, 16), f"{prefix}_scales": t("U8", out_f, in_f // 32)}
    return None


def _bitsandbytes_layout(prefix: str, out_f: int, in_f: int, q: QuantSpec, dt: str,
                         t: _Shape) -> dict[str, TensorInfo] | None:
    """bitsandbytes NF4 (with or without nested absmax quantization) and LLM.int8."""
    if q.scheme == "nf4":
        n = out_f * in_f
        out = {f"{prefix}.weight": t("U8", n // 2, 1)}
        if q.double_quant:
            out |= {f"{prefix}.weight.absmax": t("U8", n // 64), f"{prefix}.weight.nested_absmax": t("F32", math.ceil(n / 64 / 256)),
                    f"{prefix}.weight.nested_quant_map": t("F32", 256)}
        else:
            out[f"{prefix}.weight.absmax"] = t("F32", math.ceil(n / 64))
        out[f"{prefix}.weight.quant_map"] = t("F32", 16)
        return out
    if q.scheme == "int8-bnb":
        return {f"{prefix}.weight": t("I8", out_f, in_f), f"{prefix}.SCB": t("F32", out_f)}
    return None


def _attention(p: str, spec: ModelSpec, q: QuantSpec | None, dt: str) -> dict[str, TensorInfo]:
    h = spec.hidden_size
    out: dict[str, TensorInfo] = {}
    if spec.is_mla:
        qk = spec.qk_nope_head_dim + spec.qk_rope_head_dim
        if spec.q_lora_rank:
            out |= linear_tensors(p + "q_a_proj", spec.q_lora_rank, h, q, dt)
            out[p + "q_a_layernorm.weight"] = _t(dt, spec.q_lora_rank)
            out |= linear_tensors(p + "q_b_proj", spec.num_heads * qk, spec.q_lora_rank, q, dt)
        else:
            out |= linear_tensors(p + "q_proj", spec.num_heads * qk, h, q, dt)
        out |= linear_tensors(p + "kv_a_proj_with_mqa", spec.kv_lora_rank + spec.qk_rope_head_dim, h, q, dt)
        out[p + "kv_a_layernorm.weight"] = _t(dt, spec.kv_lora_rank)
        out |= linear_tensors(p + "kv_b_proj", spec.num_heads * (spec.qk_nope_head_dim + spec.v_head_dim), spec.kv_lora_rank, q, dt)
        out |= linear_tensors(p + "o_proj", h, spec.num_heads * spec.v_head_dim, q, dt)
        return out
    qd, kvd = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    b = spec.attention_bias
    out |= linear_tensors(p + "q_proj", qd, h, q, dt, bias=b)
    out |= linear_tensors(p + "k_proj", kvd, h, q, dt, bias=b)
    out |= linear_tensors(p + "v_proj", kvd, h, q, dt, bias=b)
    out |= linear_tensors(p + "o_proj", h, qd, q, dt, bias=spec.model_type == "gpt_oss")
    if spec.qk_norm:
        out |= {p + "q_norm.weight": _t(dt, spec.head_dim), p + "k_norm.weight": _t(dt, spec.head_dim)}
    if spec.attention_sinks:
        out[p + "sinks"] = _t(dt, spec.num_heads)
    return out


def _mlp(p: str, inter: int, spec: ModelSpec, q: QuantSpec | None, dt: str, experts: int = 0,
         names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")) -> dict[str, TensorInfo]:
    h = spec.hidden_size
    bias = spec.expert_bias and experts > 0
    if spec.model_type == "gpt_oss" and experts:  # fused gate_up, stored per layer with the expert dim first
        return linear_tensors(p + "gate_up_proj", 2 * inter, h, q, dt, experts, bias) | linear_tensors(
            p + "down_proj", h, inter, q, dt, experts, bias)
    g, u, d = names
    return (linear_tensors(p + g, inter, h, q, dt, experts, bias) | linear_tensors(p + u, inter, h, q, dt, experts, bias)
            | linear_tensors(p + d, h, inter, q, dt, experts, bias))


def _moe(p: str, spec: ModelSpec, q: QuantSpec | None, dt: str) -> dict[str, TensorInfo]:
    h, e = spec.hidden_size, spec.num_experts
    expert_q = q
    if spec.model_type == "mixtral":
        out = {p + "block_sparse_moe.gate.weight": _t(dt, e, h)}
        return out | _mlp(p + "block_sparse_moe.experts.", spec.moe_intermediate_size, spec, expert_q, dt, e, ("w1", "w3", "w2"))
    router = "mlp.router" if spec.model_type == "gpt_oss" else "mlp.gate"
    out = {f"{p}{router}.weight": _t(dt, e, h)}
    if spec.router_bias:
        out[f"{p}{router}.bias"] = _t(dt, e)
    if spec.model_type == "deepseek_v3":
        out[p + "mlp.gate.e_score_correction_bias"] = _t("F32", e)
    out |= _mlp(p + "mlp.experts.", spec.moe_intermediate_size, spec, expert_q, dt, e)
    if spec.shared_expert_intermediate_size:
        shared = "mlp.shared_experts." if spec.model_type.startswith("deepseek") else "mlp.shared_expert."
        out |= _mlp(p + shared, spec.shared_expert_intermediate_size, spec, q, dt)
        if spec.shared_expert_gate:
            out[p + "mlp.shared_expert_gate.weight"] = _t(dt, 1, h)
    return out


def _quantized_parts(spec: ModelSpec, q: QuantSpec | None) -> tuple[QuantSpec | None, QuantSpec | None]:
    """(attention quant, MLP/expert quant): MXFP4 checkpoints quantize only the experts."""
    if q is not None and q.scheme == "mxfp4":
        return None, q
    return q, q


def config_tensors(spec: ModelSpec, quant: QuantSpec | None = None) -> dict[str, TensorInfo]:
    """The tensors of a checkpoint of ``spec`` stored with ``quant`` (default: the checkpoint's)."""
    q = quant if quant is not None else spec.quant
    dt = SERVED_DTYPE.get(spec.dtype, "BF16")
    attn_q, mlp_q = _quantized_parts(spec, q)
    h = spec.hidden_size
    out = {"model.embed_tokens.weight": _t(dt, spec.vocab_size, h)}
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        norms = ["input_layernorm", "post_attention_layernorm"]
        if spec.norms_per_layer == 4:
            norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
        out |= {f"{p}{n}.weight": _t(dt, h) for n in norms}
        out |= _attention(p + "self_attn.", spec, attn_q, dt)
        if spec.is_sparse_layer(i):
            out |= _moe(p, spec, mlp_q, dt)
        else:
            out |= _mlp(p + "mlp.", spec.intermediate_size, spec, mlp_q if spec.model_type != "gpt_oss" else None, dt)
    out["model.norm.weight"] = _t(dt, h)
    if not spec.tie_word_embeddings:
        lm_q = q if q is not None and q.lm_head_quantized else None
        out |= linear_tensors("lm_head", spec.vocab_size, h, lm_q, dt)
    return out


def online_quant(method: str) -> QuantSpec:
    """What vLLM stores when it quantizes a 16-bit checkpoint at load time."""
    if method == "fp8":
        return QuantSpec("fp8", 8, -1, scheme="fp8")
    if method == "bitsandbytes":
        return QuantSpec("bitsandbytes", 4, 64, scheme="nf4")
    raise ValueError(f"quantization: {method!r} cannot be applied to an unquantized checkpoint at load time "
                     "(online quantization exists for fp8 and bitsandbytes)")


# --- load-time changes -----------------------------------------------------------


def load_time_bytes(spec: ModelSpec, dtype: str, tp: int, on_gpu: bool, layers: int) -> tuple[int, list[str]]:
    """Bytes vLLM allocates at load beyond the checkpoint's tensors (per rank), and what they are."""
    db = DTYPE_BYTES[SERVED_DTYPE[dtype]]
    notes = []
    total = 0
    if spec.rotary_dim:
        caches = 2 if spec.model_type in ("gemma3", "gemma3_text") else 1
        rope = caches * spec.max_position_embeddings * spec.rotary_dim * db
        total += rope
        notes.append(f"rotary cos/sin cache {rope / 2**20:.1f} MiB")
    total += layers * ATTENTION_SCALE_BYTES
    if spec.is_mla:
        heads = spec.num_heads // tp
        absorbed = layers * heads * (spec.qk_nope_head_dim + spec.v_head_dim) * spec.kv_lora_rank * db
        total += absorbed
        notes.append(f"MLA absorbed W_UK/W_UV {absorbed / 2**30:.2f} GiB")
    return total, notes


def drop_at_load(tensors: dict[str, TensorInfo], spec: ModelSpec, on_gpu: bool) -> dict[str, TensorInfo]:
    """Checkpoint tensors vLLM does not keep after loading.

    GPTQ (symmetric, which vLLM requires for 4 bit): the zero points are implied, and without
    act-order g_idx is the identity; Marlin (GPU) and the CPU WNA16 kernel both replace them
    with empty tensors (measured on the CPU build: the loaded model is exactly the checkpoint
    less its g_idx and qzeros).
    """
    q = spec.quant
    if q is not None and q.method == "gptq":
        drop = (".qzeros",) + (() if q.desc_act else (".g_idx",))
        return {k: v for k, v in tensors.items() if not k.endswith(drop)}
    return tensors


def with_quant(spec: ModelSpec, quant: QuantSpec | None) -> ModelSpec:
    return replace(spec, quant=quant, tensors=None)
