"""Accelerator catalog: memory, compute capability, and which quantizations vLLM runs.

Memory figures are the totals ``nvidia-smi`` reports (MiB × 2**20); CUDA's
``total_memory`` is within about 1% of them. Minimum compute capabilities per
method come from vLLM's quantization docs (see ../shared/docs/reference.md):
AWQ 7.5, GPTQ 7.0, compressed-tensors INT8 W8A8 7.5, bitsandbytes 7.0, FP8 W8A8
8.9 (Ada, Hopper); below 8.9 and from 8.0 vLLM runs FP8 checkpoints weight-only
through its Marlin kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 2**20
GIB = 2**30

QUANTIZATIONS = ("none", "awq", "gptq", "fp8", "int8", "bitsandbytes")

# Minimum CUDA compute capability at which vLLM runs each method natively.
MIN_CAPABILITY: dict[str, float] = {
    "none": 0.0,
    "awq": 7.5,
    "gptq": 7.0,
    "int8": 7.5,
    "bitsandbytes": 7.0,
    "fp8": 8.9,
}
# FP8 checkpoints still load from this capability, as weight-only FP8 (Marlin).
FP8_MARLIN_MIN_CAPABILITY = 8.0
# The vLLM CPU build (x86) runs these methods.
CPU_QUANTIZATIONS = frozenset({"none", "awq", "gptq", "int8"})


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


def quantization_support(accel: Accelerator, method: str) -> QuantSupport:
    if not accel.is_gpu:
        if method in CPU_QUANTIZATIONS:
            return QuantSupport(True)
        return QuantSupport(
            False,
            f"the vLLM CPU build does not run {method!r}; on CPU use one of {', '.join(sorted(CPU_QUANTIZATIONS))}",
        )
    cc = accel.compute_capability
    assert cc is not None
    need = MIN_CAPABILITY[method]
    if cc >= need:
        return QuantSupport(True)
    if method == "fp8" and cc >= FP8_MARLIN_MIN_CAPABILITY:
        return QuantSupport(
            True,
            f"{accel.name} (compute capability {cc}) has no FP8 tensor cores: vLLM runs FP8 "
            "weight-only through Marlin (fp8 weights, 16-bit activations), so memory is as planned "
            "but compute is not W8A8",
        )
    return QuantSupport(
        False,
        f"{method} needs compute capability >= {need}, {accel.name} has {cc}",
    )


def supported_quantizations(accel: Accelerator) -> list[str]:
    return [q for q in QUANTIZATIONS if quantization_support(accel, q).supported]
