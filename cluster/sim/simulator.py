"""The cluster loop: N simulated vLLM replicas behind one router running a ``cluster.routing`` policy.

Per request, at its arrival, the router builds its snapshot of the replicas
(``cluster.routing.candidates``: a column per ``ReplicaLoad`` field) from

* its own ``Ledger`` (requests and prompt + output tokens sent and not yet seen
  finish; updated at send and at finish, never stale),
* engine stats (KV cache usage, running, waiting) that each replica reports
  every ``stats_period_s`` seconds, with its own random phase (Ray Serve's
  ``request_routing_stats_period_s``, 10 s by default; 0 means always fresh),
* the leading blocks of the prompt a router-side ``PrefixIndex`` believes each
  replica holds (the request's blocks are inserted on the chosen replica at
  routing time; capacity per replica = the planner's KV blocks),

and sends it to ``policy.rank_columns(...)[0]``, then calls the policy's ``on_routed`` on
that replica and its ``on_finished`` when the request ends, as the live router does. Time
advances event by event: arrivals, engine step ends, stats reports.
"""

from __future__ import annotations

import gc
import heapq
import inspect
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cluster.config import ModelConfig
from cluster.planner import Plan, _batched_tokens, plan_model
from cluster.hardware import get_accelerator
from cluster.routing import AdapterLedger, Ledger, LoraRequestsInfo, PrefixIndex, RoutingRequest, candidates, make_policy
from cluster.routing_lora import SIM_POLICIES
from cluster.sim.engine import Replica, SimRequest
from cluster.sim.lora import LoraSpec
from cluster.sim.metrics import SLO, PolicyResult, summarize
from cluster.sim.perfmodel import StepModel, step_model_for
from cluster.sim.workload import BLOCK_TOKENS as HASH_BLOCK_TOKENS, Workload

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
            "seed": self.seed,
            "slo": {"ttft_s": self.slo.ttft_s, "tpot_s": self.slo.tpot_s},
            "notes": self.notes,
            **({"lora": self.lora.to_dict()} if self.lora is not None else {}),
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


def _injected(name: str, params: dict | None, setup: Setup, clock: Callable[[], float]) -> dict:
    """Parameters the simulator supplies to a policy that asks for them in its constructor.

    ``clock``: the simulated time (a live router passes ``time.monotonic``);
    ``prefill_tokens_per_s``: the replica's prefill speed from the step model;
    ``max_loras``: the replicas' adapter slots, with LoRA on (a live router reads the model's
    ``lora.max_loras``). Values the caller gave win.
    """
    accepted = inspect.signature(SIM_POLICIES[name].__init__).parameters if name in SIM_POLICIES else {}
    out = dict(params or {})
    if "clock" in accepted:
        out.setdefault("clock", clock)
    if "prefill_tokens_per_s" in accepted:
        out.setdefault("prefill_tokens_per_s", 1e3 / setup.step.c_prefill)
    if "max_loras" in accepted and setup.lora is not None:
        out.setdefault("max_loras", setup.lora.max_loras)
    return out


def route(policy, tr, hashes: tuple[int, ...], rids: list[str], usage, running, waiting, ledger: Ledger,
          index: PrefixIndex | None, cap_tokens: int, adapters: AdapterLedger | None = None,
          lora_info: list[LoraRequestsInfo] | None = None) -> tuple[str, SimRequest]:
    """One routing decision, as the live router makes it: the candidates' column snapshot (engine
    reports beside the router's ledger and prefix index), the policy's first choice, then the
    router's own accounting of what it sent. ``index`` None: the policy does not use prefixes.
    ``adapters`` / ``lora_info`` (LoRA on): the router's adapter ledger and the engines' last
    LoRA reports; the ledger records the request after the policy's hook, as the live router's."""
    adapter = tr.adapter
    rreq = RoutingRequest(prompt_tokens=tr.prompt_tokens, max_tokens=tr.output_tokens, block_hashes=hashes,
                          adapter=adapter)
    held = adapters.column(rids, adapter) if adapters is not None and adapter is not None else None
    cands = candidates(rids, ledger, usage, running, waiting, cap_tokens, index, hashes, policy.uses_index_blocks,
                       has_adapter=held, lora_info=lora_info)
    choice = policy.rank_columns(rreq, cands)[0]
    policy.on_routed(rreq, choice, cands.cached_blocks[rids.index(choice)])
    if adapters is not None:
        adapters.routed(choice, adapter)
    ledger.sent(choice, tr.prompt_tokens + tr.output_tokens)
    if index is not None:
        index.insert(choice, hashes)
    return choice, SimRequest(tr.index, tr.arrival_s, tr.prompt_tokens, tr.output_tokens, hashes, adapter)


def finished(policy, ledger: Ledger, rid: str, q: SimRequest) -> None:
    """A request ended on replica ``rid``: the router's ledger and the policy's hook, as the live router does."""
    ledger.finished(rid, q.routing_tokens)
    policy.on_finished(RoutingRequest(prompt_tokens=q.prompt, max_tokens=q.target, adapter=q.adapter), rid)


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


def _replicas(setup: Setup) -> list[Replica]:
    return [Replica(i, num_blocks=setup.num_blocks, model=setup.step, block_size=setup.plan.block_size,
                    max_num_batched_tokens=setup.max_num_batched_tokens, max_num_seqs=setup.max_num_seqs,
                    lora=setup.lora)
            for i in range(setup.replicas)]


