"""LoRA adapters in the simulator: what a load costs a replica, and which adapter each request names.

A simulated replica (``cluster.sim.engine.Replica``) with a ``LoraSpec`` behaves as vLLM 0.32
does with LoRA on: at most ``max_loras`` distinct adapters in a batch (the scheduler skips a
waiting request whose adapter would be one more), ``max_loras`` GPU slots and
``max_cpu_loras`` host-memory slots, each least recently used first out. A step whose batch
uses an adapter without a GPU slot first copies it in (pinned host memory to GPU), and one not
in host memory is read from disk before that; vLLM does both inside the step
(``set_active_adapters`` before the forward pass), so the whole batch waits for them.

The sizes come from the base model (``cluster.planning.lora``): a rank-16 adapter on every dense
projection of Llama-2-70B is 414 MB in bf16 (what a disk read moves) and 280 MB per GPU at
TP=2 (what each GPU copies: column-parallel layers keep lora_A whole). The bandwidths are assumptions, not measurements:

* host to GPU, ``h2d_bytes_per_s`` 25 GB/s: H100 SXM's PCIe Gen5 x16 link moves 64 GB/s per
  direction raw (32 GT/s a lane), about 50 GB/s in large pinned copies; vLLM copies an
  adapter as ~1,100 tensors of 0.1-0.5 MB (a lora_A and lora_B per module and layer), which
  reach less, so half of it: 11 ms a load.
* disk to host, ``disk_bytes_per_s`` 2 GB/s: a local NVMe read of the safetensors file
  (datacenter NVMe drives read 3-7 GB/s sequentially; parsing and the page cache's first
  touch take part of it): 0.21 s a load.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from cluster.config import ModelConfig
from cluster.planning.lora import DENSE_TARGETS, adapter_bytes, buffer_bytes_per_gpu
from cluster.sim.workload import Workload

DEFAULT_H2D_BYTES_PER_S = 25e9
DEFAULT_DISK_BYTES_PER_S = 2e9


@dataclass(frozen=True)
class LoraSpec:
    """One replica's LoRA limits and what a load of one adapter costs it."""

    max_loras: int = 4  # adapters in one batch = GPU slots
    max_cpu_loras: int = 16  # adapters kept in host memory
    gpu_bytes: int = 0  # what one GPU copies per adapter load (its shard)
    file_bytes: int = 0  # the adapter's weights, read from disk on a host-memory miss
    h2d_bytes_per_s: float = DEFAULT_H2D_BYTES_PER_S
    disk_bytes_per_s: float = DEFAULT_DISK_BYTES_PER_S

    def __post_init__(self):
        if self.max_loras < 1 or self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_loras ({self.max_loras}) must be >= 1 and max_cpu_loras "
                             f"({self.max_cpu_loras}) >= max_loras")
        if self.h2d_bytes_per_s <= 0 or self.disk_bytes_per_s <= 0:
            raise ValueError("bandwidths must be > 0")

    @property
    def gpu_load_s(self) -> float:
        return self.gpu_bytes / self.h2d_bytes_per_s

    @property
    def disk_load_s(self) -> float:
        return self.file_bytes / self.disk_bytes_per_s

    def to_dict(self) -> dict:
        return {"max_loras": self.max_loras, "max_cpu_loras": self.max_cpu_loras, "gpu_bytes": self.gpu_bytes,
                "file_bytes": self.file_bytes, "h2d_bytes_per_s": self.h2d_bytes_per_s,
                "disk_bytes_per_s": self.disk_bytes_per_s, "gpu_load_s": round(self.gpu_load_s, 6),
                "disk_load_s": round(self.disk_load_s, 6)}


def lora_spec_for(model: ModelConfig, rank: int = 16, *, max_loras: int = 4, max_cpu_loras: int = 16,
                  h2d_bytes_per_s: float = DEFAULT_H2D_BYTES_PER_S,
                  disk_bytes_per_s: float = DEFAULT_DISK_BYTES_PER_S) -> LoraSpec:
    """A rank-``rank`` adapter on every dense projection of ``model``'s base, in bf16, at its tensor parallelism."""
    spec = model.spec()
    return LoraSpec(max_loras=max_loras, max_cpu_loras=max_cpu_loras,
                    gpu_bytes=buffer_bytes_per_gpu(spec, 1, rank, model.tensor_parallel_size, 2),
                    file_bytes=adapter_bytes(spec, rank, DENSE_TARGETS, 2),
                    h2d_bytes_per_s=h2d_bytes_per_s, disk_bytes_per_s=disk_bytes_per_s)


def with_adapters(workload: Workload, adapters: int = 50, zipf_s: float = 1.0, base_share: float = 0.0,
                  seed: int = 0) -> Workload:
    """The same requests, each naming an adapter: Zipf(``zipf_s``) popularity over ``adapters`` names.

    ``base_share`` of the requests stay on the base model (adapter None). Adapter k (0 = most
    popular) is named ``lora-k``; the draw is seeded, so a seed gives the same assignment.
    """
    if adapters < 1 or zipf_s < 0 or not 0 <= base_share <= 1:
        raise ValueError(f"adapters ({adapters}) >= 1, zipf_s ({zipf_s}) >= 0, base_share ({base_share}) in [0, 1]")
    rng = random.Random(seed)
    names = [f"lora-{k}" for k in range(adapters)]
    weights = [1 / (k + 1) ** zipf_s for k in range(adapters)]
    reqs = []
    for r in workload.requests:
        name = None if rng.random() < base_share else rng.choices(names, weights)[0]
        reqs.append(replace(r, adapter=name))
    note = f"LoRA: {adapters} adapters, Zipf s={zipf_s:g}, {base_share:.0%} base-model requests, seed {seed}"
    return Workload(workload.name, reqs, workload.source, workload.clipped, workload.clipped_tokens,
                    [*workload.notes, note])
