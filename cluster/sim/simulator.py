"""A routing run: ``simulate`` replays a workload through a fixed set of simulated vLLM replicas.

The replicas (Llama-2-70B AWQ, H100, TP=2 by default: ``make_setup``) and the loop that drives
them are ``cluster.sim.cluster.SimCluster``'s; this module plans the replica (``Setup``) and
summarizes a run (``cluster.sim.metrics``).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cluster.config import ModelConfig
from cluster.planning.hardware import get_accelerator
from cluster.planning.planner import Plan, _batched_tokens, plan_model
from cluster.sim.cluster import SimCluster
from cluster.sim.engine import Replica, SimRequest
from cluster.sim.host import HostShare
from cluster.sim.lora import LoraSpec
from cluster.sim.metrics import PolicyResult, summarize
from cluster.sim.perfmodel import StepModel, step_model_for
from cluster.sim.profile import ServingProfile
from cluster.sim.workload import Workload
from cluster.traces import SLO

DEFAULT_STATS_PERIOD_S = 1.0
DEFAULT_MAX_MODEL_LEN = 32768
DEFAULT_MODEL = {
    "name": "llama-2-70b-awq",
    "source": "TheBloke/Llama-2-70B-AWQ",
    "quantization": "awq",
    "accelerator": "H100-80GB",
    "tensor_parallel_size": 2,
    "gpu_memory_utilization": 0.92,
}


@dataclass
class Setup:
    """What every policy's run shares: the replica plan, its step model, the engine limits."""

    model: ModelConfig
    plan: Plan
    step: StepModel
    replicas: int
    max_model_len: int
    max_num_batched_tokens: int
    max_num_seqs: int
    stats_period_s: float = DEFAULT_STATS_PERIOD_S
    seed: int = 0
    slo: SLO = field(default_factory=SLO)
    notes: list[str] = field(default_factory=list)
    lora: LoraSpec | None = None  # LoRA on (requests may name adapters; cluster.sim.lora); None: off
    serving_delay_s: float = 0.0  # per request, outside the engine (cluster.sim.profile); 0: the engine alone
    host: HostShare | None = None  # engines share the host's cores with the serving path (cluster.sim.host)

    @property
    def num_blocks(self) -> int:
        return self.plan.num_blocks

    def to_dict(self) -> dict:
        return {
            "model": self.model.name,
            "source": self.model.source,
            "quantization": self.model.quantization,
            "accelerator": self.model.accelerator,
            "tensor_parallel_size": self.model.tensor_parallel_size,
            "gpu_memory_utilization": self.model.gpu_memory_utilization,
            "replicas": self.replicas,
            "kv_blocks_per_replica": self.plan.num_blocks,
            "block_size": self.plan.block_size,
            "kv_tokens_per_replica": self.plan.num_blocks * self.plan.block_size,
            "max_model_len": self.max_model_len,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "max_num_seqs": self.max_num_seqs,
            "stats_period_s": self.stats_period_s,
            "serving_delay_s": self.serving_delay_s,
            "seed": self.seed,
            "slo": {"ttft_s": self.slo.ttft_s, "tpot_s": self.slo.tpot_s},
            "notes": self.notes,
            **({"lora": self.lora.to_dict()} if self.lora is not None else {}),
            **({"host": self.host.to_dict()} if self.host is not None else {}),
        }


