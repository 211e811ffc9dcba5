"""Accelerator catalog: memory, compute capability, and which quantizations vLLM runs.

Memory figures are the totals ``nvidia-smi`` reports (MiB × 2**20); CUDA's
``total_memory`` is within about 1% of them. Minimum compute capabilities per
method come from vLLM's quantization docs (docs.vllm.ai, "Supported Hardware" for quantization):
AWQ 7.5, GPTQ 7.0, compressed-tensors INT8 W8A8 7.5, bitsandbytes 7.0, FP8 W8A8
8.9 (Ada, Hopper); below 8.9 and from 8.0 vLLM runs FP8 checkpoints weight-only
through its Marlin kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 2**20
GIB = 2**30

# The KV block (tokens) by accelerator kind: vLLM's default on CUDA, and on its CPU backend
# (platforms/cpu.py). The plan pages the KV cache in it (``Accelerator.kv_block_size``); the
# router hashes prompts and counts prefix hits in whole blocks of it; the simulator's replicas,
# GPUs, page in the GPU's.
GPU_BLOCK_SIZE = 16
CPU_BLOCK_SIZE = 128

# What a config may ask for: auto (what the checkpoint states), none, an online method (fp8,
# bitsandbytes), or the checkpoint's own method. int8 is compressed-tensors W8A8 INT8 (kvpilot's old name).
QUANTIZATIONS = (
    "auto", "none", "awq", "gptq", "fp8", "int8", "compressed-tensors", "modelopt", "modelopt_fp4", "mxfp4",
    "bitsandbytes",
)


@dataclass(frozen=True)
class FormatSupport:
    """Compute capabilities at which vLLM runs a weight format natively, and with a fallback kernel."""

    native: float
    fallback: float | None = None
    fallback_note: str = ""


# From vLLM's quantization support table (docs/features/quantization/README.md, v0.32) and
# its kernels: Marlin (8.0+) runs 4-bit integer, FP8 and FP4 weights weight-only below the
# capability of their native tensor cores.
FORMATS: dict[str, FormatSupport] = {
    "none": FormatSupport(0.0),
    "awq": FormatSupport(7.5),
    "gptq": FormatSupport(7.0),
    "wna16": FormatSupport(8.0, 7.0, "runs W4A16/W8A16 through the exllama/gptq kernels instead of Marlin"),
    "int8": FormatSupport(7.5),
    "bitsandbytes": FormatSupport(7.0),
    "fp8": FormatSupport(8.9, 8.0, "has no FP8 tensor cores: vLLM runs FP8 weight-only through Marlin "
                         "(fp8 weights, 16-bit activations), so memory is as planned but compute is not W8A8"),
    "nvfp4": FormatSupport(10.0, 8.0, "has no FP4 tensor cores (Blackwell): vLLM runs NVFP4 weight-only through "
                           "its FP4 Marlin kernel, so memory is as planned but compute is 16-bit"),
    "mxfp4": FormatSupport(10.0, 8.0, "has no FP4 tensor cores (Blackwell): vLLM runs MXFP4 weight-only "
                           "(Triton kernels on Hopper, Marlin below), memory as planned"),
}

# The vLLM CPU build (x86) runs these formats.
CPU_FORMATS = frozenset({"none", "awq", "gptq", "int8", "wna16"})


@dataclass(frozen=True)
class Accelerator:
    """One accelerator type. ``memory_bytes`` is None for ``cpu`` (sized by KV space)."""

    name: str
    memory_bytes: int | None
    compute_capability: float | None
    description: str
    ray_type: str | None = None  # Ray's `accelerator_type:<X>` node resource, when Ray detects one


    @property
    def is_gpu(self) -> bool:
        return self.compute_capability is not None

    @property
    def kv_block_size(self) -> int:
        """vLLM's default KV block on this accelerator, in tokens."""
        return GPU_BLOCK_SIZE if self.is_gpu else CPU_BLOCK_SIZE


def _gpu(name: str, mib: int, cc: float, description: str, ray_type: str | None) -> Accelerator:
    return Accelerator(name, mib * MIB, cc, description, ray_type)


