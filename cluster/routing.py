"""Replica scoring: pure functions over snapshots, shared by the live router and the simulator.

A policy ranks the candidate replicas of one model for one request. It sees a
``ReplicaLoad`` per replica (what this router sent and has not seen finish, the
engine's last reported KV use and queues, and how much of this request's
prompt the replica has cached) and returns replica ids, best first.

Baselines follow the published behaviour of their systems (see
``../shared/docs/reference.md``); ``kvpilot`` is ours and the default.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

BLOCK_TOKENS = 16  # vLLM's GPU KV block: prefix reuse happens in whole blocks


@dataclass(frozen=True)
class RoutingRequest:
    prompt_tokens: int
    max_tokens: int  # the decode budget the request asked for (tokens it may still add to KV)
    block_hashes: tuple[int, ...] = ()  # chained hashes of the prompt's full blocks


@dataclass(frozen=True)
class ReplicaLoad:
    replica_id: str
    requests_in_flight: int  # this router's own account: sent, not yet finished
    tokens_in_flight: int  # prompt + decode budget of those requests
    kv_cache_usage: float = 0.0  # last engine report, 0..1 (may be seconds old)
    num_running: int = 0  # last engine report
    num_waiting: int = 0  # last engine report
    kv_capacity_tokens: int = 0  # from the planner; 0 if unknown
    cached_blocks: int = 0  # leading blocks of this request's prompt cached there (prefix index)
    index_blocks: int = 0  # blocks the prefix index believes the replica holds


class PrefixIndex:
    """Which replica holds which prompt blocks, approximately, in bounded memory.

    One LRU of chained block hashes per replica, each capped at that replica's
    KV capacity in blocks (vLLM evicts its least recently used free blocks the
    same way), and all together capped at ``max_blocks``: at most
    ``max_blocks`` entries of one int key each, about 100 bytes per entry in
    CPython, so the default bound (1M blocks) is about 100 MB. A replica that
    dies is forgotten at once (``remove_replica``).
    """

    def __init__(self, max_blocks: int = 1_000_000, block_tokens: int = BLOCK_TOKENS):
        self.max_blocks = max_blocks
        self.block_tokens = block_tokens
        self._lru: dict[str, OrderedDict[int, None]] = {}
        self._cap: dict[str, int] = {}
        self._total = 0

    def set_capacity(self, replica_id: str, capacity_blocks: int) -> None:
        self._cap[replica_id] = max(1, capacity_blocks)
        self._lru.setdefault(replica_id, OrderedDict())
        self._evict(replica_id)

    def match(self, replica_id: str, block_hashes: Sequence[int]) -> int:
        """Leading blocks of ``block_hashes`` the replica holds (chained hashes: the first miss ends it)."""
        lru = self._lru.get(replica_id)
        if not lru:
            return 0
        n = 0
        for h in block_hashes:
            if h not in lru:
                break
            n += 1
        return n

    def insert(self, replica_id: str, block_hashes: Iterable[int]) -> None:
        lru = self._lru.setdefault(replica_id, OrderedDict())
        for h in block_hashes:
            if h in lru:
                lru.move_to_end(h)
            else:
                lru[h] = None
                self._total += 1
        self._evict(replica_id)

    def size(self, replica_id: str) -> int:
        return len(self._lru.get(replica_id, ()))

    def remove_replica(self, replica_id: str) -> None:
        self._total -= len(self._lru.pop(replica_id, ()))
        self._cap.pop(replica_id, None)

    def replicas(self) -> list[str]:
        return list(self._lru)

    def __len__(self) -> int:
        return self._total

    def _evict(self, replica_id: str) -> None:
        lru = self._lru[replica_id]
        cap = self._cap.get(replica_id)
        while cap is not None and len(lru) > cap:
            lru.popitem(last=False)
            self._total -= 1
        while self._total > self.max_blocks:
            # Over the global bound: trim the largest replica's oldest entries.
            victim = max(self._lru.values(), key=len)
            victim.popitem(last=False)
            self._total -= 1


def block_hashes(token_ids: Sequence[int], block_tokens: int = BLOCK_TOKENS, parent: int = 0) -> tuple[int, ...]:
    """Chained hashes of the full blocks of a token sequence, as vLLM's prefix cache keys them."""
    out = []
    h = parent
    for start in range(0, len(token_ids) - block_tokens + 1, block_tokens):
        h = hash((h, tuple(token_ids[start : start + block_tokens])))
        out.append(h)
    return tuple(out)


