"""Micro-benchmark: how long one routing decision takes in the router's own code.

One decision = build a ``ReplicaLoad`` per replica (ledger + last engine report +
``PrefixIndex.match`` of the prompt's blocks + index size) and ``policy.rank``.
Setup: 64 replicas, each prefix index filled to a Llama-2-70B AWQ replica's
capacity (22,089 blocks), a 512-token system prompt cached everywhere, and an
8k-token prompt (512 blocks) whose first 4k tokens one replica holds.

    .venv/bin/python benchmarks/sim_router_decision.py [--replicas 64] [--prompt-tokens 8192] [--n 3000]

Prints p50/p99 in microseconds of the whole decision and of each part, per policy.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.routing import POLICIES, Ledger, PrefixIndex, ReplicaLoad, RoutingRequest, make_policy  # noqa: E402

KV_BLOCKS = 22_089  # planner: Llama-2-70B AWQ, TP=2, H100-80GB, gpu_memory_utilization 0.92
SYSTEM_BLOCKS = 32  # a 512-token system prompt every replica has cached


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]


def setup(n_replicas: int, prompt_tokens: int, rng: random.Random):
    rids = [f"replica-{i}" for i in range(n_replicas)]
    # the default global bound (1M blocks) would trim 64 full replicas; size it to hold them all, as a
    # deployment of this size would
    index = PrefixIndex(max_blocks=n_replicas * KV_BLOCKS)
    system = list(range(1, SYSTEM_BLOCKS + 1))
    next_key = 10**9
    for rid in rids:
        index.set_capacity(rid, KV_BLOCKS)
        index.insert(rid, system)
        fill = list(range(next_key, next_key + KV_BLOCKS - SYSTEM_BLOCKS))
        next_key += KV_BLOCKS
        index.insert(rid, fill)
    blocks = prompt_tokens // 16
    hashes = tuple(system + list(range(5 * 10**8, 5 * 10**8 + blocks - SYSTEM_BLOCKS)))
    index.insert(rids[7], hashes[: blocks // 2])  # one replica holds this conversation's first half
    ledger = Ledger()
    for rid in rids:
        for _ in range(rng.randrange(0, 40)):
            ledger.sent(rid, rng.randrange(500, 20_000))
    stats = {rid: (rng.random(), rng.randrange(0, 64), rng.randrange(0, 8)) for rid in rids}
    req = RoutingRequest(prompt_tokens=prompt_tokens, max_tokens=512, block_hashes=hashes)
    return rids, index, ledger, stats, req


def decide(policy, rids, index, ledger, stats, req, cap_tokens: int, times: dict[str, list[float]]) -> str:
    t0 = time.perf_counter_ns()
    matches = [index.match(rid, req.block_hashes) for rid in rids] if policy.uses_prefix else [0] * len(rids)
    t1 = time.perf_counter_ns()
    loads = []
    for rid, m in zip(rids, matches):
        u, nr, nw = stats[rid]
        loads.append(ReplicaLoad(replica_id=rid, requests_in_flight=ledger.requests.get(rid, 0),
                                 tokens_in_flight=ledger.tokens.get(rid, 0), kv_cache_usage=u, num_running=nr,
                                 num_waiting=nw, kv_capacity_tokens=cap_tokens, cached_blocks=m,
                                 index_blocks=index.size(rid) if policy.uses_prefix else 0))
    t2 = time.perf_counter_ns()
    choice = policy.rank(req, loads)[0]
    t3 = time.perf_counter_ns()
    times["match"].append((t1 - t0) / 1e3)
    times["build"].append((t2 - t1) / 1e3)
    times["rank"].append((t3 - t2) / 1e3)
    times["total"].append((t3 - t0) / 1e3)
    return choice


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--replicas", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=8192)
    ap.add_argument("--n", type=int, default=3000, help="decisions per policy")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ns = ap.parse_args()
    rng = random.Random(0)
    rids, index, ledger, stats, req = setup(ns.replicas, ns.prompt_tokens, rng)
    print(f"{ns.replicas} replicas, {ns.prompt_tokens}-token prompt ({len(req.block_hashes)} blocks), "
          f"{ns.n} decisions per policy; microseconds")
    print(f"{'policy':<16}{'total p50':>10}{'p99':>9}{'match p50':>11}{'build p50':>11}{'rank p50':>10}{'rank p99':>10}")
    for name in ns.policies.split(","):
        clock = [0.0]
        extra = {"clock": lambda: clock[0]} if name == "kvpilot" else None
        policy = make_policy(name, extra, seed=1)
        times: dict[str, list[float]] = {"match": [], "build": [], "rank": [], "total": []}
        for i in range(ns.n + 200):
            clock[0] = i * 0.01
            decide(policy, rids, index, ledger, stats, req, KV_BLOCKS * 16, times)
        for k in times:
            del times[k][:200]  # warm-up
        print(f"{name:<16}{statistics.median(times['total']):>10.1f}{_pct(times['total'], 99):>9.1f}"
              f"{statistics.median(times['match']):>11.1f}{statistics.median(times['build']):>11.1f}"
              f"{statistics.median(times['rank']):>10.1f}{_pct(times['rank'], 99):>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
