"""Architecture and quantization facts of a checkpoint, from its ``config.json`` (and tensors).

``load_spec(source, revision)`` resolves the source (``cluster.planning.hub``: a local directory or a
hub id) and reads its ``config.json`` into a ``ModelSpec``: dense attention (Llama, Mistral,
Qwen2/2.5/3, Gemma 2/3, Phi-3), mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE,
DeepSeek-V2/V3, gpt-oss), MLA attention and sliding-window layers. A ``model_type``
outside ``SUPPORTED_MODEL_TYPES`` is refused by name. Where the checkpoint's safetensors
headers could be read, ``ModelSpec.tensors`` holds every tensor's dtype and shape, and the
planner counts those instead of arithmetic.

Offline with an uncached hub id, ``config.json`` files of common checkpoints shipped in
``cluster/planning/known_models/<org>/<name>/config.json`` (copies of the published files) stand in.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cluster.planning.hub import HubError, ResolvedSource, TensorInfo, resolve

KNOWN_MODELS_DIR = Path(__file__).with_name("known_models")

SUPPORTED_MODEL_TYPES = (
    "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "gemma3_text", "phi3",
    "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "gpt_oss",
)

# model_type of a config.json that names only its architecture.
_ARCH_MODEL_TYPES = {
    "LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3", "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3_text",
    "Phi3ForCausalLM": "phi3", "MixtralForCausalLM": "mixtral", "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe", "DeepseekV2ForCausalLM": "deepseek_v2", "DeepseekV3ForCausalLM": "deepseek_v3",
    "GptOssForCausalLM": "gpt_oss",
}


@dataclass(frozen=True)
class QuantSpec:
    """The checkpoint's ``quantization_config``, reduced to what memory depends on.

    ``method`` is vLLM's quantization name (awq, gptq, fp8, compressed-tensors, modelopt,
    modelopt_fp4, mxfp4, bitsandbytes). ``scheme`` says what the weights are stored as:
    w4a16 / w8a16 (packed integer codes + group scales), w8a8-int8, fp8 (per tensor),
    fp8-channel, fp8-block, nvfp4, mxfp4, nf4, int8-bnb.
    """

    method: str
    bits: int = 4
    group_size: int = 128  # -1: one group per input row (per-channel)
    lm_head_quantized: bool = False
    desc_act: bool = False
    double_quant: bool = False  # bitsandbytes nested quantization of absmax
    scheme: str = "w4a16"
    block: tuple[int, int] = (128, 128)  # fp8-block weight block
    static_input_scale: bool = False

    @property
    def format(self) -> str:
        """The hardware-support key of cluster.planning.hardware.FORMATS."""
        if self.method in ("awq", "gptq"):
            return self.method
        return {"w4a16": "wna16", "w8a16": "wna16", "w8a8-int8": "int8", "nvfp4": "nvfp4", "mxfp4": "mxfp4",
                "nf4": "bitsandbytes", "int8-bnb": "bitsandbytes"}.get(self.scheme, "fp8")

    def describe(self) -> str:
        if self.method in ("awq", "gptq") or self.scheme in ("w4a16", "w8a16"):
            g = "per-channel" if self.group_size <= 0 else f"group {self.group_size}"
            return f"{self.method} {self.bits}-bit {g}" + (" act-order" if self.desc_act else "")
        if self.scheme == "fp8-block":
            return f"{self.method} fp8 blocks {self.block[0]}×{self.block[1]}"
        return f"{self.method} {self.scheme}"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    max_position_embeddings: int = 4096
    dtype: str = "bfloat16"
    quant: QuantSpec | None = None
    model_type: str = "llama"
    # Mixture of experts (0 experts: dense). moe_layers[i] says whether layer i is sparse.
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    shared_expert_gate: bool = False
    moe_layers: tuple[bool, ...] = ()
    expert_bias: bool = False
    router_bias: bool = False
    # MLA (DeepSeek): a latent KV cache of kv_lora_rank + qk_rope_head_dim per token and layer.
    kv_lora_rank: int = 0
    q_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # Attention details: per-layer kind ("full" or "sliding"), window, q/k norms, sinks.
    layer_types: tuple[str, ...] = ()
    sliding_window: int = 0
    qk_norm: bool = False
    norms_per_layer: int = 2
    attention_sinks: bool = False
    rotary_dim: int = 0
    revision: str | None = None
    tensors: dict[str, TensorInfo] | None = None
    tensors_note: str = ""
    local_dir: str | None = None

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    def layer_kind(self, i: int) -> str:
        return self.layer_types[i] if self.layer_types else "full"

    def is_sparse_layer(self, i: int) -> bool:
        return self.is_moe and (self.moe_layers[i] if self.moe_layers else True)

    def describe(self) -> str:
        attn = (
            f"MLA (latent {self.kv_lora_rank} + rope {self.qk_rope_head_dim}), {self.num_heads} heads"
            if self.is_mla
            else f"{self.num_heads} heads ({self.num_kv_heads} KV) × head_dim {self.head_dim}"
        )
        out = f"{self.model_type}: {self.num_layers} layers, hidden {self.hidden_size}, {attn}"
        if self.is_moe:
            sparse = sum(self.is_sparse_layer(i) for i in range(self.num_layers))
            out += (
                f", {self.num_experts} experts (top-{self.experts_per_token}) × intermediate "
                f"{self.moe_intermediate_size} in {sparse} layers"
            )
            if self.shared_expert_intermediate_size:
                out += f" + shared {self.shared_expert_intermediate_size}"
            if sparse < self.num_layers:
                out += f", dense intermediate {self.intermediate_size}"
        else:
            out += f", intermediate {self.intermediate_size}"
        if self.sliding_window and "sliding" in self.layer_types:
            n = self.layer_types.count("sliding")
            out += f", {n} sliding-window layers (window {self.sliding_window})"
        return out + f", vocab {self.vocab_size}"


# --- quantization_config -------------------------------------------------------


def _compressed_tensors(qc: dict[str, Any]) -> QuantSpec:
    groups = qc.get("config_groups") or {}
    if not groups:
        raise ValueError("quantization_config: compressed-tensors without config_groups")
    g = next(iter(groups.values()))
    w = g.get("weights") or {}
    a = g.get("input_activations") or {}
    wtype, bits = w.get("type", "int"), int(w.get("num_bits", 8))
    strategy = w.get("strategy", "tensor")
    gs = int(w.get("group_size") or -1) if strategy == "group" else -1
    lm_head = "lm_head" not in (qc.get("ignore") or []) and any(
        "lm_head" in str(t) for t in g.get("targets", [])
    )
    if wtype == "float" and bits == 4:
        return QuantSpec("compressed-tensors", 4, int(w.get("group_size") or 16), lm_head, scheme="nvfp4")
    if wtype == "float":
        scheme = {"tensor": "fp8", "channel": "fp8-channel", "block": "fp8-block"}.get(strategy, "fp8")
        block = tuple(w.get("block_structure") or (128, 128))
        return QuantSpec("compressed-tensors", 8, -1, lm_head, scheme=scheme, block=(int(block[0]), int(block[1])),
                         static_input_scale=bool(a) and not a.get("dynamic", True))
    if a and bits == 8:
        return QuantSpec("compressed-tensors", 8, gs, lm_head, scheme="w8a8-int8",
                         static_input_scale=not a.get("dynamic", True))
    return QuantSpec("compressed-tensors", bits, gs, lm_head, desc_act=bool(w.get("actorder")),
                     scheme="w4a16" if bits == 4 else "w8a16")


def quant_from_config(qc: dict[str, Any] | None) -> QuantSpec | None:
    """The checkpoint's quantization, from config.json's ``quantization_config``."""
    if not qc:
        return None
    method = str(qc.get("quant_method", "")).lower()
    if method == "awq":
        return QuantSpec("awq", int(qc.get("bits", qc.get("w_bit", 4))), int(qc.get("group_size", qc.get("q_group_size", 128))))
    if method == "gptq":
        return QuantSpec("gptq", int(qc.get("bits", 4)), int(qc.get("group_size", 128)), bool(qc.get("lm_head", False)),
                         desc_act=bool(qc.get("desc_act", False)), scheme="w4a16" if int(qc.get("bits", 4)) == 4 else "w8a16")
    if method == "compressed-tensors":
        return _compressed_tensors(qc)
    if method == "fp8":
        block = qc.get("weight_block_size")
        if block:
            return QuantSpec("fp8", 8, -1, scheme="fp8-block", block=(int(block[0]), int(block[1])))
        return QuantSpec("fp8", 8, -1, scheme="fp8", static_input_scale=qc.get("activation_scheme") == "static")
    if method in ("modelopt", "modelopt_fp4"):
        algo = str(qc.get("quant_algo") or (qc.get("quantization") or {}).get("quant_algo") or "").upper()
        if "FP4" in algo or method == "modelopt_fp4":
            return QuantSpec("modelopt_fp4", 4, int(qc.get("group_size", 16)), scheme="nvfp4", static_input_scale=True)
        return QuantSpec("modelopt", 8, -1, scheme="fp8", static_input_scale=True)
    if method == "mxfp4":
        return QuantSpec("mxfp4", 4, 32, scheme="mxfp4")
    if method == "bitsandbytes":
        if qc.get("load_in_8bit"):
            return QuantSpec("bitsandbytes", 8, -1, scheme="int8-bnb")
        return QuantSpec("bitsandbytes", 4, 64, double_quant=bool(qc.get("bnb_4bit_use_double_quant")), scheme="nf4")
    raise ValueError(
        f"quantization_config.quant_method: {method!r} is not one kvpilot plans "
        "(awq, gptq, compressed-tensors, fp8, modelopt, modelopt_fp4, mxfp4, bitsandbytes)"
    )


# --- config.json -------------------------------------------------------------------


def _layer_types(cfg: dict[str, Any], n: int, model_type: str) -> tuple[tuple[str, ...], int]:
    window = int(cfg.get("sliding_window") or 0)
    types = cfg.get("layer_types")
    if types:
        kinds = tuple("sliding" if "sliding" in str(t) else "full" for t in types[:n])
    elif model_type == "gemma2" and window:
        kinds = tuple("sliding" if i % 2 == 0 else "full" for i in range(n))
    elif model_type in ("gemma3", "gemma3_text") and window:
        every = int(cfg.get("sliding_window_pattern") or 6)
        kinds = tuple("full" if (i + 1) % every == 0 else "sliding" for i in range(n))
    elif window and cfg.get("use_sliding_window", model_type in ("mistral", "phi3", "mixtral")):
        if model_type == "phi3" and window >= int(cfg.get("max_position_embeddings", 0)):
            kinds = ()
        else:
            kinds = tuple("sliding" for _ in range(n))
    else:
        kinds = ()
    if not window or "sliding" not in kinds:
        return (), 0
    return kinds, window


def _moe_fields(cfg: dict[str, Any], mt: str, n: int) -> dict[str, Any]:
    experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or cfg.get("n_routed_experts") or 0)
    if not experts or mt not in ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "gpt_oss"):
        return {}
    inter = int(cfg.get("moe_intermediate_size") or cfg["intermediate_size"])
    if mt in ("deepseek_v2", "deepseek_v3"):
        first_dense = int(cfg.get("first_k_dense_replace", 0))
        freq = int(cfg.get("moe_layer_freq", 1))
        layers = tuple(i >= first_dense and i % freq == 0 for i in range(n))
        shared = int(cfg.get("n_shared_experts") or 0) * inter
    elif mt in ("qwen2_moe", "qwen3_moe"):
        step = int(cfg.get("decoder_sparse_step", 1))
        only = set(cfg.get("mlp_only_layers") or [])
        layers = tuple(i not in only and (i + 1) % step == 0 for i in range(n))
        shared = int(cfg.get("shared_expert_intermediate_size") or 0)
    else:
        layers, shared = (), 0
    return {
        "num_experts": experts,
        "experts_per_token": int(cfg.get("num_experts_per_tok") or cfg.get("experts_per_token") or 2),
        "moe_intermediate_size": inter,
        "shared_expert_intermediate_size": shared,
        "shared_expert_gate": mt == "qwen2_moe" and shared > 0,
        "moe_layers": layers,
        "expert_bias": mt == "gpt_oss",
        "router_bias": mt == "gpt_oss",
    }


def spec_from_config_dict(name: str, cfg: dict[str, Any]) -> ModelSpec:
    """Build a spec from a Hugging Face ``config.json`` dictionary."""
    if "text_config" in cfg and "hidden_size" not in cfg:  # multimodal wrappers (Gemma 3): plan the language model
        cfg = {**cfg["text_config"], "quantization_config": cfg.get("quantization_config"),
               "torch_dtype": cfg.get("torch_dtype") or cfg["text_config"].get("torch_dtype")}
    mt = str(cfg.get("model_type") or "") or _ARCH_MODEL_TYPES.get(next(iter(cfg.get("architectures") or []), ""), "")
    if mt not in SUPPORTED_MODEL_TYPES:
        arch = ", ".join(cfg.get("architectures") or []) or "no architectures field"
        raise ValueError(
            f"{name}: model_type {mt!r} ({arch}) is not an architecture kvpilot can plan; supported: "
            + ", ".join(SUPPORTED_MODEL_TYPES)
        )
    try:
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        n = int(cfg["num_hidden_layers"])
        kinds, window = _layer_types(cfg, n, mt)
        mla = mt in ("deepseek_v2", "deepseek_v3") and cfg.get("kv_lora_rank")
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        partial = float(cfg.get("partial_rotary_factor", 1.0))
        spec = ModelSpec(
            name=name,
            num_layers=n,
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            intermediate_size=int(cfg["intermediate_size"]),
            vocab_size=int(cfg["vocab_size"]),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", mt.startswith("gemma"))),
            attention_bias=bool(cfg.get("attention_bias", mt in ("qwen2", "qwen2_moe"))),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
            quant=quant_from_config(cfg.get("quantization_config")),
            model_type=mt,
            layer_types=kinds,
            sliding_window=window,
            qk_norm=mt in ("qwen3", "qwen3_moe", "gemma3", "gemma3_text"),
            norms_per_layer=4 if mt.startswith("gemma") else 2,
            attention_sinks=mt == "gpt_oss",
            rotary_dim=int(cfg.get("qk_rope_head_dim") or 0) if mla else int(head_dim * partial),
            **_moe_fields(cfg, mt, n),
        )
        if mla:
            spec = replace(
                spec,
                kv_lora_rank=int(cfg["kv_lora_rank"]),
                q_lora_rank=int(cfg.get("q_lora_rank") or 0),
                qk_nope_head_dim=int(cfg["qk_nope_head_dim"]),
                qk_rope_head_dim=int(cfg["qk_rope_head_dim"]),
                v_head_dim=int(cfg["v_head_dim"]),
                num_kv_heads=heads,
                head_dim=int(cfg["qk_nope_head_dim"]) + int(cfg["qk_rope_head_dim"]),
            )
        return spec
    except KeyError as e:
        raise ValueError(f"{name}: config.json lacks {e.args[0]!r}") from e


def known_config(source: str) -> dict[str, Any] | None:
    """The shipped copy of a hub repository's published config.json, if kvpilot has one."""
    f = KNOWN_MODELS_DIR / source / "config.json"
    return json.loads(f.read_text()) if "/" in source and ".." not in source and f.is_file() else None


