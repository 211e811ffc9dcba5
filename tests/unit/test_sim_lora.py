"""LoRA in the simulator: vLLM's max_loras batching, adapter loads and evictions, routing by adapter.

Each test fails if the behaviour it names is broken: a batch over max_loras, an eviction
that costs nothing, a hot adapter herded onto one replica, or base-model runs that moved.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from cluster.routing.lora_policies import SIM_POLICIES
from cluster.routing.policies import LoraRequestsInfo, ReplicaLoad, RoutingRequest, make_policy
from cluster.sim.engine import Replica, SimRequest, run_alone
from cluster.sim.lora import LoraSpec, lora_spec_for, with_adapters
from cluster.sim.simulator import make_setup, simulate
from cluster.sim.synthetic import shared_prefix
from cluster.sim.workload import TraceRequest, Workload
from tests.unit.test_sim import _model

MODEL = _model(5.0, 0.01)  # 5 ms a step + 0.01 ms a prompt token
SPEC = LoraSpec(max_loras=2, max_cpu_loras=2, gpu_bytes=10**9, file_bytes=4 * 10**9,
                h2d_bytes_per_s=10**11, disk_bytes_per_s=10**11)  # a GPU load 10 ms, a disk read 40 ms more


def _replica(lora: LoraSpec | None = SPEC) -> Replica:
    return Replica(0, num_blocks=4096, model=MODEL, max_num_batched_tokens=4096, max_num_seqs=64, lora=lora)


def _req(i: int, t: float, adapter: str | None, prompt: int = 64, out: int = 20) -> SimRequest:
    return SimRequest(i, t, prompt, out, (), adapter)


def test_a_batch_never_holds_more_than_max_loras_adapters():
    rep = _replica()
    reqs = [_req(i, 0.001 * i, f"a{i % 5}") for i in range(40)]
    seen: list[int] = []
    run_alone(rep, reqs, lambda r, _now: seen.append(len({q.adapter for q, _ in r._sched})))
    assert all(q.finish_t > 0 for q in reqs)  # the skipped requests ran later
    assert max(seen) == 2 == rep.lora_batch_peak  # five adapters waiting, two at a time
    order = sorted(reqs, key=lambda q: q.first_t)
    assert {q.adapter for q in order[:8]} == {"a0", "a1"}  # the first two adapters' requests went first


def test_an_evicted_adapter_costs_a_reload_and_a_kept_one_does_not():
    for cpu_slots, disk_loads in ((1, 3), (2, 2)):  # a, b, a one after another on one GPU slot
        rep = _replica(replace(SPEC, max_loras=1, max_cpu_loras=cpu_slots))
        reqs = [_req(0, 0.0, "a"), _req(1, 1.0, "b"), _req(2, 2.0, "a")]
        run_alone(rep, reqs)
        assert rep.lora_loads == 3 and rep.lora_disk_loads == disk_loads
        plain = _replica(None)
        base = [_req(i, q.arrival, None) for i, q in enumerate(reqs)]
        run_alone(plain, base)
        delay = [q.first_t - b.first_t for q, b in zip(reqs, base)]
        reload = SPEC.gpu_load_s + (SPEC.disk_load_s if cpu_slots == 1 else 0.0)
        assert delay == pytest.approx([SPEC.gpu_load_s + SPEC.disk_load_s] * 2 + [reload])


def test_requests_without_adapters_run_as_before_on_a_lora_replica():
    reqs = [_req(i, 0.002 * i, None, prompt=100 + 7 * i, out=5 + i % 9) for i in range(60)]
    twins = [_req(q.index, q.arrival, None, q.prompt, q.target) for q in reqs]
    run_alone(_replica(), reqs)
    run_alone(_replica(None), twins)
    assert [(q.first_t, q.finish_t) for q in reqs] == [(q.first_t, q.finish_t) for q in twins]


@pytest.mark.parametrize("policy, goodput, ttft_p90", [
    ("kvpilot", 4.236350439130404, 1.9979710824388954),  # since 1c0a0a1 (kvpilot's overload terms; 4.2526, 2.0464
    # at 4d63fa2, before LoRA existed in the sim)
    ("pow2", 2.0029681819194085, 5.1404997047467305),  # these two at 4d63fa2
    ("llmd", 3.973947883925287, 2.4523785431849348),
])
def test_base_model_runs_reproduce_the_numbers_from_before_lora(policy, goodput, ttft_p90):
    w = shared_prefix(6.0, 300, seed=3)
    setup = make_setup(4, seed=0)
    res, _, _ = simulate(w, policy, setup)
    # To the digit a table prints; the last bits of a float sum differ between numpy builds and CPUs
    # (a fresh install here moved them by 1e-13).
    assert (res.goodput_rps, res.ttft_p90_s) == (pytest.approx(goodput, rel=1e-9), pytest.approx(ttft_p90, rel=1e-9))
    lora_on, _, _ = simulate(w, policy, replace(setup, lora=lora_spec_for(setup.model)))
    # LoRA on, no adapter named: the same run
    assert (lora_on.goodput_rps, lora_on.ttft_p90_s) == (res.goodput_rps, res.ttft_p90_s)


def _one_adapter(rate: float, n: int) -> Workload:
    reqs = [TraceRequest(i / rate, 1500, 150, i, adapter="hot") for i in range(n)]
    return Workload("hot", reqs, "test")


def test_a_hot_adapter_spreads_under_kvpilot_once_its_holder_is_busy():
    setup = make_setup(4, seed=0)
    setup = replace(setup, lora=lora_spec_for(setup.model))
    _, calm, _ = simulate(_one_adapter(0.2, 40), "kvpilot", setup)  # far below one replica's capacity
    assert len({q.replica for q in calm}) == 1  # affinity: it stays where it is loaded
    _, busy, _ = simulate(_one_adapter(8.0, 400), "kvpilot", setup)  # more than one replica can take
    served = [sum(q.replica == i for q in busy) for i in range(4)]
    assert sum(1 for s in served if s) > 1 and max(served) < 0.6 * len(busy)  # no herding


def test_kvpilot_waits_for_a_slot_only_where_every_slot_runs_another_adapter():
    pol = make_policy("kvpilot", {"prefill_tokens_per_s": 1000.0, "prefill_efficiency": 1.0, "max_loras": 2,
                                  "adapter_wait_s": 6.0})
    for name in ("x", "y"):
        pol.on_routed(RoutingRequest(1, 1, adapter=name), "a")  # a runs two adapters: both its slots taken
    rows = [ReplicaLoad("a", 2, 4), ReplicaLoad("b", 3, 3000)]  # b is busier by 3,000 tokens (3 s)
    assert pol.rank(RoutingRequest(100, 10, adapter="z"), rows)[0] == "b"  # z would wait ~6 s on a
    assert pol.rank(RoutingRequest(100, 10, adapter="x"), rows)[0] == "a"  # x batches with its own on a
    pol.on_finished(RoutingRequest(1, 1, adapter="y"), "a")
    pol.on_finished(RoutingRequest(1, 1, adapter="x"), "a")  # both drained: a's slots are free again
    assert pol.rank(RoutingRequest(100, 10, adapter="z"), rows)[0] == "a"


def _rows(infos: list[LoraRequestsInfo], rifs: list[int], waiting: list[int] | None = None) -> list[ReplicaLoad]:
    waiting = waiting or [0] * len(infos)
    return [ReplicaLoad(f"r{i}", f, 0, num_waiting=w, lora_info=info)
            for i, (info, f, w) in enumerate(zip(infos, rifs, waiting))]


def test_peer_baselines_prefer_the_adapters_holders_then_replicas_with_room():
    full = LoraRequestsInfo(frozenset({"p", "q"}), frozenset(), 2)
    holds = LoraRequestsInfo(frozenset({"x"}), frozenset(), 2)
    room = LoraRequestsInfo(frozenset(), frozenset(), 2)
    req = RoutingRequest(100, 10, adapter="x")
    for name in ("llmd_lora", "aibrix_lora"):
        pol = make_policy(name, {"affinity_threshold": 1.0}, registry=SIM_POLICIES)  # no random exploration
        assert {pol.rank(req, _rows([full, holds, room], [0, 9, 0]))[0] for _ in range(50)} == {"r1"}
        assert {pol.rank(RoutingRequest(100, 10, adapter="new"), _rows([full, holds, room], [0, 9, 0]))[0]
                for _ in range(50)} <= {"r1", "r2"}  # the full replica is never chosen for a new adapter
    llmd = make_policy("llmd_lora", {"queue_threshold": 5}, registry=SIM_POLICIES)
    # the holder's queue is past the load filter: llm-d routes by queue first
    assert llmd.rank(req, _rows([room, holds, room], [0, 0, 0], waiting=[0, 50, 0]))[0] in ("r0", "r2")
    aibrix = make_policy("aibrix_lora", {"affinity_threshold": 1.0}, registry=SIM_POLICIES)
    two = _rows([holds, holds, room], [5, 2, 0])
    assert aibrix.rank(req, two)[0] == "r1"  # fewest requests in flight among the holders


def test_zipf_assignment_is_seeded_and_skewed():
    w = shared_prefix(6.0, 2000, seed=1)
    a, b = with_adapters(w, 50, 1.0, seed=7), with_adapters(w, 50, 1.0, seed=7)
    names = [r.adapter for r in a.requests]
    assert names == [r.adapter for r in b.requests]
    top = names.count("lora-0") / len(names)
    assert 0.18 < top < 0.27  # 1 / H(50) = 0.222
    assert names.count("lora-0") > 5 * names.count("lora-9")