# --- policies ------------------------------------------------------------


class Policy:
    """Ranks replicas for a request. Subclasses are registered by ``name``; params are keyword arguments."""

    name = ""
    uses_prefix = False  # whether the router should maintain the prefix index for it

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)

    def rank(self, req: RoutingRequest, replicas: Sequence[ReplicaLoad]) -> list[str]:
        raise NotImplementedError


def _by(replicas: Sequence[ReplicaLoad], key: Callable[[ReplicaLoad], Any]) -> list[str]:
    return [r.replica_id for r in sorted(replicas, key=key)]


class RoundRobin(Policy):
    name = "round_robin"

    def __init__(self, seed: int = 0):
        super().__init__(seed)
        self._next = 0

    def rank(self, req, replicas):
        ids = sorted(r.replica_id for r in replicas)
        i = self._next % len(ids)
        self._next += 1
        return ids[i:] + ids[:i]


class PowerOfTwo(Policy):
    """Ray Serve's default: two random replicas, fewer ongoing requests wins."""

    name = "pow2"

    def rank(self, req, replicas):
        if len(replicas) <= 2:
            pair = list(replicas)
        else:
            pair = self.rng.sample(list(replicas), 2)
        first = _by(pair, lambda r: (r.requests_in_flight, self.rng.random()))
        return first + [r.replica_id for r in replicas if r.replica_id not in first]


class LeastKV(Policy):
    """Lowest reported KV-cache usage."""

    name = "least_kv"

    def rank(self, req, replicas):
        return _by(replicas, lambda r: (r.kv_cache_usage, r.requests_in_flight, self.rng.random()))


class PrefixAffinity(Policy):
    """Ray's PrefixCacheAffinityRouter: best prefix match while queues are balanced, else least loaded."""

    name = "prefix_affinity"
    uses_prefix = True

    def __init__(self, seed: int = 0, imbalance_threshold: int = 10, match_rate_threshold: float = 0.1):
        super().__init__(seed)
        self.imbalance_threshold = imbalance_threshold
        self.match_rate_threshold = match_rate_threshold
        self._pow2 = PowerOfTwo(seed)

    def rank(self, req, replicas):
        loads = [r.requests_in_flight for r in replicas]
        total_blocks = max(1, len(req.block_hashes))
        if max(loads) - min(loads) < self.imbalance_threshold:
            best = max(replicas, key=lambda r: (r.cached_blocks, -r.requests_in_flight))
            if best.cached_blocks / total_blocks >= self.match_rate_threshold:
                return [best.replica_id] + [r.replica_id for r in replicas if r is not best]
        return self._pow2.rank(req, replicas)


class LlmD(Policy):
    """llm-d's scheduler: weighted queue, KV and prefix scorers in [0, 1]; highest total wins."""

    name = "llmd"
    uses_prefix = True

    def __init__(self, seed: int = 0, queue_weight: float = 2.0, kv_weight: float = 2.0, prefix_weight: float = 3.0):
        super().__init__(seed)
        self.w = (queue_weight, kv_weight, prefix_weight)

    def rank(self, req, replicas):
        queues = [r.num_waiting for r in replicas]
        lo, hi = min(queues), max(queues)
        total_blocks = max(1, len(req.block_hashes))

        def score(r: ReplicaLoad) -> float:
            q = 1.0 if hi == lo else (hi - r.num_waiting) / (hi - lo)
            return self.w[0] * q + self.w[1] * (1 - r.kv_cache_usage) + self.w[2] * r.cached_blocks / total_blocks

        return _by(replicas, lambda r: (-score(r), self.rng.random()))


