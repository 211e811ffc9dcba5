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
    """kvpilot: estimated work each replica would have to do before this request's first token.

    cost = uncached prompt tokens (prefill this request still needs there)
         + load_weight × tokens in flight (the router's own, never stale, account of
           prefill and decode the replica owes to requests it already has)
         + a steep penalty when admitting the request would push the replica's KV
           cache past ``kv_high`` of its capacity (vLLM would preempt and recompute).

    Prefix reuse only counts while it is worth more than the queue it joins, so a
    shared system prompt does not pin every request to one replica.
    """

    name = "kvpilot"
    uses_prefix = True

    def __init__(self, seed: int = 0, load_weight: float = 1.0, kv_high: float = 0.9,
                 kv_penalty_tokens: float = 1e6, block_tokens: int = BLOCK_TOKENS):
        super().__init__(seed)
        self.load_weight = load_weight
        self.kv_high = kv_high
        self.kv_penalty_tokens = kv_penalty_tokens
        self.block_tokens = block_tokens

    def rank(self, req, replicas):
        def cost(r: ReplicaLoad) -> float:
            cached = min(req.prompt_tokens, r.cached_blocks * self.block_tokens)
            c = (req.prompt_tokens - cached) + self.load_weight * r.tokens_in_flight
            if r.kv_capacity_tokens:
                # Fresh estimate of KV demand: the larger of the engine's last report and our own account.
                after = max(r.kv_cache_usage, r.tokens_in_flight / r.kv_capacity_tokens)
                after += (req.prompt_tokens - cached + req.max_tokens) / r.kv_capacity_tokens
                if after > self.kv_high:
                    c += self.kv_penalty_tokens * (after - self.kv_high)
            return c

        return _by(replicas, lambda r: (cost(r), r.requests_in_flight, self.rng.random()))


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
