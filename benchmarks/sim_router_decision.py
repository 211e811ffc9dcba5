"""Micro-benchmark: how long one routing decision takes in the router's own code.

One decision = the snapshot of the replicas (``cluster.routing.policies.candidates``: ledger +
last engine reports + ``PrefixIndex.match_all`` of the prompt's blocks + index sizes, in
columns), ``policy.rank_columns`` and the policy's ``on_routed`` on the first choice
(account), as the simulator and the live router make it.
Hashing the prompt's blocks (``block_hashes``, once per request, before any decision and
reused if Ray retries it) is timed apart, on random token ids.
Setup: 64 replicas, each prefix index filled to a Llama-2-70B AWQ replica's
capacity (22,089 blocks), a 512-token system prompt cached everywhere, and an
8k-token prompt (512 blocks) whose first 4k tokens one replica holds.

    .venv/bin/python benchmarks/sim_router_decision.py [--replicas 64] [--prompt-tokens 8192] [--n 3000]
        [--against REV]

Prints p50/p99 in microseconds of the whole decision and of each part, per policy: match is
the part of snapshot spent in ``match_all``, timed on its own; account is ``on_routed``.
``--against REV``: each policy also as ``cluster/routing/policies.py`` was at git revision REV (its row
named ``policy@REV``), the two timed in turns, decision by decision, so both see the same load;
then the ratio of their medians.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import types
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.routing.policies import (  # noqa: E402
    POLICIES, Ledger, PrefixIndex, RoutingRequest, block_hashes, candidates, make_policy,
)

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
    stats = [(rng.random(), rng.randrange(0, 64), rng.randrange(0, 8)) for _ in rids]
    req = RoutingRequest(prompt_tokens=prompt_tokens, max_tokens=512, block_hashes=hashes)
    return rids, index, ledger, stats, req


def decide(policy, rids, index, ledger, stats, req, cap_tokens: int, times: dict[str, list[float]]) -> str:
    if policy.uses_prefix:  # the match on its own, for the breakdown (the snapshot below does it again)
        t0 = time.perf_counter_ns()
        index.match_all(req.block_hashes)
        times["match"].append((time.perf_counter_ns() - t0) / 1e3)
    t0 = time.perf_counter_ns()
    us, nrs, nws = zip(*stats)
    cands = candidates(rids, ledger, us, nrs, nws, cap_tokens, index if policy.uses_prefix else None,
                       req.block_hashes, policy.uses_index_blocks)
    t1 = time.perf_counter_ns()
    choice = policy.rank_columns(req, cands)[0]
    t2 = time.perf_counter_ns()
    policy.on_routed(req, choice, cands.cached_blocks[rids.index(choice)])
    t3 = time.perf_counter_ns()
    times["snapshot"].append((t1 - t0) / 1e3)
    times["rank"].append((t2 - t1) / 1e3)
    times["account"].append((t3 - t2) / 1e3)
    times["total"].append((t3 - t0) / 1e3)
    return choice


def routing_at(rev: str) -> types.ModuleType:
    """``cluster/routing/policies.py`` as it was at git revision ``rev``, loaded as a module of its own."""
    root = Path(__file__).resolve().parents[1]
    src = subprocess.run(["git", "show", f"{rev}:cluster/routing/policies.py"], cwd=root, check=True,
                         capture_output=True, text=True).stdout
    mod = types.ModuleType(f"routing_at_{rev}")
    sys.modules[mod.__name__] = mod  # dataclasses look their module up
    exec(compile(src, f"{rev}:cluster/routing/policies.py", "exec"), mod.__dict__)
    return mod


def _row(label: str, times: dict[str, list[float]]) -> str:
    match = f"{statistics.median(times['match']):>11.1f}" if times["match"] else f"{'-':>11}"
    return (f"{label:<16}{statistics.median(times['total']):>10.1f}{_pct(times['total'], 99):>9.1f}{match}"
            f"{statistics.median(times['snapshot']):>14.1f}"
            f"{statistics.median(times['rank']):>10.1f}{_pct(times['rank'], 99):>10.1f}"
            f"{statistics.median(times['account']):>13.1f}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--replicas", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=8192)
    ap.add_argument("--n", type=int, default=3000, help="decisions per policy")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--against", help="a git revision: time each policy of its cluster/routing/policies.py too, in turns")
    ns = ap.parse_args()
    rng = random.Random(0)
    rids, index, ledger, stats, req = setup(ns.replicas, ns.prompt_tokens, rng)
    tokens = [rng.randrange(32_000) for _ in range(ns.prompt_tokens)]
    hash_us = []
    for _ in range(ns.n // 10 + 20):
        t0 = time.perf_counter_ns()
        block_hashes(tokens)
        hash_us.append((time.perf_counter_ns() - t0) / 1e3)
    del hash_us[:20]
    print(f"{ns.replicas} replicas, {ns.prompt_tokens}-token prompt ({len(req.block_hashes)} blocks), "
          f"{ns.n} decisions per policy; microseconds")
    print(f"hash, once per request (block_hashes of {ns.prompt_tokens} token ids, not in the decision): "
          f"p50 {statistics.median(hash_us):.1f}, p99 {_pct(hash_us, 99):.1f}")
    print(f"{'policy':<16}{'total p50':>10}{'p99':>9}{'match p50':>11}{'snapshot p50':>14}{'rank p50':>10}"
          f"{'rank p99':>10}{'account p50':>13}")
    builders = [("", make_policy)]
    if ns.against:
        builders.append((f"@{ns.against}", routing_at(ns.against).make_policy))
    for name in ns.policies.split(","):
        runs = []  # (label, policy, its clock, its times): timed in turns, one decision each
        for suffix, build in builders:
            clock = [0.0]
            extra = {"clock": lambda clock=clock: clock[0]} if name == "kvpilot" else None
            runs.append((name + suffix, build(name, extra, seed=1), clock,
                         {"match": [], "snapshot": [], "rank": [], "account": [], "total": []}))
        for i in range(ns.n + 200):
            for _, policy, clock, times in runs:
                clock[0] = i * 0.01
                decide(policy, rids, index, ledger, stats, req, KV_BLOCKS * 16, times)
        for label, _, _, times in runs:
            for k in times:
                del times[k][:200]  # warm-up
            print(_row(label, times))
        if len(runs) == 2:
            ratio = statistics.median(runs[0][3]["total"]) / statistics.median(runs[1][3]["total"])
            print(f"{'':<16}total p50 ratio {runs[0][0]} / {runs[1][0]}: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