class Dynamo(Policy):
    """NVIDIA Dynamo's KV router: cost = w × uncached prompt blocks + active decode blocks; lowest wins."""

    name = "dynamo"
    uses_prefix = True

    def __init__(self, seed: int = 0, overlap_weight: float = 1.0, block_tokens: int = BLOCK_TOKENS):
        super().__init__(seed)
        self.overlap_weight = overlap_weight
        self.block_tokens = block_tokens

    def rank(self, req, replicas):
        prompt_blocks = -(-req.prompt_tokens // self.block_tokens)

        def cost(r: ReplicaLoad) -> float:
            active = r.tokens_in_flight / self.block_tokens
            return self.overlap_weight * (prompt_blocks - r.cached_blocks) + active

        return _by(replicas, lambda r: (cost(r), self.rng.random()))


class SGLang(Policy):
    """SGLang's cache-aware router: balance when imbalanced, else best prefix match, else smallest cache."""

    name = "sglang"
    uses_prefix = True

    def __init__(self, seed: int = 0, balance_abs_threshold: int = 64, balance_rel_threshold: float = 1.5,
                 cache_threshold: float = 0.3):
        super().__init__(seed)
        self.abs_t, self.rel_t, self.cache_t = balance_abs_threshold, balance_rel_threshold, cache_threshold

    def rank(self, req, replicas):
        loads = [r.requests_in_flight for r in replicas]
        if max(loads) - min(loads) > self.abs_t and max(loads) > self.rel_t * min(loads):
            return _by(replicas, lambda r: (r.requests_in_flight, self.rng.random()))
        total_blocks = max(1, len(req.block_hashes))
        best = max(replicas, key=lambda r: (r.cached_blocks, -r.requests_in_flight))
        if best.cached_blocks / total_blocks > self.cache_t:
            return [best.replica_id] + [r.replica_id for r in replicas if r is not best]
        return _by(replicas, lambda r: (r.index_blocks, r.requests_in_flight, self.rng.random()))


class KVPilot(Policy):
    """kvpilot: send the request where its first token is expected soonest, without overflowing KV.

    Per replica, in prompt tokens (tokens / ``prefill_tokens_per_s`` = seconds):

        cost = prefill owed there             (a virtual FIFO queue, see below)
             + uncached prompt tokens         (this request's own prefill there: its prompt minus
                                               the leading blocks the prefix index says are cached)
             + load_weight × unaccounted tokens in flight
             + kv_penalty_tokens × (KV use after admission − kv_high), when that is positive

    *Prefill owed* is this policy's own account: every request it routes adds its
    uncached tokens to its replica's queue, and each queue drains at the replica's
    effective prefill speed (``prefill_tokens_per_s × prefill_efficiency``: attention
    and the decodes batched into each step take the rest of it) as ``clock`` advances.
    Unlike tokens in flight, it forgets a request once its prefill is done, so a
    replica busy decoding long prompts is not mistaken for one with a queue, and a
    replica that just took a 30k-token prompt is (its engine still reports an empty
    waiting queue while the prompt is being chunked through). It is clamped by the
    router's ledger: never more than the tokens in flight, zero when nothing is.

    *Unaccounted tokens in flight* are ledger tokens this policy did not route (another
    router's, or all of them for a fresh policy): treated as queued work, at ``load_weight``.

    The prefix term makes cache reuse worth exactly the prefill it saves, so reuse wins
    among comparable queues, and a replica that holds a popular prefix stops attracting
    it once its queue is longer than recomputing the prefix elsewhere (replication).
    KV demand after admission is the larger of the engine's last (stale) report and the
    ledger's tokens in flight, plus this request's uncached prompt and output budget.

    The simulator supplies ``clock`` (simulated seconds) and ``prefill_tokens_per_s``
    (from its step model); a live router passes ``time.monotonic`` and the replica's
    measured or modelled prefill speed. The estimate assumes the first replica of the
    ranking is the one used.
    """

    name = "kvpilot"
    uses_prefix = True

    def __init__(self, seed: int = 0, load_weight: float = 1.0, kv_high: float = 0.9,
                 kv_penalty_tokens: float = 1e6, block_tokens: int = BLOCK_TOKENS,
                 prefill_tokens_per_s: float = 6900.0, prefill_efficiency: float = 0.7,
                 clock: Callable[[], float] | None = None):
        super().__init__(seed)
        if prefill_tokens_per_s <= 0 or not 0 < prefill_efficiency <= 1:
            raise ValueError(f"kvpilot: prefill_tokens_per_s ({prefill_tokens_per_s}) must be > 0 and "
                             f"prefill_efficiency ({prefill_efficiency}) in (0, 1]")
        self.load_weight = load_weight
        self.kv_high = kv_high
        self.kv_penalty_tokens = kv_penalty_tokens
        self.block_tokens = block_tokens
        self.drain_rate = prefill_tokens_per_s * prefill_efficiency  # tokens of queued prefill per second
        if clock is None:
            import time

            clock = time.monotonic
        self.clock = clock
        self._owed: dict[str, float] = {}  # replica -> uncached prompt tokens queued for prefill
        self._seen: dict[str, float] = {}  # replica -> when _owed was last drained
        self._mine: dict[str, int] = {}  # replica -> ledger tokens (prompt + budget) this policy routed there

    def rank(self, req, replicas):
        now = self.clock()
        prompt, bt = req.prompt_tokens, self.block_tokens
        owed_of, seen, mine_of, drain = self._owed, self._seen, self._mine, self.drain_rate
        kv_high, lw, rand = self.kv_high, self.load_weight, self.rng.random
        scored = []
        for r in replicas:
            rid, tif = r.replica_id, r.tokens_in_flight
            # prefill this policy queued there, drained since it last looked; bounded by the ledger
            owed = owed_of.get(rid, 0.0)
            if owed:
                owed -= drain * (now - seen[rid])
                owed = owed_of[rid] = 0.0 if owed <= 0 or not r.requests_in_flight else min(owed, tif)
            seen[rid] = now
            mine = mine_of.get(rid, 0)
            if mine > tif:  # requests finished: the ledger is the truth
                mine = mine_of[rid] = tif
            uncached = prompt - min(prompt - 1, r.cached_blocks * bt) if r.cached_blocks else prompt
            c = uncached + owed + lw * (tif - mine)
            cap = r.kv_capacity_tokens
            if cap:
                after = max(r.kv_cache_usage, tif / cap) + (uncached + req.max_tokens) / cap
                if after > kv_high:
                    c += self.kv_penalty_tokens * (after - kv_high)
            scored.append((c, r.requests_in_flight, rand(), rid, uncached))
        scored.sort()
        _, _, _, rid, uncached = scored[0]
        owed_of[rid] = owed_of.get(rid, 0.0) + uncached
        mine_of[rid] = mine_of.get(rid, 0) + prompt + req.max_tokens
        return [s[3] for s in scored]


POLICIES: dict[str, type[Policy]] = {
    p.name: p for p in (RoundRobin, PowerOfTwo, LeastKV, PrefixAffinity, LlmD, Dynamo, SGLang, KVPilot)
}
DEFAULT_POLICY = "kvpilot"


def make_policy(name: str, params: dict[str, Any] | None = None, seed: int = 0) -> Policy:
    """Build a registered policy; unknown names and parameters are refused with the valid choices."""
    if name not in POLICIES:
        raise ValueError(f"{name!r} is not a routing policy; choose one of {', '.join(POLICIES)}")
    cls = POLICIES[name]
    params = dict(params or {})
    import inspect

    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "seed")]
    for key in params:
        if key not in accepted:
            raise ValueError(f"{key!r} is not a parameter of policy {name!r}; it takes {', '.join(accepted) or 'none'}")
    return cls(seed=seed, **params)


@dataclass
class Ledger:
    """The router's own account of what it sent each replica and has not seen finish."""

    requests: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)

    def sent(self, replica_id: str, tokens: int) -> None:
        self.requests[replica_id] = self.requests.get(replica_id, 0) + 1
        self.tokens[replica_id] = self.tokens.get(replica_id, 0) + tokens

    def finished(self, replica_id: str, tokens: int) -> None:
        if replica_id in self.requests:
            self.requests[replica_id] = max(0, self.requests[replica_id] - 1)
            self.tokens[replica_id] = max(0, self.tokens[replica_id] - tokens)

    def forget(self, replica_id: str) -> None:
        self.requests.pop(replica_id, None)
        self.tokens.pop(replica_id, None)
