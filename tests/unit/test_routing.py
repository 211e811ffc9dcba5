"""Routing policies and the prefix index: pure, over snapshots."""

import pytest

from cluster.routing import POLICIES, Ledger, PrefixIndex, ReplicaLoad, RoutingRequest, block_hashes, make_policy


def _req(tokens: int = 1024, shared: int = 0, max_tokens: int = 128) -> RoutingRequest:
    ids = list(range(shared)) + list(range(10_000, 10_000 + tokens - shared))
    return RoutingRequest(prompt_tokens=tokens, max_tokens=max_tokens, block_hashes=block_hashes(ids))


def _r(rid: str, **kw) -> ReplicaLoad:
    return ReplicaLoad(replica_id=rid, **{"requests_in_flight": 0, "tokens_in_flight": 0, **kw})


def test_unknown_policy_and_parameter_are_refused_with_choices():
    with pytest.raises(ValueError, match="'fastest' is not a routing policy; choose one of round_robin"):
        make_policy("fastest")
    with pytest.raises(ValueError, match="'alpha' is not a parameter of policy 'kvpilot'"):
        make_policy("kvpilot", {"alpha": 1})
    assert set(POLICIES) == {"round_robin", "pow2", "least_kv", "prefix_affinity", "llmd", "dynamo", "sglang", "kvpilot"}


def test_block_hashes_are_chained_and_block_aligned():
    a = block_hashes(list(range(40)))
    b = block_hashes(list(range(32)) + [999] * 8)
    assert len(a) == 2 and a == b  # the partial third block is not cacheable
    c = block_hashes([7] + list(range(1, 40)))
    assert c[0] != a[0] and c[1] != a[1]  # a different first block changes every later hash


def test_prefix_index_is_bounded_and_forgets_dead_replicas():
    idx = PrefixIndex(max_blocks=100)
    idx.set_capacity("a", 60)
    idx.insert("a", range(80))
    assert idx.size("a") == 60 and idx.match("a", [0]) == 0 and idx.match("a", [20, 21]) == 2
    idx.insert("b", range(1000, 1090))
    assert len(idx) <= 100
    idx.remove_replica("a")
    assert idx.match("a", [79]) == 0 and "a" not in idx.replicas()


def test_prefix_affinity_follows_the_cache_until_queues_diverge():
    req = _req(shared=512)
    p = make_policy("prefix_affinity")
    balanced = [_r("a", cached_blocks=32, requests_in_flight=3), _r("b", requests_in_flight=0)]
    assert p.rank(req, balanced)[0] == "a"
    skewed = [_r("a", cached_blocks=32, requests_in_flight=12), _r("b", requests_in_flight=0)]
    assert p.rank(req, skewed)[0] == "b"


def test_kvpilot_weighs_cached_prefix_against_queued_work():
    p = make_policy("kvpilot")
    req = _req(tokens=2048, shared=1024)
    # 64 cached blocks save 1024 prefill tokens: worth more than 500 tokens of queue.
    assert p.rank(req, [_r("a", cached_blocks=64, tokens_in_flight=500), _r("b")])[0] == "a"
    # ...but not more than 20k tokens of queue: a shared prompt does not pin a hot replica.
    assert p.rank(req, [_r("a", cached_blocks=64, tokens_in_flight=20_000), _r("b")])[0] == "b"


def test_kvpilot_avoids_a_replica_whose_kv_cache_would_overflow():
    p = make_policy("kvpilot")
    req = _req(tokens=1000, max_tokens=1000)
    full = _r("a", kv_cache_usage=0.88, kv_capacity_tokens=20_000, cached_blocks=62)
    roomy = _r("b", kv_cache_usage=0.10, kv_capacity_tokens=20_000, tokens_in_flight=3000)
    assert p.rank(req, [full, roomy])[0] == "b"


def test_every_policy_returns_a_permutation():
    reps = [_r(str(i), requests_in_flight=i, tokens_in_flight=100 * i, kv_cache_usage=i / 10,
               num_waiting=i, cached_blocks=i, index_blocks=10 * i) for i in range(5)]
    for name in POLICIES:
        ranked = make_policy(name).rank(_req(shared=64), reps)
        assert sorted(ranked) == sorted(r.replica_id for r in reps), name


def test_ledger_tracks_what_is_in_flight():
    led = Ledger()
    led.sent("a", 100)
    led.sent("a", 50)
    led.finished("a", 100)
    assert (led.requests["a"], led.tokens["a"]) == (1, 50)
    led.forget("a")
    assert "a" not in led.requests
