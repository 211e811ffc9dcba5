"""Routing policies and the prefix index: pure, over snapshots."""

import pytest

from cluster.routing.policies import (POLICIES, Ledger, PrefixIndex, ReplicaLoad, RoutingRequest, block_hashes,
                                      make_policy)


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
    idx.insert("a", range(80))  # one 80-block chain into 60 blocks: like vLLM, the tail is evicted first
    assert idx.size("a") == 60 and idx.match("a", range(80)) == 60 and idx.match("a", [60]) == 0
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


def test_kvpilot_leaves_a_full_batch_for_a_free_slot_elsewhere():
    req = _req(tokens=2048, shared=1024)
    blind = make_policy("kvpilot")  # engine limits unknown (the simulator's default): no batch term
    p = make_policy("kvpilot", engine={"max_num_seqs": 8, "unknown_fact": 1})  # what the live router passes
    assert p.max_num_seqs == 8
    # A free slot left: the cached prefix wins, as without the term.
    assert p.rank(req, [_r("a", cached_blocks=64, requests_in_flight=7), _r("b")])[0] == "a"
    # Batch full: the request would wait for a running answer to finish; a free slot elsewhere is sooner.
    assert p.rank(req, [_r("a", cached_blocks=64, requests_in_flight=8), _r("b")])[0] == "b"
    assert blind.rank(req, [_r("a", cached_blocks=64, requests_in_flight=12), _r("b")])[0] == "a"
    # Both full: the shorter queue.
    assert p.rank(req, [_r("a", cached_blocks=64, requests_in_flight=14), _r("b", requests_in_flight=9)])[0] == "b"
    assert make_policy("kvpilot", {"max_num_seqs": 4}, engine={"max_num_seqs": 8}).max_num_seqs == 4  # params win


def test_kvpilot_ranks_after_requests_with_nothing_to_prefill():
    """Handle calls carry no prompt and a fully cached prompt prefills nothing: the mean uncached
    prompt routed is then 0, which once divided the queue term by zero and failed every ranking."""
    p = make_policy("kvpilot", {"clock": lambda: 0.0})
    for rid in ("a", "b", "a"):
        p.on_routed(_req(tokens=0), rid)
    assert sorted(p.rank(_req(tokens=0), [_r("a"), _r("b")])) == ["a", "b"]
    assert p.rank(_req(tokens=512), [_r("a", cached_blocks=32), _r("b")])[0] == "a"


def test_kvpilot_avoids_a_replica_whose_kv_cache_would_overflow():
    p = make_policy("kvpilot")
    req = _req(tokens=1000, max_tokens=1000)
    full = _r("a", kv_cache_usage=0.88, kv_capacity_tokens=20_000, cached_blocks=62)
    roomy = _r("b", kv_cache_usage=0.10, kv_capacity_tokens=20_000, tokens_in_flight=3000)
    assert p.rank(req, [full, roomy])[0] == "b"


def test_kvpilot_keeps_cache_reuse_when_every_replica_has_a_queue():
    p = make_policy("kvpilot", {"clock": lambda: 0.0})
    for rid in ("a", "a", "b"):
        p.on_routed(_req(tokens=5000), rid)  # a owes two 5000-token prefills, b one
    req = _req(tokens=4100, shared=4000)
    holder, busy, idle = _r("a", cached_blocks=250), _r("b"), _r("c")
    # Recomputing the prefix on b would be sooner for this request (5000 + 4100 < 10000 + 100) but delays the
    # request queued there as well: with no replica idle, the holder is cheaper (10000 + 100 x 3 < 5000 + 4100 x 2).
    assert p.rank(req, [holder, busy])[0] == "a"
    assert p.rank(req, [holder, busy, idle])[0] == "c"  # an idle replica replicates the prefix at no one's cost


def test_kvpilot_among_full_replicas_prefers_the_one_its_kv_adds_least_to():
    p = make_policy("kvpilot")
    req = _req(tokens=4100, max_tokens=100, shared=4000)
    fuller_cached = _r("a", kv_cache_usage=0.95, kv_capacity_tokens=100_000, cached_blocks=250)
    full_cold = _r("b", kv_cache_usage=0.90, kv_capacity_tokens=100_000)
    # Both past kv_high once admitted: a gets 200 tokens of new KV, b 4200; a being fuller does not matter.
    assert p.rank(req, [fuller_cached, full_cold])[0] == "a"
    roomy = _r("c", kv_cache_usage=0.10, kv_capacity_tokens=100_000)
    # Without the cached prefix, a's KV would take 4200 tokens past the line too: the roomy replica wins.
    fuller = _r("a", kv_cache_usage=0.95, kv_capacity_tokens=100_000)
    assert p.rank(req, [fuller, full_cold, roomy])[0] == "c"


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