def make_setup(replicas: int = 16, *, max_model_len: int = DEFAULT_MAX_MODEL_LEN, accelerator: str = "H100-80GB",
               tensor_parallel_size: int = 2, stats_period_s: float = DEFAULT_STATS_PERIOD_S, seed: int = 0,
               slo: SLO | None = None, max_num_batched_tokens: int | None = None) -> Setup:
    """Plan the default replica (Llama-2-70B AWQ) and fit its step model.

    Llama-2-70B was trained for 4,096 positions and ``ModelConfig`` refuses a
    longer ``max_model_len``; the planner's KV blocks do not depend on it (only
    the logged "KV cache tokens" figure does), so a longer simulated context is
    planned at the model's own and said so in ``notes``: it stands for a
    long-context variant of the same architecture (e.g. RoPE-scaled).
    """
    if replicas < 1:
        raise ValueError(f"--replicas: {replicas} must be >= 1")
    if stats_period_s < 0:
        raise ValueError(f"--stats-period: {stats_period_s} must be >= 0")
    fields = dict(DEFAULT_MODEL, accelerator=accelerator, tensor_parallel_size=tensor_parallel_size)
    probe = ModelConfig(**fields)
    trained = probe.spec().max_position_embeddings
    cfg = ModelConfig(**fields, max_model_len=min(max_model_len, trained))
    plan = plan_model(cfg)
    notes = []
    if not plan.fits:
        raise ValueError(f"{cfg.name} on {accelerator} TP={tensor_parallel_size} does not fit its GPUs")
    if max_model_len > trained:
        notes.append(f"max_model_len {max_model_len} exceeds the {trained} positions {cfg.source} was trained for: "
                     f"KV planned at {trained} (blocks do not depend on it), simulated as a long-context variant")
    if -(-max_model_len // plan.block_size) > plan.num_blocks:
        raise ValueError(f"--max-model-len: {max_model_len} tokens need more than the {plan.num_blocks} KV blocks "
                         "of a replica")
    batched = max_num_batched_tokens or _batched_tokens(cfg, get_accelerator(cfg.accelerator))
    return Setup(model=cfg, plan=plan, step=step_model_for(cfg), replicas=replicas, max_model_len=max_model_len,
                 max_num_batched_tokens=batched, max_num_seqs=cfg.max_num_seqs, stats_period_s=stats_period_s,
                 seed=seed, slo=slo or SLO(), notes=notes)


def profiled_setup(cfg: ModelConfig, profile: ServingProfile, replicas: int, *, stats_period_s: float | None = None,
                   seed: int = 0, slo: SLO | None = None) -> Setup:
    """A deployed model, as measured: ``cfg``'s plan (KV blocks, batch limits) with ``profile``'s step
    model and serving delay (``kvpilot bench --profile``, ``cluster.sim.profile``)."""
    if replicas < 1:
        raise ValueError(f"--replicas: {replicas} must be >= 1")
    plan = plan_model(cfg)
    if not plan.fits:
        raise ValueError(f"{cfg.name}: the planner says it does not fit its {cfg.accelerator} (kvpilot plan says why)")
    batched = _batched_tokens(cfg, get_accelerator(cfg.accelerator))
    notes = [f"step model and serving delay ({profile.serving_delay_s * 1e3:.1f} ms per request) measured on "
             f"{profile.url} at {profile.measured_at}"]
    period = cfg.routing.stats_period_s if stats_period_s is None else stats_period_s
    return Setup(model=cfg, plan=plan, step=profile.step, replicas=replicas,
                 max_model_len=cfg.effective_max_model_len(),
                 max_num_batched_tokens=int(batched), max_num_seqs=cfg.max_num_seqs, stats_period_s=period, seed=seed,
                 slo=slo or SLO(), notes=notes, serving_delay_s=profile.serving_delay_s)


def simulate(workload: Workload, policy_name: str, setup: Setup, *, policy_params: dict | None = None,
             progress: Callable[[int], None] | None = None) -> tuple[PolicyResult, list[SimRequest],
                                                                     list[Replica]]:
    """Replay ``workload`` through ``setup.replicas`` replicas routed by ``policy_name``."""
    # The run allocates millions of small objects and frees none until the end: the cyclic GC
    # would only rescan them (a third of the run time, and millisecond pauses inside decisions).
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _simulate(workload, policy_name, setup, policy_params, progress)
    finally:
        if enabled:
            gc.enable()


def _simulate(workload: Workload, policy_name: str, setup: Setup, policy_params: dict | None,
              progress: Callable[[int], None] | None) -> tuple[PolicyResult, list[SimRequest], list[Replica]]:
    started = time.perf_counter()
    cluster = SimCluster(setup, policy_name, policy_params)
    for _ in range(setup.replicas):
        cluster.add_replica(0.0, 0.0)
    cluster.run(workload.requests, progress)
    engines = [slot.engine for slot in cluster.replicas]
    result = summarize(policy_name, cluster.requests, engines, setup.slo, decision_us=cluster.decision_us,
                       wall_s=time.perf_counter() - started, kv_peak_frac=cluster.kv_peak)
    return result, cluster.requests, engines
