"""LoRA adapters of a served model: what an adapter must be to run on its base, and what its buffers cost.

Pure (no Ray, no vLLM): the config checks and the planner use it.

An adapter is a PEFT directory (``adapter_config.json`` + ``adapter_model.safetensors``),
local or on the hub (``cluster.planning.hub.resolve_adapter``). It fits its base when

* its rank (``r``, and every ``rank_pattern`` rank) is at most ``max_lora_rank`` (vLLM
  sizes its GPU buffers for that rank and refuses a larger adapter at load);
* every module it targets is a linear layer of the base that vLLM can put a LoRA on, and
  every ``lora_A`` / ``lora_B`` tensor has that layer's input / output width (an adapter
  trained on another base has other widths, or other layer counts);
* the base's quantization has a LoRA path in vLLM 0.32 (see ``lora_quantization_refusal``).

The buffers: vLLM allocates, per LoRA-wrapped layer, ``max_loras`` slots of
``A [max_lora_rank, in]`` and ``B [out, max_lora_rank]`` in the LoRA dtype (the model's).
Under tensor parallelism a column-parallel layer (q/k/v, gate/up) splits ``B``'s output
and keeps ``A`` whole, a row-parallel one (o, down) splits ``A``'s input and keeps ``B``
whole (vLLM's default, ``fully_sharded_loras`` off).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.planning.modelspec import ModelSpec

# vLLM 0.32's LoRAConfig.max_lora_rank choices.
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

# The dense decoder's LoRA-targetable linear layers (PEFT names), column- or row-parallel.
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")
DENSE_TARGETS = COLUMN_PARALLEL + ROW_PARALLEL


class AdapterError(ValueError):
    """An adapter does not fit its base; the message says why (the caller names the adapter)."""


@dataclass(frozen=True)
class AdapterInfo:
    """An adapter as the checks found it."""

    name: str
    source: str
    path: str  # the local directory vLLM loads
    rank: int  # the largest rank of any module
    target_modules: tuple[str, ...]
    size_bytes: int  # its weights (what a load moves, and one CPU cache slot holds)


def module_shapes(spec: ModelSpec) -> dict[str, tuple[int, int]]:
    """(out, in) of every LoRA-targetable linear layer of a dense decoder layer."""
    h, q = spec.hidden_size, spec.num_heads * spec.head_dim
    kv, inter = spec.num_kv_heads * spec.head_dim, spec.intermediate_size
    return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}


def lora_quantization_refusal(spec: ModelSpec, quantization: str, on_cpu: bool) -> str | None:
    """Why vLLM 0.32 cannot serve LoRA on this base (None: it can); ``quantization`` is the effective one.

    * MoE experts: vLLM's ``FusedMoEWithLoRA`` needs a modular kernel that supports LoRA,
      which only the unquantized (Triton) experts have; quantized experts assert at start.
    * MLA attention (DeepSeek's latent projections) has no LoRA layers beside the dense ones.
    * W8A8 int8 on the CPU engine (measured: AWQ, GPTQ and unquantized bases serve LoRA on CPU).
    """
    if spec.is_moe and quantization != "none":
        return (f"is a mixture of experts with {quantization} experts; vLLM 0.32's fused-MoE LoRA runs only on "
                "unquantized experts (its quantized MoE kernels have no LoRA path)")
    if spec.is_moe and on_cpu:
        return "is a mixture of experts; vLLM 0.32's CPU build has no fused-MoE LoRA kernel (Triton only)"
    int8 = quantization == "int8" or (spec.quant is not None and spec.quant.scheme == "w8a8-int8")
    if on_cpu and int8:
        # Measured on the tiny W8A8 fixture: the CPU int8 kernel drops the layer's `weight` after
        # repacking it, and vLLM's LoRA wrapper reads weight.device (AttributeError at start).
        return ("is W8A8 int8 (compressed-tensors); vLLM 0.32's CPU int8 kernel drops the weight tensor LoRA "
                "layers read (AttributeError at start); on cpu use awq, gptq or none")
    if spec.kv_lora_rank:
        return "uses MLA attention, whose latent projections vLLM 0.32 does not wrap with LoRA"
    return None


def _targets(cfg: dict[str, Any]) -> tuple[list[str], bool]:
    """The adapter's target module names, and whether PEFT gave them as a regex (not checked by name)."""
    t = cfg.get("target_modules")
    if isinstance(t, str):
        return [t], True
    if isinstance(t, list) and all(isinstance(x, str) for x in t):
        return list(t), False
    raise AdapterError(f"adapter_config.json has target_modules {t!r}; a list of module names or a regex is needed")


def _ranks(cfg: dict[str, Any]) -> list[int]:
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise AdapterError(f"adapter_config.json has rank r {r!r}; a positive integer is needed")
    pattern = cfg.get("rank_pattern") or {}
    return [r, *(v for v in pattern.values() if isinstance(v, int))]


def read_safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of one safetensors file (its header only)."""
    with path.open("rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise AdapterError(f"{path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", prefix)
        if n > 100 * 2**20:
            raise AdapterError(f"{path}: header length {n} is not a safetensors header")
        header = json.loads(fh.read(n))
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def _weights_bytes(path: Path) -> int:
    f = path / "adapter_model.safetensors"
    if f.is_file():
        return f.stat().st_size
    b = path / "adapter_model.bin"
    return b.stat().st_size if b.is_file() else 0


def check_adapter(name: str, source: str, path: str, cfg: dict[str, Any], spec: ModelSpec,
                  max_lora_rank: int) -> AdapterInfo:
    """Check one resolved adapter against its base; AdapterError says what does not fit."""
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise AdapterError(f"is a {cfg.get('peft_type')} adapter; vLLM serves LoRA adapters only")
    ranks = _ranks(cfg)
    if max(ranks) > max_lora_rank:
        raise AdapterError(f"has rank {max(ranks)}, above max_lora_rank {max_lora_rank}; raise max_lora_rank to "
                           f"{min(r for r in MAX_LORA_RANKS if r >= max(ranks))} or drop the adapter")
    for flag, what in (("use_dora", "DoRA"), ("lora_bias", "LoRA bias")):
        if cfg.get(flag):
            raise AdapterError(f"uses {what} ({flag}), which vLLM 0.32 does not serve")
    targets, is_regex = _targets(cfg)
    shapes = module_shapes(spec)
    if not is_regex:
        unknown = [t for t in targets if t.rsplit(".", 1)[-1] not in shapes]
        if unknown:
            raise AdapterError(f"targets {unknown[0]!r}, not a LoRA-capable linear layer of {spec.name} "
                               f"({', '.join(shapes)}): it was trained for another architecture")
    p = Path(path)
    st = p / "adapter_model.safetensors"
    if st.is_file():
        _check_shapes(read_safetensors_shapes(st), spec, shapes)
    elif not (p / "adapter_model.bin").is_file():
        raise AdapterError(f"{path} has no adapter_model.safetensors (or .bin)")
    found = tuple(sorted({t.rsplit(".", 1)[-1] for t in targets}))
    return AdapterInfo(name, source, path, max(ranks), found, _weights_bytes(p))


def _check_shapes(tensors: dict[str, tuple[int, ...]], spec: ModelSpec,
                  shapes: dict[str, tuple[int, int]]) -> None:
    for key, shape in tensors.items():
        parts = key.split(".")
        if "lora_A" in parts:
            side = "A"
        elif "lora_B" in parts:
            side = "B"
        else:
            continue
        i = parts.index("lora_" + side)
        module = parts[i - 1]
        if module not in shapes:
            raise AdapterError(f"has weights for {module!r} ({key}), not a LoRA-capable layer of {spec.name}")
        if "layers" in parts:
            layer = parts[parts.index("layers") + 1]
            if layer.isdigit() and int(layer) >= spec.num_layers:
                raise AdapterError(f"has weights for layer {layer} ({key}); {spec.name} has {spec.num_layers} layers")
        out, inp = shapes[module]
        want, got = (inp, shape[-1]) if side == "A" else (out, shape[0])
        if len(shape) != 2 or got != want:
            what = "input" if side == "A" else "output"
            raise AdapterError(f"{key} has shape {list(shape)}: its {what} width {got} is not the {want} of "
                               f"{spec.name}'s {module}; the adapter was trained on another base model")


def buffer_bytes_per_gpu(spec: ModelSpec, max_loras: int, max_lora_rank: int, tp: int, dtype_bytes: int,
                         pp: int = 1, target_modules: tuple[str, ...] | None = None) -> int:
    """GPU memory of vLLM's LoRA slots on one GPU: max_loras × rank × (A's in + B's out) per wrapped layer.

    vLLM wraps every LoRA-capable layer of the base whatever the adapters target (unless its
    ``target_modules`` restricts them); ``target_modules`` None counts them all.
    """
    shapes = module_shapes(spec)
    per_layer = 0
    for module, (out, inp) in shapes.items():
        if target_modules is not None and module not in target_modules:
            continue
        if module in COLUMN_PARALLEL:
            per_layer += inp + -(-out // tp)
        else:
            per_layer += -(-inp // tp) + out
    layers = -(-spec.num_layers // pp)
    return max_loras * max_lora_rank * per_layer * layers * dtype_bytes


def adapter_bytes(spec: ModelSpec, rank: int, target_modules: tuple[str, ...], dtype_bytes: int) -> int:
    """Weights of one adapter of ``rank`` on ``target_modules`` (what one CPU cache slot holds)."""
    shapes = module_shapes(spec)
    return sum(rank * (out + inp) for m, (out, inp) in shapes.items() if m in target_modules) \
        * spec.num_layers * dtype_bytes