CATALOG: dict[str, Accelerator] = {
    a.name: a
    for a in (
        _gpu("T4", 15360, 7.5, "NVIDIA T4 16 GB (Turing)", "T4"),
        _gpu("V100-32GB", 32768, 7.0, "NVIDIA V100 32 GB (Volta)", "V100"),
        _gpu("A10G", 23028, 8.6, "NVIDIA A10G 24 GB (Ampere, AWS g5)", "A10G"),
        _gpu("L4", 23034, 8.9, "NVIDIA L4 24 GB (Ada)", "L4"),
        _gpu("RTX4090", 24564, 8.9, "NVIDIA GeForce RTX 4090 24 GB (Ada)", None),
        _gpu("L40S", 46068, 8.9, "NVIDIA L40S 48 GB (Ada)", "L40S"),
        _gpu("A100-40GB", 40960, 8.0, "NVIDIA A100 40 GB (Ampere)", "A100-40G"),
        _gpu("A100-80GB", 81920, 8.0, "NVIDIA A100 80 GB (Ampere)", "A100-80G"),
        _gpu("H100-80GB", 81559, 9.0, "NVIDIA H100 80 GB (Hopper)", "H100"),
        _gpu("H200", 143771, 9.0, "NVIDIA H200 141 GB (Hopper)", "H200"),
        _gpu("H100-NVL", 95830, 9.0, "NVIDIA H100 NVL 94 GB (Hopper)", "H100"),
        _gpu("H20", 97871, 9.0, "NVIDIA H20 96 GB (Hopper, China export part)", "H20"),
        _gpu("L40", 46068, 8.9, "NVIDIA L40 48 GB (Ada)", "L40"),
        _gpu("RTX-A6000", 49140, 8.6, "NVIDIA RTX A6000 48 GB (Ampere)", "A6000"),
        _gpu("RTX5090", 32607, 12.0, "NVIDIA GeForce RTX 5090 32 GB (Blackwell, consumer)", None),
        _gpu("RTX-PRO-6000", 97887, 12.0, "NVIDIA RTX PRO 6000 Blackwell 96 GB", None),
        _gpu("B200", 183359, 10.0, "NVIDIA B200 180 GB (Blackwell)", "B200"),
        _gpu("GB200", 189471, 10.0, "NVIDIA GB200 (Grace Blackwell) 186 GB per GPU", "GB200"),
        Accelerator("cpu", None, None, "x86 CPU with the vLLM CPU build"),
    )
}


def get_accelerator(name: str) -> Accelerator:
    """Look an accelerator up by catalog name; raises ValueError naming the choices."""
    try:
        return CATALOG[name]
    except KeyError:
        raise ValueError(f"unknown accelerator {name!r}; choose one of {', '.join(CATALOG)}") from None


@dataclass(frozen=True)
class QuantSupport:
    """What vLLM does with a quantization method on an accelerator."""

    supported: bool
    note: str | None = None  # a downgrade warning when supported, the reason when not


def quantization_support(accel: Accelerator, fmt: str) -> QuantSupport:
    """What vLLM does with weight format ``fmt`` (a key of FORMATS, or a method name) on ``accel``."""
    fmt = {"compressed-tensors": "int8", "modelopt": "fp8", "modelopt_fp4": "nvfp4", "auto": "none"}.get(fmt, fmt)
    if fmt not in FORMATS:
        raise ValueError(f"quantization: {fmt!r} is not a weight format kvpilot knows ({', '.join(FORMATS)})")
    if not accel.is_gpu:
        if fmt in CPU_FORMATS:
            return QuantSupport(True)
        return QuantSupport(
            False,
            f"the vLLM CPU build does not run {fmt!r}; on CPU use one of {', '.join(sorted(CPU_FORMATS))}",
        )
    cc = accel.compute_capability
    assert cc is not None
    need = FORMATS[fmt]
    if cc >= need.native:
        return QuantSupport(True)
    if need.fallback is not None and cc >= need.fallback:
        return QuantSupport(True, f"{accel.name} (compute capability {cc}) {need.fallback_note}")
    return QuantSupport(False, f"{fmt} needs compute capability >= {need.fallback or need.native}, {accel.name} has {cc}")


def supported_formats(accel: Accelerator) -> dict[str, str]:
    """Each format that runs on ``accel``: "native" or "fallback"."""
    out = {}
    for fmt in FORMATS:
        s = quantization_support(accel, fmt)
        if s.supported:
            out[fmt] = "fallback" if s.note else "native"
    return out