def known_model_ids() -> list[str]:
    return sorted(str(p.parent.relative_to(KNOWN_MODELS_DIR)) for p in KNOWN_MODELS_DIR.glob("*/*/config.json"))


class _KnownSpecs(Mapping[str, ModelSpec]):
    """The specs of kvpilot's shipped config.json copies, by hub id (read on access)."""

    def __getitem__(self, source: str) -> ModelSpec:
        cfg = known_config(source)
        if cfg is None:
            raise KeyError(source)
        return spec_from_config_dict(source, cfg)

    def __iter__(self) -> Iterator[str]:
        return iter(known_model_ids())

    def __len__(self) -> int:
        return len(known_model_ids())


BUILTIN: Mapping[str, ModelSpec] = _KnownSpecs()


def _offline_error(e: HubError) -> bool:
    msg = str(e)
    return "cannot be reached" in msg or "HF_HUB_OFFLINE" in msg


@functools.lru_cache(maxsize=64)
def load_spec(source: str, revision: str | None = None) -> ModelSpec:
    """Resolve a model source (local directory or hub id) into its spec.

    Memoized: a config asks for its spec many times, and a hub id costs requests.
    """
    try:
        resolved = resolve(source, revision)
    except HubError as e:
        cfg = known_config(source) if _offline_error(e) and revision is None else None
        if cfg is None:
            raise
        resolved = ResolvedSource(source, cfg, None, None, None, f"hub unreachable: kvpilot's copy of {source}/config.json")
    spec = spec_from_config_dict(source, resolved.config)
    return replace(spec, revision=resolved.revision, tensors=resolved.tensors, tensors_note=resolved.headers_note,
                   local_dir=resolved.local_dir)