def _chains(rng, n_chains: int = 12, depth: int = 40) -> list[tuple[int, ...]]:
    """Prompts that share prefixes, as chained block hashes (a block's hash fixes its whole prefix)."""
    chains = []
    for _ in range(n_chains * 3):
        base = list(rng.choice(chains)[: rng.randrange(0, depth)]) if chains and rng.random() < 0.7 else []
        ids = [rng.randrange(4) for _ in range(16 * (len(base) + rng.randrange(1, depth)))]
        chains.append(block_hashes(ids, parent=base[-1] if base else 0) if not base else
                      tuple(base) + block_hashes(ids[16 * len(base):], parent=base[-1]))
    return chains


def _walk(idx: PrefixIndex, rid: str, hashes) -> int:
    lru = idx._lru.get(rid, {})
    n = 0
    for h in hashes:
        if h not in lru:
            break
        n += 1
    return n


def test_match_all_equals_each_replicas_match_through_inserts_evictions_and_deaths():
    import random

    rng = random.Random(7)
    chains = _chains(rng)
    idx = PrefixIndex(max_blocks=900)
    rids = [f"r{i}" for i in range(9)]
    for rid in rids:
        idx.set_capacity(rid, rng.randrange(40, 200))  # small: constant eviction
    for step in range(3000):
        rid = rng.choice(rids)
        if rng.random() < 0.01:
            idx.remove_replica(rid)
            idx.set_capacity(rid, rng.randrange(40, 200))
        idx.insert(rid, rng.choice(chains))
        if step % 10 == 0:
            q = rng.choice(chains)
            want = {r: m for r in rids if (m := _walk(idx, r, q))}
            assert idx.match_all(q) == want
            assert all(idx.match(r, q) == want.get(r, 0) for r in rids)
    assert len(idx) <= 900 and len(idx) == sum(idx.sizes(rids))


def test_a_dead_replicas_blocks_are_gone_from_every_match():
    idx = PrefixIndex()
    prompt = block_hashes(list(range(320)))
    for rid in ("a", "b", "c"):
        idx.insert(rid, prompt[:10])
    idx.insert("b", prompt)
    assert idx.match_all(prompt) == {"a": 10, "b": 20, "c": 10}
    bit_b = idx._bit["b"]
    idx.remove_replica("b")
    assert idx.match_all(prompt) == {"a": 10, "c": 10} and idx.match("b", prompt) == 0
    assert not any(mask & bit_b for mask in idx._holders.values()) and len(idx) == 20
    idx.insert("d", prompt[:3])  # takes the dead replica's bit: inherits nothing of it
    assert idx._bit["d"] == bit_b
    assert idx.match_all(prompt) == {"a": 10, "c": 10, "d": 3}
    assert len(idx._holders) == 10


def _kvpilot_cost(p, req, r: ReplicaLoad, now: float) -> float:
    """KVPilot's cost of one replica, written from its docstring, one ReplicaLoad at a time."""
    mine = p._mine.get(r.replica_id, 0)
    owed = min(max(0.0, p.drain_rate * (p._empty_at.get(r.replica_id, now) - now)), mine)
    uncached = req.prompt_tokens - min(req.prompt_tokens - 1, r.cached_blocks * p.block_tokens) \
        if r.cached_blocks and req.prompt_tokens > 0 else req.prompt_tokens
    others = max(0, r.tokens_in_flight - mine)
    queued = owed / (p._prefilled / p._prefills) if p._prefills else 0.0  # owed tokens in mean uncached prompts
    cost = owed + uncached * (1 + queued) + p.load_weight * others
    if r.kv_capacity_tokens:
        cap = r.kv_capacity_tokens
        in_use = max(r.kv_cache_usage * cap, p._kv.get(r.replica_id, 0) + others)
        adds = uncached + req.max_tokens
        past = in_use + adds - p.kv_high * cap  # KV tokens past kv_high once admitted
        if past > 0:
            cost += p.kv_penalty_tokens * min(past, adds) / cap  # only this request's part past the line
    return cost


def test_kvpilot_ranks_by_its_documented_cost_through_routes_finishes_and_time():
    import random

    rng = random.Random(3)
    clock = [0.0]
    p = make_policy("kvpilot", {"clock": lambda: clock[0]}, seed=5)
    rids = [f"r{i}" for i in range(12)]
    ledger, live = Ledger(), []
    for step in range(2000):
        clock[0] += rng.choice([0.0, 0.01, 0.5, 3.0])
        for rid, req in list(live):
            if rng.random() < 0.2:
                live.remove((rid, req))
                ledger.finished(rid, req.prompt_tokens + req.max_tokens)
                p.on_finished(req, rid)
        cands = rids if step % 50 else rng.sample(rids, 7)  # sometimes a subset, in another order
        loads = [ReplicaLoad(r, ledger.requests.get(r, 0), ledger.tokens.get(r, 0) + rng.choice([0, 0, 500]),
                             kv_cache_usage=rng.choice([0.0, 0.5, rng.random()]),
                             kv_capacity_tokens=rng.choice([40_000, 40_000, 0, 9_000]) if step % 3 else 40_000,
                             cached_blocks=rng.choice([0, 0, 4, 64, 500])) for r in cands]
        req = RoutingRequest(rng.choice([1000, 4000, 8192]), rng.choice([0, 256]), ())
        ranked = p.rank(req, loads)
        costs = {r.replica_id: _kvpilot_cost(p, req, r, clock[0]) for r in loads}
        assert [costs[r] for r in ranked] == sorted(costs.values()), step
        chosen = ranked[rng.choice([0, 0, 0, 1])]  # sometimes Serve falls back to the second
        row = next(r for r in loads if r.replica_id == chosen)
        p.on_routed(req, chosen, row.cached_blocks)
        ledger.sent(chosen, req.prompt_tokens + req.max_tokens)
        live.append((chosen, req))
    for rid, req in live:
        p.on_finished(req, rid)
    assert not p._mine and not p._empty_at and not p._kv and not p._kv_of  # every request given back: nothing left


