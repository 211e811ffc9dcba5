"""The Serve glue without a Ray cluster: ``deployments/router.py`` and ``deployments/autoscaling.py``.

Serve's side is played by stand-ins: replicas with ``replica_id.unique_id`` and
``routing_stats``, pending requests with ``args``/``kwargs``/``metadata``, and an
autoscaling context with the fields Serve fills. Importing ray is fine; nothing here
starts it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

pytest.importorskip("ray.serve")

from ray.serve._private.common import DeploymentHandleSource, DeploymentID  # noqa: E402

import deployments.router as router_mod  # noqa: E402
from cluster.autoscaling.policy import ReplicaSignals, ScalerState, ScalingInput, decide  # noqa: E402
from cluster.config import AutoscalingConfig  # noqa: E402
from deployments.autoscaling import KVPilotAutoscaler  # noqa: E402
from deployments.router import KVPilotRouter  # noqa: E402


@dataclass(frozen=True)
class _ID:
    unique_id: str


@dataclass
class _Replica:
    replica_id: _ID
    routing_stats: dict = field(default_factory=dict)


@dataclass
class _Request:  # what the ingress passes to a replica: the router reads only these two attributes
    prompt_token_ids: list[int]
    max_tokens: int


@dataclass
class _Pending:
    args: list
    kwargs: dict
    metadata: SimpleNamespace


def _router(**state) -> KVPilotRouter:
    async def build() -> KVPilotRouter:
        r = KVPilotRouter(deployment_id=DeploymentID(name="m", app_name="a"),
                          handle_source=DeploymentHandleSource.UNKNOWN)
        r.initialize_state(**state)
        return r

    return asyncio.run(build())


_next_token = [10_000]


def _pending(rid: str, prompt_tokens: int, max_tokens: int = 5000) -> _Pending:
    start = _next_token[0]  # every prompt its own tokens: no prefix is shared by accident
    _next_token[0] += prompt_tokens
    req = _Request(list(range(start, start + prompt_tokens)), max_tokens)
    return _Pending(args=["a positional argument that is not the request", req], kwargs={},
                    metadata=SimpleNamespace(internal_request_id=rid))


def _choose(router: KVPilotRouter, replicas: list[_Replica], pending: _Pending) -> list[str]:
    ranks = asyncio.run(router.choose_replicas(replicas, pending))
    return [rank[0].replica_id.unique_id for rank in ranks]


def _route(router: KVPilotRouter, pending: _Pending, uid: str) -> None:
    router.on_request_routed(pending, _ID(uid), None)


# The policy's prefill queue alone decides (load_weight 0: tokens in flight do not), on a frozen clock.
FROZEN = {"policy": "kvpilot", "params": {"clock": lambda: 0.0, "load_weight": 0.0}}


def _two_loaded(router: KVPilotRouter, replicas: list[_Replica]) -> tuple[str, str]:
    """Route a 1,000-token prompt, then a 1,200-token one; returns (replica of the first, of the second)."""
    p1 = _pending("r1", 1000)
    a = _choose(router, replicas, p1)[0]
    _route(router, p1, a)
    p2 = _pending("r2", 1200)
    b = _choose(router, replicas, p2)[0]
    _route(router, p2, b)
    assert a != b  # a owes 1,000 tokens of prefill: the second goes to the other replica
    return a, b


def test_policy_counts_blocks_in_the_routers_block_size():
    for policy in ("kvpilot", "dynamo"):
        router = _router(policy=policy, block_tokens=128)  # the CPU plan's block
        assert router._policy.block_tokens == router._block_tokens == router._index.block_tokens == 128


def test_fallback_to_the_second_ranked_charges_the_replica_used_once():
    router = _router(**FROZEN, block_tokens=128)
    replicas = [_Replica(_ID("x")), _Replica(_ID("y"))]
    a, b = _two_loaded(router, replicas)
    px = _pending("rx", 600)
    assert _choose(router, replicas, px) == [a, b]
    _route(router, px, b)  # a was full: Serve used the second-ranked replica
    assert router._ledger.requests == {a: 1, b: 2}
    assert router._ledger.tokens == {a: 6000, b: 6200 + 5600}
    # b now owes 1,200 + 600 tokens of prefill, a 1,000: the next request goes to a
    assert _choose(router, replicas, _pending("probe", 600))[0] == a


def test_choose_again_after_a_backoff_charges_once():
    router = _router(**FROZEN, block_tokens=128)
    replicas = [_Replica(_ID("x")), _Replica(_ID("y"))]
    a, b = _two_loaded(router, replicas)
    px = _pending("rx", 600)
    first = _choose(router, replicas, px)
    again = _choose(router, replicas, px)  # every replica was full: Serve backs off and asks again
    assert first == again == [a, b]
    _route(router, px, again[0])
    assert router._ledger.requests == {a: 2, b: 1}
    # a owes 1,000 + 600 once (not twice), b 1,200: the next request goes to b
    assert _choose(router, replicas, _pending("probe", 600))[0] == b


def test_completion_and_a_dead_replica_give_everything_back():
    router = _router(**FROZEN, block_tokens=128)
    replicas = [_Replica(_ID("x")), _Replica(_ID("y"))]
    a, b = _two_loaded(router, replicas)
    router.on_request_completed(_ID(a), "r1")
    assert router._ledger.requests[a] == 0 and a not in router._policy._mine
    async def b_is_gone() -> None:
        router.update_replicas([r for r in replicas if r.replica_id.unique_id == a])

    asyncio.run(b_is_gone())
    assert b not in router._ledger.requests and not router._inflight
    assert not router._policy._mine and not router._policy._empty_at


def test_a_request_cancelled_before_it_is_routed_is_not_kept_forever():
    router = _router(policy="kvpilot", block_tokens=16)
    replicas = [_Replica(_ID("x")), _Replica(_ID("y"))]
    bound = getattr(router_mod, "MAX_PLACING", 4096)
    for i in range(bound + 50):  # ranked, then cancelled by the client: Serve never routes them
        _choose(router, replicas, _pending(f"gone{i}", 32, max_tokens=1))
    placing = getattr(router, "_placing", None) or getattr(router, "_pending", {})
    assert len(placing) <= bound


def test_routing_facts_come_from_any_argument_with_prompt_ids_and_max_tokens():
    req = _Request([1, 2, 3], 7)
    assert router_mod._routing_facts(["x", req], {}) == ([1, 2, 3], 7)
    assert router_mod._routing_facts([], {"request": req}) == ([1, 2, 3], 7)
    assert router_mod._routing_facts([SimpleNamespace(prompt_token_ids=[1])], {}) == ((), 0)


# --- autoscaling ------------------------------------------------------------------------------


CAPACITY = 10_000  # KV tokens per replica


def _ctx(usage: tuple[float, ...], *, now: float, state: dict | None = None, queued: float = 0.0,
         lo: int = 1, hi: int = 3, waiting: float = 1.0) -> SimpleNamespace:
    ids = [f"rep{i}" for i in range(len(usage))]
    metrics = {"kv_cache_usage": dict(zip(ids, usage)), "num_running": {i: 4.0 for i in ids},
               "num_waiting": {i: waiting for i in ids}, "token_rate": {i: 100.0 for i in ids},
               "generation_rate": {i: 40.0 for i in ids}}
    return SimpleNamespace(aggregated_metrics=metrics, running_replicas=ids, current_num_replicas=len(ids),
                           target_num_replicas=len(ids), total_queued_requests=queued, policy_state=state or {},
                           current_time=now, capacity_adjusted_min_replicas=lo, capacity_adjusted_max_replicas=hi)


def _expected(ctx: SimpleNamespace, cfg: AutoscalingConfig, state: ScalerState):
    m = ctx.aggregated_metrics
    reps = tuple(ReplicaSignals(m["kv_cache_usage"][i], 4.0, m["num_waiting"][i], 100.0, None, 40.0)
                 for i in ctx.running_replicas)
    inp = ScalingInput(ctx.current_time, ctx.current_num_replicas, reps, ctx.total_queued_requests, CAPACITY,
                       ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas, ctx.target_num_replicas)
    return decide(inp, cfg, state)


def test_autoscaler_maps_serves_context_to_the_policys_inputs():
    cfg = {"target_kv_usage": 0.5}
    scaler = KVPilotAutoscaler("m", cfg, kv_capacity_tokens=CAPACITY, min_replicas=1, max_replicas=8)
    ctx = _ctx((0.9, 0.8), now=100.0, queued=6.0)  # demand for 5 replicas; Serve's bounds (target capacity) stop at 3
    desired, state = scaler(ctx)
    want, want_state = _expected(ctx, AutoscalingConfig.model_validate(cfg), ScalerState())
    assert (desired, state) == (want.desired, {"kvpilot": dataclasses.asdict(want_state)})
    assert desired == 3 and "held to [1, 3]" in want.reason and scaler.last_decision == want


def test_autoscaler_round_trips_its_state_through_serve():
    cfg = AutoscalingConfig.model_validate({})
    scaler = KVPilotAutoscaler("m", {}, kv_capacity_tokens=CAPACITY, min_replicas=1, max_replicas=3)
    state, mine = {}, ScalerState()
    for step, usage in enumerate([0.3, 0.35, 0.5, 0.6, 0.62]):
        ctx = _ctx((usage, usage), now=10.0 * step, state=state)
        desired, state = scaler(ctx)
        want, mine = _expected(ctx, cfg, mine)
        assert desired == want.desired and state == {"kvpilot": dataclasses.asdict(mine)}
        state = json.loads(json.dumps(state))  # however Serve keeps it, plain JSON must do
    assert len(mine.history) == 5  # every call's demand carried into the next


def test_autoscaler_records_each_decision_and_logs_when_it_changes(caplog):
    scaler = KVPilotAutoscaler("m", {}, kv_capacity_tokens=CAPACITY, min_replicas=1, max_replicas=3)
    state: dict = {}
    with caplog.at_level(logging.INFO, logger="kvpilot.autoscaling"):
        for step in range(3):  # requests waiting, for 0, 1, 2 s: under the sustain window, the reason counting up
            _, state = scaler(_ctx((0.3, 0.3), now=float(step), state=state))
            assert scaler.last_decision.kind == "steady" and scaler.last_decision.desired == 2
            assert f"pressure for {step} s" in scaler.last_decision.reason
        _, state = scaler(_ctx((0.99, 0.99), now=3.0, state=state, queued=50.0))
    lines = [r.getMessage() for r in caplog.records if " replicas: " in r.getMessage()]
    assert len(lines) == 2, lines  # the first steady decision, then the scale-up: not every call
    assert lines[-1].endswith(scaler.last_decision.reason) and scaler.last_decision.kind == "kv_demand"


def test_autoscaler_uses_the_replicas_measured_floor_and_says_so(caplog):
    scaler = KVPilotAutoscaler("m", {}, kv_capacity_tokens=CAPACITY, min_replicas=1, max_replicas=3)
    with caplog.at_level(logging.INFO, logger="kvpilot.autoscaling"):
        ctx = _ctx((0.3, 0.3), now=0.0)
        scaler(ctx)
        assert scaler.last_decision.sources == {"itl_floor_s": "learned", "kv_capacity_tokens": "plan"}
        for key, value in (("itl_floor_s", 0.021), ("kv_capacity_tokens", 2 * CAPACITY)):
            ctx.aggregated_metrics[key] = {rid: value for rid in ctx.running_replicas}
        ctx.current_time = 1.0
        scaler(ctx)
    d = scaler.last_decision
    assert d.sources == {"itl_floor_s": "measured", "kv_capacity_tokens": "measured"}
    assert d.signals["itl_floor_s"] == 0.021
    assert abs(d.signals["kv_tokens_used"] - 0.6 * 2 * CAPACITY) < 1e-6  # usage x each replica's own capacity
    lines = [r.getMessage() for r in caplog.records]
    assert "autoscaler m: itl_floor_s 21.0 ms from measured" in lines
    assert "autoscaler m: kv_capacity_tokens from measured" in lines


def test_router_uses_each_replicas_measured_prefill_speed_and_capacity(caplog):
    router = _router(model="m", policy="kvpilot", kv_capacity_tokens=100_000, block_tokens=16)
    fast = _Replica(_ID("fast"), {"prefill_tokens_per_s": 20_000.0, "kv_capacity_tokens": 50_000.0})
    slow = _Replica(_ID("slow"), {})
    with caplog.at_level(logging.INFO, logger="kvpilot.router"):
        _choose(router, [fast, slow], _pending("r0", 64))
    pol = router._policy
    assert pol._drain == {"fast": 20_000.0 * pol.prefill_efficiency}
    assert router._caps == {"fast": 50_000}
    lines = [r.getMessage() for r in caplog.records]
    assert "router m: replica fast prefill speed 20,000 tokens/s (measured)" in lines
    assert "router m: replica slow prefill speed 6,900 tokens/s (plan)" in lines
    assert "router m: replica fast KV capacity 50,000 tokens (measured)" in lines
    # The same queued prefill drains ~3x faster on the replica that measured 20k tokens/s.
    for rid in ("fast", "slow"):
        pol.on_routed(_Request([], 0) and router._routing_request(_pending(f"q-{rid}", 6900, 0)), rid)
    owed = dict(zip(("fast", "slow"), pol._owed(["fast", "slow"], [10**9, 10**9], pol.clock() + 0.5)))
    assert owed["fast"] < owed["slow"]
    router.on_replica_actor_died(_ID("fast"))
    assert "fast" not in pol._drain and "fast" not in router._caps


def test_an_override_beats_the_measurement():
    router = _router(model="m", policy="kvpilot", params={"prefill_tokens_per_s": 5000.0}, kv_capacity_tokens=1000)
    _choose(router, [_Replica(_ID("a"), {"prefill_tokens_per_s": 20_000.0}), _Replica(_ID("b"))], _pending("r", 32))
    assert router._policy._drain == {}


@dataclass
class _LoraRequest(_Request):  # HttpCall's adapter attribute
    adapter: str | None = None


def _lora_pending(rid: str, adapter: str | None, prompt_tokens: int = 200) -> _Pending:
    p = _pending(rid, prompt_tokens, max_tokens=100)
    req = p.args[1]
    p.args[1] = _LoraRequest(req.prompt_token_ids, req.max_tokens, adapter)
    return p


def test_router_prefers_the_replica_that_reports_the_adapter_until_it_is_busier():
    router = _router(**FROZEN, block_tokens=128)
    replicas = [_Replica(_ID("x"), {"adapters": []}), _Replica(_ID("y"), {"adapters": ["sql"]})]
    sent = []
    for i in range(2):  # 200-token prompts: the holder wins while its queue costs less than the 512-token load
        p = _lora_pending(f"a{i}", "sql")
        uid = _choose(router, replicas, p)[0]
        _route(router, p, uid)
        sent.append(uid)
    # y empty costs 200; owing 200 (one request queued), 200 + 200 x 2 = 600, under x's 512 + 200; owing 400
    # (two queued), 400 + 200 x 3 = 1000: x is cheaper
    assert sent == ["y", "y"]
    p = _lora_pending("a2", "sql")
    assert _choose(router, replicas, p)[0] == "x"  # the hot adapter spreads
    _route(router, p, "x")
    assert router._adapters.resident("x", "sql")  # routed there: held from now on (the load is queued there)
    base = _lora_pending("b", None)
    assert router._routing_request(base).adapter is None


def test_adapter_requests_without_reports_follow_the_routers_own_ledger():
    router = _router(**FROZEN, block_tokens=128)
    replicas = [_Replica(_ID("x")), _Replica(_ID("y"))]
    p = _lora_pending("c0", "chat")
    first = _choose(router, replicas, p)[0]
    _route(router, p, first)
    p = _pending("c1", 200)  # a base-model request: no adapter term, goes to the idle replica
    other = _choose(router, replicas, p)[0]
    assert other != first
    # equal prefill owed after the base request: the adapter's holder wins by the load it saves
    _route(router, p, other)
    assert _choose(router, replicas, _lora_pending("c2", "chat"))[0] == first


def test_a_burst_ranked_before_any_routing_spreads_over_full_batches():
    # Serve ranks a burst's requests before the first is acknowledged (on_request_routed comes
    # after the replica accepts): each must see the ones ranked before it, or all go to one replica.
    router = _router(policy="kvpilot", block_tokens=128, engine={"max_num_seqs": 2})
    replicas = [_Replica(_ID("x")), _Replica(_ID("y"))]

    def shared(rid: str) -> _Pending:  # one 128-token block every prompt shares, then its own tokens
        return _Pending(args=[_Request(list(range(128)) + [1000 + len(rid)] * 8, 200)], kwargs={},
                        metadata=SimpleNamespace(internal_request_id=rid))

    _route(router, shared("warm"), "x")  # x holds the shared block: without the batch, all would go there
    router.on_request_completed(_ID("x"), "warm")
    pendings = [shared(f"b{i}") for i in range(8)]
    firsts = [_choose(router, replicas, p)[0] for p in pendings]
    assert firsts.count("x") >= 2 and firsts.count("y") >= 2, firsts
    for p, uid in zip(pendings, firsts):  # routed where ranked: nothing left counted twice
        _route(router, p, uid)
    assert not router._chosen and router._with_chosen("") is router._ledger
    assert sum(router._ledger.requests.values()) == 8


def test_a_ranked_request_never_routed_stops_counting():
    router = _router(policy="kvpilot", block_tokens=128, engine={"max_num_seqs": 2})
    replicas = [_Replica(_ID("x")), _Replica(_ID("y"))]
    lost = _pending("lost", 8, max_tokens=10)
    first = _choose(router, replicas, lost)[0]  # ranked, then the client gave up: no on_request_routed
    assert router._with_chosen("other").requests == {first: 1}
    router._chosen["lost"] = (first, time.monotonic() - router_mod.CHOSEN_TTL_S - 1)
    assert router._with_chosen("other").requests == {}
