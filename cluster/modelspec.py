"""Architecture facts of a decoder-only transformer, from ``config.json`` or a built-in table.

The planner needs only shapes, never weights: a local model directory is read
from its ``config.json``; common hub ids are known without the files so that
planning works before anything is downloaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class QuantSpec:
    """The checkpoint's ``quantization_config``, reduced to what memory depends on."""

    method: str  # kvpilot name: awq, gptq, fp8, int8, bitsandbytes
    bits: int = 4
    group_size: int = 128  # -1: one group per input row (per-channel)
    lm_head_quantized: bool = False
    desc_act: bool = False
    double_quant: bool = False  # bitsandbytes nested quantization of absmax


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

    def describe(self) -> str:
        return (
            f"{self.num_layers} layers, hidden {self.hidden_size}, {self.num_heads} heads "
            f"({self.num_kv_heads} KV) × head_dim {self.head_dim}, intermediate "
            f"{self.intermediate_size}, vocab {self.vocab_size}"
        )


# kvpilot's quantization names by the checkpoint's ``quant_method``.
_QUANT_METHODS = {
    "awq": "awq",
    "gptq": "gptq",
    "fp8": "fp8",
    "compressed-tensors": "int8",
    "bitsandbytes": "bitsandbytes",
}


def _quant_from_config(qc: dict[str, Any] | None) -> QuantSpec | None:
    if not qc:
        return None
    method = str(qc.get("quant_method", "")).lower()
    if method not in _QUANT_METHODS:
        raise ValueError(f"quantization_config.quant_method: {method!r} is not one kvpilot plans ({', '.join(_QUANT_METHODS)})")
    name = _QUANT_METHODS[method]
    if name in ("fp8", "int8"):
        return QuantSpec(name, bits=8, group_size=-1)
    if name == "bitsandbytes":
        bits = 8 if qc.get("load_in_8bit") else 4
        return QuantSpec(name, bits=bits, group_size=64, double_quant=bool(qc.get("bnb_4bit_use_double_quant")))
    return QuantSpec(
        name,
        bits=int(qc.get("bits", qc.get("w_bit", 4))),
        group_size=int(qc.get("group_size", qc.get("q_group_size", 128))),
        lm_head_quantized=bool(qc.get("lm_head", False)),
        desc_act=bool(qc.get("desc_act", False)),
    )


def spec_from_config_dict(name: str, cfg: dict[str, Any]) -> ModelSpec:
    """Build a spec from a Hugging Face ``config.json`` dictionary (Llama-style fields)."""
    try:
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        return ModelSpec(
            name=name,
            num_layers=int(cfg["num_hidden_layers"]),
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            intermediate_size=int(cfg["intermediate_size"]),
            vocab_size=int(cfg["vocab_size"]),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2")),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
            quant=_quant_from_config(cfg.get("quantization_config")),
        )
    except KeyError as e:
        raise ValueError(f"{name}: config.json lacks {e.args[0]!r}") from e