def _prefix_index(rids: list[str], num_blocks: int) -> PrefixIndex:
    index = PrefixIndex()
    for rid in rids:
        index.set_capacity(rid, num_blocks)
    return index


def _simulate(workload: Workload, policy_name: str, setup: Setup, policy_params: dict | None,
              progress: Callable[[int], None] | None) -> tuple[PolicyResult, list[SimRequest], list[Replica]]:
    wall0 = time.perf_counter()
    sim_now = [0.0]
    policy = make_policy(policy_name, _injected(policy_name, policy_params, setup, lambda: sim_now[0]),
                         seed=setup.seed, block_tokens=HASH_BLOCK_TOKENS, registry=SIM_POLICIES)
    n = setup.replicas
    reps = _replicas(setup)
    lora = _LoraReports(setup, policy, reps, lambda: sim_now[0]) if setup.lora is not None else None
    rids = [f"replica-{i}" for i in range(n)]
    ledger = Ledger()
    index = _prefix_index(rids, setup.num_blocks)
    uses_prefix = policy.uses_prefix
    cap_tokens = setup.num_blocks * setup.plan.block_size
    period = setup.stats_period_s
    snaps = [(0.0, 0, 0)] * n
    heap: list[tuple[float, int, int, int]] = []  # (time, kind 0 step end | 1 stats report, replica, version)
    version = [0] * n
    rng = random.Random(setup.seed)
    if period > 0:
        for i in range(n):
            heapq.heappush(heap, (rng.uniform(0, period), 1, i, 0))
    reqs = workload.requests
    sims: list[SimRequest] = []
    decision_us: list[float] = []
    outstanding, ai, total = 0, 0, len(reqs)
    kv_peak = 0.0
    inf = float("inf")
    while ai < total or outstanding:
        t_arr = reqs[ai].arrival_s if ai < total else inf
        if heap and heap[0][0] <= t_arr:
            t, kind, i, ver = heapq.heappop(heap)
            rep = reps[i]
            if kind == 1:
                u = rep.usage()
                kv_peak = max(kv_peak, u)
                snaps[i] = (u, len(rep.running), len(rep.waiting))
                if lora is not None:
                    lora.report(i)
                heapq.heappush(heap, (t + period, 1, i, 0))
                continue
            if ver != version[i]:
                continue
            for q in rep.end_step(t):
                finished(policy, ledger, rids[i], q)
                outstanding -= 1
            if rep.busy:
                version[i] += 1
                heapq.heappush(heap, (rep.t_end, 0, i, version[i]))
            continue
        tr = reqs[ai]
        ai += 1
        sim_now[0] = tr.arrival_s
        hashes = tr.block_hashes()  # once per request, outside the timed decision
        d0 = time.perf_counter()
        if period > 0:
            us, nrs, nws = zip(*snaps)
        else:
            us = [rep.usage() for rep in reps]
            nrs, nws = [len(rep.running) for rep in reps], [len(rep.waiting) for rep in reps]
        adapters = () if lora is None else (lora.ledger, lora.infos(period <= 0))
        choice, sreq = route(policy, tr, hashes, rids, us, nrs, nws, ledger, index if uses_prefix else None,
                             cap_tokens, *adapters)
        decision_us.append((time.perf_counter() - d0) * 1e6)
        i = int(choice.rsplit("-", 1)[1])
        sims.append(sreq)
        outstanding += 1
        rep = reps[i]
        if rep.submit(sreq, tr.arrival_s):
            version[i] += 1
            heapq.heappush(heap, (rep.t_end, 0, i, version[i]))
        if progress is not None and ai % 256 == 0:
            progress(ai)
    if progress is not None:
        progress(total)
    kv_peak = max(kv_peak, *(rep.usage() for rep in reps))
    result = summarize(policy_name, sims, reps, setup.slo, decision_us=decision_us,
                       wall_s=time.perf_counter() - wall0, kv_peak_frac=kv_peak)
    return result, sims, reps


class _LoraReports:
    """What the replicas tell the router about adapters, every stats period, as the live replicas do.

    The adapters each engine holds go to the router's ``AdapterLedger`` (the policy's, like the
    live router's ``adapters``); the engines' ``vllm:lora_requests_info`` goes to the snapshot's
    ``lora_info`` column, which the peers' LoRA policies read.
    """

    def __init__(self, setup: Setup, policy, reps: list[Replica], clock: Callable[[], float]):
        self.reps = reps
        self.rids = [f"replica-{i}" for i in range(len(reps))]
        self.ledger = AdapterLedger(clock=clock)
        if hasattr(policy, "adapters"):
            policy.adapters = self.ledger
        self._info = [LoraRequestsInfo(max_lora=setup.lora.max_loras)] * len(reps)

    def report(self, i: int) -> None:
        rep = self.reps[i]
        self.ledger.report(self.rids[i], rep.resident_adapters())
        self._info[i] = rep.lora_requests_info()

    def infos(self, fresh: bool) -> list[LoraRequestsInfo]:
        """The last reports (``fresh``: the engines' state now, for a stats period of 0)."""
        if fresh:
            for i in range(len(self.reps)):
                self.report(i)
        return list(self._info)