def test_ranking_changes_no_account_only_the_hooks_do():
    clock = [0.0]
    for name in ("kvpilot", "round_robin"):  # the policies that keep an account (the others only draw at random)
        p = make_policy(name, {"clock": lambda: clock[0]} if name == "kvpilot" else None, seed=1)
        req = _req(tokens=2048)
        reps = [_r("a", requests_in_flight=1, tokens_in_flight=100), _r("b", requests_in_flight=2, tokens_in_flight=90),
                _r("c", requests_in_flight=3, tokens_in_flight=80)]
        first = p.rank(req, reps)
        assert p.rank(req, reps) == first, name  # Serve asking again after a backoff sees the same ranking
        p.on_routed(req, first[0])
        assert p.rank(req, reps)[0] != first[0], name  # the replica it went to is charged


def test_kvpilot_charges_the_replica_used_and_gives_it_back():
    clock = [0.0]
    p = make_policy("kvpilot", {"clock": lambda: clock[0], "load_weight": 0.0})
    req = _req(tokens=2000)
    reps = [_r("a"), _r("b", requests_in_flight=1)]  # equal costs: fewer requests in flight first
    assert p.rank(req, reps) == ["a", "b"]
    p.on_routed(req, "b")  # Serve fell back to the second: b owes 2000 tokens of prefill
    assert p.rank(req, [_r("a", requests_in_flight=5), _r("b")]) == ["a", "b"]
    p.on_routed(req, "a")
    p.on_routed(req, "a")  # a owes 4000
    assert p.rank(req, reps) == ["b", "a"]
    clock[0] = 4000 / p.drain_rate + 1.0  # drained by more than 4000 tokens since: both queues empty
    assert p.rank(req, reps) == ["a", "b"]
    clock[0] = 0.0
    p.on_finished(req, "a")
    assert p.rank(req, reps) == ["b", "a"]  # one of a's requests still in flight: its prefill still owed
    p.on_finished(req, "a")  # nothing of this policy's left on a: a owes nothing
    assert p.rank(req, reps) == ["a", "b"] and "a" not in p._empty_at


def test_round_robin_turns_on_routing_not_on_ranking():
    p = make_policy("round_robin")
    reps = [_r("a"), _r("b"), _r("c")]
    assert p.rank(_req(), reps) == p.rank(_req(), reps) == ["a", "b", "c"]
    p.on_routed(_req(), "c")
    assert p.rank(_req(), reps) == ["b", "c", "a"]


def test_policies_count_blocks_in_the_routers_block_size():
    for name in ("kvpilot", "dynamo"):
        assert make_policy(name, block_tokens=128).block_tokens == 128
        assert make_policy(name, {"block_tokens": 128}, block_tokens=128).block_tokens == 128
        with pytest.raises(ValueError, match="block_tokens 16 of policy .* differs from the 128-token blocks"):
            make_policy(name, {"block_tokens": 16}, block_tokens=128)
    make_policy("pow2", block_tokens=128)  # a policy that does not count blocks takes no block size


def test_candidates_columns_and_rows_are_the_same_snapshot():
    from cluster.routing.policies import Candidates, candidates

    idx = PrefixIndex()
    prompt = block_hashes(list(range(160)))
    idx.insert("b", prompt[:4])
    led = Ledger()
    led.sent("a", 700)
    c = candidates(["a", "b"], led, [0.1, 0.2], [1, 2], [0, 3], 5000, idx, prompt)
    assert c.rows() == [ReplicaLoad("a", 1, 700, 0.1, 1, 0, 5000, 0, 0), ReplicaLoad("b", 0, 0, 0.2, 2, 3, 5000, 4, 4)]
    assert Candidates.of(c.rows()) == c
    for name in POLICIES:  # every policy ranks the columns as it ranks the rows
        assert make_policy(name, seed=2).rank_columns(RoutingRequest(160, 8, prompt), c) == \
            make_policy(name, seed=2).rank(RoutingRequest(160, 8, prompt), c.rows())


def test_block_hashes_are_the_chained_hash_of_each_full_block():
    import random

    rng = random.Random(1)
    for n in (0, 15, 16, 17, 100, 1000):
        ids = [rng.randrange(32_000) for _ in range(n)]
        want, h = [], 3
        for s in range(0, n - 15, 16):
            h = hash((h, tuple(ids[s:s + 16])))
            want.append(h)
        assert block_hashes(ids, parent=3) == tuple(want) == block_hashes(tuple(ids), parent=3)