def _llama(name: str, layers: int, hidden: int, heads: int, kv: int, inter: int, vocab: int, **kw: Any) -> ModelSpec:
    return ModelSpec(name, layers, hidden, heads, kv, hidden // heads, inter, vocab, **kw)


_AWQ = QuantSpec("awq")
_GPTQ = QuantSpec("gptq")
_FP8 = QuantSpec("fp8", bits=8, group_size=-1)

_LLAMA2_7B = _llama("meta-llama/Llama-2-7b-hf", 32, 4096, 32, 32, 11008, 32000, dtype="float16")
_LLAMA2_13B = _llama("meta-llama/Llama-2-13b-hf", 40, 5120, 40, 40, 13824, 32000, dtype="float16")
_LLAMA2_70B = _llama("meta-llama/Llama-2-70b-hf", 80, 8192, 64, 8, 28672, 32000, dtype="float16")
_LLAMA3_8B = _llama("meta-llama/Meta-Llama-3-8B", 32, 4096, 32, 8, 14336, 128256, max_position_embeddings=8192)
_LLAMA3_70B = _llama("meta-llama/Meta-Llama-3-70B", 80, 8192, 64, 8, 28672, 128256, max_position_embeddings=8192)
_MISTRAL_V01 = _llama("mistralai/Mistral-7B-v0.1", 32, 4096, 32, 8, 14336, 32000, max_position_embeddings=32768)
_MISTRAL_V03 = _llama("mistralai/Mistral-7B-Instruct-v0.3", 32, 4096, 32, 8, 14336, 32768, max_position_embeddings=32768)
_QWEN25_7B = _llama(
    "Qwen/Qwen2.5-7B-Instruct", 28, 3584, 28, 4, 18944, 152064, attention_bias=True, max_position_embeddings=32768
)


def _alias(spec: ModelSpec, name: str, quant: QuantSpec | None = None, dtype: str | None = None) -> ModelSpec:
    return replace(spec, name=name, quant=quant or spec.quant, dtype=dtype or spec.dtype)


BUILTIN: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        _LLAMA2_7B,
        _alias(_LLAMA2_7B, "meta-llama/Llama-2-7b-chat-hf"),
        _LLAMA2_13B,
        _alias(_LLAMA2_13B, "meta-llama/Llama-2-13b-chat-hf"),
        _LLAMA2_70B,
        _alias(_LLAMA2_70B, "meta-llama/Llama-2-70b-chat-hf"),
        _LLAMA3_8B,
        _alias(_LLAMA3_8B, "meta-llama/Meta-Llama-3-8B-Instruct"),
        _LLAMA3_70B,
        _alias(_LLAMA3_70B, "meta-llama/Meta-Llama-3-70B-Instruct"),
        _MISTRAL_V01,
        _alias(_MISTRAL_V01, "mistralai/Mistral-7B-Instruct-v0.1"),
        _MISTRAL_V03,
        _alias(_MISTRAL_V03, "mistralai/Mistral-7B-v0.3"),
        _QWEN25_7B,
        _alias(_QWEN25_7B, "Qwen/Qwen2.5-7B"),
        # Pre-quantized checkpoints (4-bit, group 128 unless said otherwise).
        _alias(_LLAMA2_70B, "TheBloke/Llama-2-70B-AWQ", _AWQ),
        _alias(_LLAMA2_70B, "TheBloke/Llama-2-70B-Chat-AWQ", _AWQ),
        _alias(_LLAMA2_70B, "TheBloke/Llama-2-70B-GPTQ", _GPTQ),
        _alias(_LLAMA2_7B, "TheBloke/Llama-2-7B-AWQ", _AWQ),
        _alias(_LLAMA2_7B, "TheBloke/Llama-2-7B-GPTQ", _GPTQ),
        _alias(_LLAMA2_13B, "TheBloke/Llama-2-13B-AWQ", _AWQ),
        _alias(_MISTRAL_V01, "TheBloke/Mistral-7B-Instruct-v0.1-GPTQ", _GPTQ),
        _alias(_MISTRAL_V01, "TheBloke/Mistral-7B-Instruct-v0.2-GPTQ", _GPTQ, "float16"),
        _alias(_LLAMA3_8B, "neuralmagic/Meta-Llama-3-8B-Instruct-FP8", _FP8),
        _alias(_LLAMA3_8B, "hugging-quants/Meta-Llama-3.1-8B-Instruct-AWQ-INT4", _AWQ, "float16"),
        _alias(_QWEN25_7B, "Qwen/Qwen2.5-7B-Instruct-AWQ", _AWQ, "float16"),
        _alias(_QWEN25_7B, "Qwen/Qwen2.5-7B-Instruct-GPTQ-Int4", _GPTQ, "float16"),
    )
}


def load_spec(source: str) -> ModelSpec:
    """Resolve a model source: a local directory with ``config.json``, or a built-in hub id."""
    path = Path(source).expanduser()
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ValueError(f"{source}: directory has no config.json")
        try:
            cfg = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_file}: not valid JSON ({e})") from e
        return spec_from_config_dict(source, cfg)
    if source in BUILTIN:
        return BUILTIN[source]
    if source.startswith(("/", "./", "../", "~")):
        raise ValueError(f"{source}: no such model directory")
    raise ValueError(
        f"{source}: not a local model directory and not a built-in hub id; "
        f"download it and give its path, or use one of: {', '.join(sorted(BUILTIN))}"
    )
