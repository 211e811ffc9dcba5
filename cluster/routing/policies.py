"""Replica scoring: pure functions over snapshots, shared by the live router and the simulator.

A policy ranks the candidate replicas of one model for one request. It sees a
``ReplicaLoad`` per replica (what this router sent and has not seen finish, the
engine's last reported KV use and queues, and how much of this request's
prompt the replica has cached) and returns replica ids, best first.

Baselines follow the published behaviour of their systems (their sources and docs, named in
each class's docstring; docs/routing.md compares them); ``kvpilot`` is ours and the default.
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cluster.planning.hardware import GPU_BLOCK_SIZE as BLOCK_TOKENS  # vLLM's GPU KV block: prefix reuse happens in whole blocks

# kvpilot's prefill speed for a replica that has not measured its own (the simulator's H100 figure
# for Llama-2-70B TP=2): what a replica reports (cluster.serving.calibration) replaces it.
PLAN_PREFILL_TOKENS_PER_S = 6900.0


@dataclass(frozen=True)
class RoutingRequest:
    prompt_tokens: int
    max_tokens: int  # the decode budget the request asked for (tokens it may still add to KV)
    block_hashes: tuple[int, ...] = ()  # chained hashes of the prompt's full blocks
    adapter: str | None = None  # the LoRA adapter the request runs with (None: the base model)


@dataclass(frozen=True, slots=True)
class LoraRequestsInfo:
    """A replica's last ``vllm:lora_requests_info``: adapters with requests running / waiting, and its slots.

    What vLLM exports per engine (labels ``running_lora_adapters``, ``waiting_lora_adapters``,
    ``max_lora``) and what llm-d's and AIBrix's LoRA routing read; the simulator reports it.
    """

    running: frozenset[str] = frozenset()
    waiting: frozenset[str] = frozenset()
    max_lora: int = 0


@dataclass(slots=True)
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
    has_adapter: bool = False  # the request's LoRA adapter is loaded there (report or ledger); False without one
    lora_info: LoraRequestsInfo | None = None  # the replica's last LoRA report (None: none)


@dataclass(slots=True)
class Candidates:
    """The same snapshot as a list of ``ReplicaLoad``, in columns: entry i of each describes ``replica_id[i]``.

    What the simulator and the live router build per decision (``candidates``): a
    few list comprehensions instead of an object per replica. Policies read it and
    keep no reference to it.
    """

    replica_id: Sequence[str]
    requests_in_flight: Sequence[int]
    tokens_in_flight: Sequence[int]
    kv_cache_usage: Sequence[float]
    num_running: Sequence[int]
    num_waiting: Sequence[int]
    kv_capacity_tokens: Sequence[int]
    cached_blocks: Sequence[int]
    index_blocks: Sequence[int]
    has_adapter: Sequence[bool]
    lora_info: Sequence[LoraRequestsInfo | None]

    @classmethod
    def of(cls, replicas: Sequence[ReplicaLoad]) -> Candidates:
        return cls(*([getattr(r, f) for r in replicas] for f in _LOAD_FIELDS))

    def rows(self) -> list[ReplicaLoad]:
        return [ReplicaLoad(*row) for row in zip(*(getattr(self, f) for f in _LOAD_FIELDS))]

    def __len__(self) -> int:
        return len(self.replica_id)


_LOAD_FIELDS = tuple(ReplicaLoad.__dataclass_fields__)


class PrefixIndex:
    """Which replica holds which prompt blocks, approximately, in bounded memory.

    One LRU of chained block hashes per replica, each capped at that replica's
    KV capacity in blocks (vLLM evicts its least recently used free blocks the
    same way), and all together capped at ``max_blocks`` entries. Beside the
    LRUs, one dict maps each block hash to a bitmask of the replicas holding
    it (a bit per replica), so the match of every replica comes from a few
    dict lookups (``match_all``) instead of a walk per replica.

    A request's blocks are recorded last block first, so within a replica an
    earlier block of a chain is always at least as recent as a later one and is
    evicted after it (vLLM frees a request's tail blocks first, too). Hashes are
    chained (a block's hash fixes its whole prefix), so the blocks of a prompt a
    replica holds are always a leading run, and the match is found by binary
    search over the prompt's blocks.

    Memory, measured in CPython 3.11: about 200 bytes per entry (one replica
    holding one block: its LRU entry and key, and the hash's bitmask entry)
    when no two replicas share a block, about 140 when all 64 share them (one
    bitmask per distinct hash); at most ``max_blocks`` entries, so the default
    bound (1M blocks) is at most about 200 MB. A replica that dies is forgotten
    at once (``remove_replica``, O(its blocks)).
    """

    def __init__(self, max_blocks: int = 1_000_000, block_tokens: int = BLOCK_TOKENS):
        self.max_blocks = max_blocks
        self.block_tokens = block_tokens
        self._lru: dict[str, OrderedDict[int, None]] = {}
        self._cap: dict[str, int] = {}
        self._total = 0
        self._holders: dict[int, int] = {}  # block hash -> bitmask of the replicas holding it
        self._bit: dict[str, int] = {}  # replica -> its bit (1 << slot)
        self._slots: list[str | None] = []  # slot -> replica (None: free)
        self._decoded: dict[int, tuple[str, ...]] = {}  # memo: bitmask -> replicas, cleared when slots change

    def _replica(self, replica_id: str) -> OrderedDict[int, None]:
        lru = self._lru.get(replica_id)
        if lru is None:
            lru = self._lru[replica_id] = OrderedDict()
            try:
                slot = self._slots.index(None)
                self._slots[slot] = replica_id
            except ValueError:
                slot = len(self._slots)
                self._slots.append(replica_id)
            self._bit[replica_id] = 1 << slot
            self._decoded.clear()
        return lru

    def set_capacity(self, replica_id: str, capacity_blocks: int) -> None:
        self._cap[replica_id] = max(1, capacity_blocks)
        self._replica(replica_id)
        self._evict(replica_id)

    def match(self, replica_id: str, block_hashes: Sequence[int]) -> int:
        """Leading blocks of ``block_hashes`` the replica holds (chained hashes: the first miss ends it)."""
        bit = self._bit.get(replica_id)
        n = len(block_hashes)
        if bit is None or not n:
            return 0
        get = self._holders.get
        if not get(block_hashes[0], 0) & bit:
            return 0
        if get(block_hashes[-1], 0) & bit:
            return n
        lo, hi = 0, n - 1  # held at lo, not at hi
        while hi - lo > 1:
            mid = (lo + hi) >> 1
            if get(block_hashes[mid], 0) & bit:
                lo = mid
            else:
                hi = mid
        return hi

    def match_all(self, block_hashes: Sequence[int]) -> dict[str, int]:
        """``match`` of every replica at once, only those with a match: {replica: leading blocks held}.

        O(k log n) dict lookups for a prompt of n blocks whose matches take k distinct lengths.
        """
        n = len(block_hashes)
        if not n:
            return {}
        get = self._holders.get
        cur = get(block_hashes[0], 0)
        if not cur:
            return {}
        out: dict[str, int] = {}
        decoded = self._decoded
        lo = 0  # every replica of cur holds blocks 0..lo
        while cur:
            if get(block_hashes[-1], 0) & cur == cur:
                end, nxt = n, 0
            else:
                hi = n - 1  # not every replica of cur holds block hi
                while hi - lo > 1:
                    mid = (lo + hi) >> 1
                    if get(block_hashes[mid], 0) & cur == cur:
                        lo = mid
                    else:
                        hi = mid
                end, nxt = hi, get(block_hashes[hi], 0) & cur
            gone = cur ^ nxt  # the replicas whose match ends at block `end`
            ids = decoded.get(gone)
            if ids is None:
                ids = decoded[gone] = self._decode(gone)
            if len(ids) == 1:
                out[ids[0]] = end
            else:
                out.update(dict.fromkeys(ids, end))
            cur, lo = nxt, end
        return out

    def _decode(self, mask: int) -> tuple[str, ...]:
        if len(self._decoded) > 4096:
            self._decoded.clear()
        slots, ids = self._slots, []
        while mask:
            low = mask & -mask
            ids.append(slots[low.bit_length() - 1])
            mask ^= low
        return tuple(ids)

    def insert(self, replica_id: str, block_hashes: Iterable[int]) -> None:
        """Record that the replica now holds these blocks (one prompt's chain, in prompt order)."""
        lru = self._replica(replica_id)
        bit = self._bit[replica_id]
        holders = self._holders
        if not isinstance(block_hashes, Sequence):
            block_hashes = list(block_hashes)
        added = 0
        for h in reversed(block_hashes):  # last block first: the head of a chain ends most recent
            if h in lru:
                lru.move_to_end(h)
            else:
                lru[h] = None
                holders[h] = holders.get(h, 0) | bit
                added += 1
        self._total += added
        self._evict(replica_id)

    def size(self, replica_id: str) -> int:
        return len(self._lru.get(replica_id, ()))

    def sizes(self, replica_ids: Iterable[str]) -> list[int]:
        """``size`` of each replica, in order."""
        lrus = self._lru
        try:
            return list(map(len, map(lrus.__getitem__, replica_ids)))
        except KeyError:
            return [len(lrus[r]) if r in lrus else 0 for r in replica_ids]

    def remove_replica(self, replica_id: str) -> None:
        lru = self._lru.pop(replica_id, None)
        self._cap.pop(replica_id, None)
        if lru is None:
            return
        self._total -= len(lru)
        bit = self._bit.pop(replica_id)
        keep, holders = ~bit, self._holders
        for h in lru:
            m = holders[h] & keep
            if m:
                holders[h] = m
            else:
                del holders[h]
        self._slots[bit.bit_length() - 1] = None
        self._decoded.clear()

    def replicas(self) -> list[str]:
        return list(self._lru)

    def __len__(self) -> int:
        return self._total

    def _pop_oldest(self, replica_id: str, lru: OrderedDict[int, None]) -> None:
        h, _ = lru.popitem(last=False)
        m = self._holders[h] & ~self._bit[replica_id]
        if m:
            self._holders[h] = m
        else:
            del self._holders[h]
        self._total -= 1

    def _evict(self, replica_id: str) -> None:
        lru = self._lru[replica_id]
        cap = self._cap.get(replica_id)
        while cap is not None and len(lru) > cap:
            self._pop_oldest(replica_id, lru)
        while self._total > self.max_blocks:
            # Over the global bound: trim the largest replica's oldest entries.
            victim = max(self._lru, key=lambda r: len(self._lru[r]))
            self._pop_oldest(victim, self._lru[victim])


def block_hashes(token_ids: Sequence[int], block_tokens: int = BLOCK_TOKENS, parent: int = 0) -> tuple[int, ...]:
    """Chained hashes of the full blocks of a token sequence, as vLLM's prefix cache keys them."""
    out = []
    append, h = out.append, parent
    for block in zip(*[iter(token_ids)] * block_tokens):  # the full blocks, as tuples, sliced in C
        h = hash((h, block))
        append(h)
    return tuple(out)


def candidates(replica_ids: Sequence[str], ledger: Ledger, kv_cache_usage: Sequence[float],
               num_running: Sequence[int], num_waiting: Sequence[int], kv_capacity_tokens: int | Sequence[int],
               index: PrefixIndex | None = None, block_hashes: Sequence[int] = (),
               index_blocks: bool = True, has_adapter: Sequence[bool] | None = None,
               lora_info: Sequence[LoraRequestsInfo | None] | None = None) -> Candidates:
    """The snapshot a policy ranks: the ledger's and the prefix index's columns beside the engines' last reports.

    ``index`` None (a policy that does not use the prefix index): no cached or index blocks;
    ``index_blocks`` False (``Policy.uses_index_blocks``): index blocks left 0, sparing a column.
    ``has_adapter`` (per replica: the request's LoRA adapter is resident there) None: all False;
    ``lora_info`` (per replica: its last ``LoraRequestsInfo``) None: all None.
    """
    n = len(replica_ids)
    zeros = [0] * n
    caps = [kv_capacity_tokens] * n if isinstance(kv_capacity_tokens, int) else kv_capacity_tokens
    if index is None:
        cached = sizes = zeros
    else:
        m = index.match_all(block_hashes) if block_hashes else None
        cached = list(map(m.get, replica_ids, zeros)) if m else zeros
        sizes = index.sizes(replica_ids) if index_blocks else zeros
    return Candidates(replica_ids, list(map(ledger.requests.get, replica_ids, zeros)),
                      list(map(ledger.tokens.get, replica_ids, zeros)), kv_cache_usage, num_running, num_waiting,
                      caps, cached, sizes, [False] * n if has_adapter is None else has_adapter,
                      [None] * n if lora_info is None else lora_info)


class AdapterLedger:
    """Which LoRA adapters each replica holds: its last report, plus what was routed there since.

    A replica reports the adapters in its engine's cache with its routing stats (seconds
    apart); a request routed there with an adapter loads it, so it counts as held for
    ``ttl_s`` after routing even before the next report says so.
    """

    def __init__(self, ttl_s: float = 5.0, clock: Callable[[], float] | None = None):
        self.ttl_s = ttl_s
        self.clock = clock or time.monotonic
        self._reported: dict[str, frozenset[str]] = {}
        self._routed: dict[str, dict[str, float]] = {}  # replica -> adapter -> when last routed there

    def report(self, replica_id: str, adapters: Iterable[str]) -> None:
        self._reported[replica_id] = frozenset(adapters)

    def routed(self, replica_id: str, adapter: str | None) -> None:
        if adapter is not None:
            self._routed.setdefault(replica_id, {})[adapter] = self.clock()

    def resident(self, replica_id: str, adapter: str | None) -> bool:
        if adapter is None:
            return False
        if adapter in self._reported.get(replica_id, ()):
            return True
        when = self._routed.get(replica_id, {}).get(adapter)
        return when is not None and self.clock() - when <= self.ttl_s

    def column(self, replica_ids: Sequence[str], adapter: str | None) -> list[bool]:
        """``resident`` of each replica, in order (all False without an adapter)."""
        if adapter is None:
            return [False] * len(replica_ids)
        return [self.resident(r, adapter) for r in replica_ids]

    def forget(self, replica_id: str) -> None:
        self._reported.pop(replica_id, None)
        self._routed.pop(replica_id, None)


# --- policies ------------------------------------------------------------


class Policy:
    """Ranks replicas for a request. Subclasses are registered by ``name``; params are keyword arguments.

    Ranking changes no account, so a caller may rank one request twice (Serve does, after a
    backoff) and send it to any replica of the ranking (Serve falls back to the next one when
    the first is full); its only side effect is drawing random tie-breaks from ``rng``. A
    policy's own account changes in two hooks, which the live router, the simulator and the
    tests call the same way: ``on_routed`` once, on the replica the request actually went to,
    and ``on_finished`` when it ends there (or the replica is gone).
    """

    name = ""
    uses_prefix = False  # whether the router should maintain the prefix index for it
    uses_index_blocks = False  # whether it reads ReplicaLoad.index_blocks (else the snapshot leaves them 0)

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)

    def rank(self, req: RoutingRequest, replicas: Sequence[ReplicaLoad]) -> list[str]:
        raise NotImplementedError

    def rank_columns(self, req: RoutingRequest, cands: Candidates) -> list[str]:
        """``rank`` over the snapshot in columns (what the simulator and the live router call)."""
        return self.rank(req, cands.rows())

    def on_routed(self, req: RoutingRequest, replica_id: str, cached_blocks: int = 0) -> None:
        """The request went to ``replica_id``, which held its first ``cached_blocks`` blocks (prefix index)."""

    def on_finished(self, req: RoutingRequest, replica_id: str) -> None:
        """The request routed to ``replica_id`` ended there (finished, failed, or the replica is gone)."""


def _by(replicas: Sequence[ReplicaLoad], key: Callable[[ReplicaLoad], Any]) -> list[str]:
    return [r.replica_id for r in sorted(replicas, key=key)]


class RoundRobin(Policy):
    name = "round_robin"

    def __init__(self, seed: int = 0):
        super().__init__(seed)
        self._routed = 0  # requests routed so far: the next one starts the rotation there

    def rank(self, req, replicas):
        ids = sorted(r.replica_id for r in replicas)
        i = self._routed % len(ids)
        return ids[i:] + ids[:i]

    def on_routed(self, req, replica_id, cached_blocks=0):
        self._routed += 1


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
    uses_index_blocks = True

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
    """kvpilot: send the request where its first token is expected soonest, counting the requests its prefill
    delays, without overflowing KV.

    Per replica, in prompt tokens (tokens / ``prefill_tokens_per_s`` = seconds):

        cost = prefill owed there             (a virtual FIFO queue, see below)
             + uncached prompt tokens         (this request's own prefill there: its prompt minus
               × (1 + requests queued there)   the leading blocks the prefix index says are cached;
                                               see *queued* below for the factor)
             + load_weight × unaccounted tokens in flight
             + kv_penalty_tokens × the part of this request's KV (uncached prompt + budget) that
                                  lands past kv_high, as a fraction of capacity (see *KV* below)
             + adapter_load_tokens            (a LoRA request on a replica that does not hold its
                                               adapter: the load delays its first token like a prefill)
             + adapter_wait_s × drain rate    (a LoRA request on a replica whose ``max_loras`` slots are
                                               all taken by other adapters it has in flight: vLLM
                                               will not batch it until one of them drains)
             + answer_s / max_num_seqs × drain rate × requests to finish before this one starts
                                              (the replica's batch is full: requests in flight there
                                               at or beyond its ``max_num_seqs`` slots)

    *Prefill owed* is this policy's own account: ``on_routed`` adds a request's uncached
    tokens to the queue of the replica it went to, and each queue drains at the replica's
    effective prefill speed (``prefill_tokens_per_s × prefill_efficiency``: attention
    and the decodes batched into each step take the rest of it) as ``clock`` advances.
    Unlike tokens in flight, it forgets a request once its prefill is done, so a
    replica busy decoding long prompts is not mistaken for one with a queue, and a
    replica that just took a 30k-token prompt is (its engine still reports an empty
    waiting queue while the prompt is being chunked through). It never exceeds the
    tokens this policy has in flight there (``on_finished`` takes them back), and a
    replica with none owes nothing.

    *Unaccounted tokens in flight* are ledger tokens this policy did not route (another
    router's, or all of them for a fresh policy): treated as queued work, at ``load_weight``.

    *Requests queued there* is the prefill owed there in requests (owed tokens over the mean
    uncached prompt this policy has routed). A prefill delays not only its own request but the
    later ones that queue behind it, and a queue in steady state holds about as many requests as
    arrive during one wait (Little's law), so the uncached tokens count once for this request
    and once per request queued there. An idle replica (nothing owed) charges them once, as a
    plain TTFT estimate would; where every replica has a queue (overload) recomputing a prefix
    elsewhere costs the whole cluster capacity it lacks, and cache reuse wins over balance.

    *KV*: the KV in use on a replica is the larger of the engine's last (stale) report and this
    policy's account, which counts each request it routed there as its uncached prompt plus its
    budget (cached blocks are shared, not new), plus the unaccounted ledger tokens. Only the part
    of this request's own KV past ``kv_high`` is charged: a replica it would push past the line
    costs the crossing part, and among replicas already past it the fullest is not avoided for
    being fuller (all of them queue it for KV alike) but the request that adds less KV there
    (a cached prefix) is preferred.

    The prefix term makes cache reuse worth at least the prefill it saves, so reuse wins
    among comparable queues, and a replica that holds a popular prefix stops attracting
    it once its queue is longer than recomputing the prefix on an idle replica (replication).

    So a replica holding the request's adapter wins among comparable loads, and a hot adapter
    spreads to more replicas once its holders' queues exceed the others' by more than a load
    (no herding). The load is also queued as owed prefill on the replica that takes it
    (``adapters``: the router's ``AdapterLedger``, consulted before it records the request).

    The slot term is a capacity, like KV: vLLM's scheduler admits a request only while the
    running batch holds fewer than ``max_loras`` distinct adapters or already holds its own, so
    a replica whose slots are all taken makes it wait until every request of one adapter there
    has finished (about one answer's decode: seconds; ``adapter_wait_s``, an estimate, not a
    measurement). This policy counts the adapters it has in flight per replica itself (fresh,
    unlike the engines' reports); ``max_loras`` 0 (unknown) leaves the term out.

    The batch term is the same kind of capacity for the engine's slots: beyond ``max_num_seqs``
    requests, a new one waits in the engine's queue until enough running ones finish, each
    batch slot freeing about every ``answer_s / max_num_seqs`` (``answer_s``: about one answer's
    decode, an estimate). Without it, a replica holding a hot prefix or adapter would take every
    request of a burst while its queue grew (herding). The count is this policy's ledger of
    requests in flight (fresh); ``max_num_seqs`` 0 (unknown; the simulator's default, so its
    published tables predate the term) leaves it out.

    ``prefill_tokens_per_s`` is an override: set, it is every replica's speed. Unset, each
    replica's is what it measured of its own engine (``set_prefill_rate``, fed by the live
    router from the replica's stats, ``cluster.serving.calibration``), and ``PLAN_PREFILL_TOKENS_PER_S``
    until it has. The simulator supplies ``clock`` (simulated seconds) and
    ``prefill_tokens_per_s`` (from its step model); a live router passes ``time.monotonic``.
    """

    name = "kvpilot"
    uses_prefix = True

    def __init__(self, seed: int = 0, load_weight: float = 1.0, kv_high: float = 0.9,
                 kv_penalty_tokens: float = 1e6, block_tokens: int = BLOCK_TOKENS,
                 prefill_tokens_per_s: float | None = None, prefill_efficiency: float = 0.7,
                 clock: Callable[[], float] | None = None, adapter_load_tokens: float = 512.0,
                 max_loras: int = 0, adapter_wait_s: float = 10.0, max_num_seqs: int = 0, answer_s: float = 10.0):
        super().__init__(seed)
        if min(adapter_load_tokens, max_loras, adapter_wait_s, max_num_seqs, answer_s) < 0:
            raise ValueError(f"kvpilot: adapter_load_tokens ({adapter_load_tokens}), max_loras ({max_loras}), "
                             f"adapter_wait_s ({adapter_wait_s}), max_num_seqs ({max_num_seqs}) and answer_s "
                             f"({answer_s}) must be >= 0")
        self.max_num_seqs, self.answer_s = max_num_seqs, answer_s
        self.adapter_load_tokens = adapter_load_tokens
        self.max_loras = max_loras
        self.adapter_wait_s = adapter_wait_s
        self._lora_inflight: dict[str, dict[str, int]] = {}  # replica -> adapter -> its requests this policy has there
        self.adapters: AdapterLedger | None = None  # set by the router: which replicas hold which adapters
        self.prefill_override = prefill_tokens_per_s
        if prefill_tokens_per_s is None:
            prefill_tokens_per_s = PLAN_PREFILL_TOKENS_PER_S
        if prefill_tokens_per_s <= 0 or not 0 < prefill_efficiency <= 1:
            raise ValueError(f"kvpilot: prefill_tokens_per_s ({prefill_tokens_per_s}) must be > 0 and "
                             f"prefill_efficiency ({prefill_efficiency}) in (0, 1]")
        self.load_weight = load_weight
        self.kv_high = kv_high
        self.kv_penalty_tokens = kv_penalty_tokens
        self.block_tokens = block_tokens
        self.prefill_efficiency = prefill_efficiency
        self.drain_rate = prefill_tokens_per_s * prefill_efficiency  # tokens of queued prefill per second
        self._drain: dict[str, float] = {}  # replica -> its own drain rate, from its measured prefill speed
        self.clock = clock or time.monotonic
        self._empty_at: dict[str, float] = {}  # replica -> when the prefill this policy queued there is done
        self._mine: dict[str, int] = {}  # replica -> tokens (prompt + budget) this policy has in flight there
        self._kv: dict[str, int] = {}  # replica -> KV those requests add there (uncached prompt + budget)
        self._kv_of: dict[str, dict[tuple[int, int], list[int]]] = {}  # replica -> (prompt, budget) -> KV each added
        self._prefilled, self._prefills = 0, 0  # uncached tokens routed, requests routed: their mean sizes a queue

    def rank(self, req, replicas):
        return self.rank_columns(req, Candidates.of(replicas))

    def rank_columns(self, req, cands):
        """Replica ids, cheapest first, by the cost of the class docstring."""
        ids = cands.replica_id
        mine = [self._mine.get(rid, 0) for rid in ids]  # tokens this policy has in flight on each
        owed = self._owed(ids, mine, self.clock())
        uncached = self._uncached(req.prompt_tokens, cands.cached_blocks)
        # The mean uncached prompt routed, at least a token: requests without a prompt (handle calls) or
        # fully cached ones add nothing to prefill, and the queue is counted in requests of this size.
        per_request = max(1.0, self._prefilled / self._prefills) if self._prefills else 1.0
        kv_may_pass = self._kv_may_pass(req, cands)
        lw, kv, kv_high, budget, penalty = self.load_weight, self._kv, self.kv_high, req.max_tokens, self.kv_penalty_tokens
        cost = []
        for rid, queue, prefill, tokens, my_tokens, usage, cap in zip(
                ids, owed, uncached, cands.tokens_in_flight, mine, cands.kv_cache_usage, cands.kv_capacity_tokens):
            other = tokens - my_tokens if tokens > my_tokens else 0  # ledger tokens this policy did not route
            # queue / per_request: the requests queued there, whom this prefill would delay too
            c = queue + prefill * (1 + queue / per_request) + lw * other
            if kv_may_pass and cap:
                reported, accounted = usage * cap, kv.get(rid, 0) + other
                adds = prefill + budget  # the KV this request adds there
                past = (reported if reported > accounted else accounted) + adds - kv_high * cap  # past kv_high
                if past > 0:  # only this request's own part past the line
                    c += penalty * (past if past < adds else adds) / cap
            cost.append(c)
        if req.adapter is not None:
            self._add_adapter_cost(cost, req.adapter, ids, cands.has_adapter)
        if self.max_num_seqs:
            self._add_batch_wait(cost, ids, cands.requests_in_flight)
        return self._ordered(cost, cands.requests_in_flight, ids)

    def _add_batch_wait(self, cost: list[float], ids: Sequence[str], in_flight: Sequence[int]) -> None:
        """Where the batch is full, the wait for enough running requests to finish before this one starts."""
        per_slot_s = self.answer_s / self.max_num_seqs
        for i, rid in enumerate(ids):
            ahead = in_flight[i] - self.max_num_seqs + 1  # completions needed before this request runs
            if ahead > 0:
                cost[i] += ahead * per_slot_s * self._drain.get(rid, self.drain_rate)

    def _add_adapter_cost(self, cost: list[float], adapter: str, ids: Sequence[str], held: Sequence[bool]) -> None:
        """The adapter's load where it is not resident, and the wait for a slot where all are taken by others."""
        inflight = self._lora_inflight
        load = self.adapter_load_tokens
        for i, rid in enumerate(ids):
            mine = inflight.get(rid)
            if mine and adapter in mine:
                continue  # batched with its own kind there: resident, and no slot to wait for
            if load and not held[i]:
                cost[i] += load
            if self.max_loras:
                free = self.max_loras - len(mine or ())
                wait = self.adapter_wait_s * self._drain.get(rid, self.drain_rate)
                cost[i] += wait if free <= 0 else wait / (free + 1)

    def set_prefill_rate(self, replica_id: str, tokens_per_s: float | None) -> tuple[float, str]:
        """The replica's measured prefill speed (None: not measured, or gone); returns (speed used, its source)."""
        if self.prefill_override is not None:
            self._drain.pop(replica_id, None)
            return self.prefill_override, "override"
        if tokens_per_s is None or not tokens_per_s > 0:
            self._drain.pop(replica_id, None)
            return PLAN_PREFILL_TOKENS_PER_S, "plan"
        self._drain[replica_id] = tokens_per_s * self.prefill_efficiency
        return tokens_per_s, "measured"

    def on_routed(self, req, replica_id, cached_blocks=0):
        now, mine = self.clock(), self._mine.get(replica_id, 0)
        prefill = self._uncached(req.prompt_tokens, [cached_blocks])[0]
        self._prefilled += prefill
        self._prefills += 1
        kv = prefill + req.max_tokens
        self._kv[replica_id] = self._kv.get(replica_id, 0) + kv
        self._kv_of.setdefault(replica_id, {}).setdefault((req.prompt_tokens, req.max_tokens), []).append(kv)
        owed = self._owed([replica_id], [mine], now)[0] + prefill
        if req.adapter is not None and not (self.adapters is not None and self.adapters.resident(replica_id, req.adapter)):
            owed += self.adapter_load_tokens  # the replica loads the adapter before this prefill
        self._empty_at[replica_id] = now + owed / self._drain.get(replica_id, self.drain_rate)
        self._mine[replica_id] = mine + req.prompt_tokens + req.max_tokens
        if req.adapter is not None:
            held = self._lora_inflight.setdefault(replica_id, {})
            held[req.adapter] = held.get(req.adapter, 0) + 1

    def on_finished(self, req, replica_id):
        held = self._lora_inflight.get(replica_id)
        if req.adapter is not None and held and req.adapter in held:
            if held[req.adapter] > 1:
                held[req.adapter] -= 1
            else:
                del held[req.adapter]
        sizes, size = self._kv_of.get(replica_id, {}), (req.prompt_tokens, req.max_tokens)
        if size in sizes:  # one request of that size routed there: the KV it added goes
            self._kv[replica_id] -= sizes[size].pop()
            if not sizes[size]:
                del sizes[size]
        left = self._mine.get(replica_id, 0) - req.prompt_tokens - req.max_tokens
        if left > 0:
            self._mine[replica_id] = left
        else:  # nothing of this policy's left there: it owes nothing, and its entries go
            for account in (self._mine, self._empty_at, self._kv, self._kv_of):
                account.pop(replica_id, None)

    def _uncached(self, prompt: int, cached_blocks: Sequence[int]) -> list[int]:
        """Prompt tokens each replica must compute: all but its cached blocks, and always the last token."""
        if prompt <= 0 or not any(cached_blocks):
            return [prompt] * len(cached_blocks)
        bt = self.block_tokens
        return [prompt - cb * bt if cb * bt < prompt else 1 for cb in cached_blocks]

    def _owed(self, ids: Sequence[str], mine: Sequence[int], now: float) -> list[float]:
        """Prefill still queued on each replica (its queue drains until ``_empty_at``), at most ``mine``."""
        if not self._empty_at:
            return [0.0] * len(ids)
        empty_at = [self._empty_at.get(rid, now) for rid in ids]
        if self._drain:  # some replicas measured their own speed
            rates = [self._drain.get(rid, self.drain_rate) for rid in ids]
            queued = [d * (e - now) if e > now else 0.0 for d, e in zip(rates, empty_at)]
        else:
            drain = self.drain_rate
            queued = [drain * (e - now) if e > now else 0.0 for e in empty_at]
        return [q if q < m else m for q, m in zip(queued, mine)]

    def _kv_may_pass(self, req: RoutingRequest, cands: Candidates) -> bool:
        """Whether this request's KV could land past ``kv_high`` anywhere (capacity known), by a bound.

        The bound on every replica's use after admission (this policy's KV account is at most the
        ledger's tokens in flight): the fullest one's, this whole prompt and budget, the smallest cache.
        """
        caps = cands.kv_capacity_tokens
        smallest = min(caps, default=0)
        if not smallest:  # some capacity unknown (0): the smallest known one, if any
            smallest = min((c for c in caps if c), default=0)
            if not smallest:
                return False
        fullest = max(max(cands.kv_cache_usage), max(cands.tokens_in_flight) / smallest)
        return fullest + (req.prompt_tokens + req.max_tokens) / smallest > self.kv_high

    def _ordered(self, cost: list[float], in_flight: Sequence[int], ids: Sequence[str]) -> list[str]:
        """Replica ids by cost; equal costs by fewer requests in flight, then at random."""
        n = len(ids)
        if len(set(cost)) == n:
            order = sorted(range(n), key=cost.__getitem__)
        else:
            tie = [self.rng.random() for _ in range(n)]
            order = sorted(range(n), key=lambda i: (cost[i], in_flight[i], tie[i]))
        return [ids[i] for i in order]


POLICIES: dict[str, type[Policy]] = {
    p.name: p for p in (RoundRobin, PowerOfTwo, LeastKV, PrefixAffinity, LlmD, Dynamo, SGLang, KVPilot)
}
DEFAULT_POLICY = "kvpilot"


def make_policy(name: str, params: dict[str, Any] | None = None, seed: int = 0,
                block_tokens: int | None = None, registry: dict[str, type[Policy]] | None = None,
                engine: dict[str, int] | None = None) -> Policy:
    """Build a registered policy; unknown names and parameters are refused with the valid choices.

    ``block_tokens``: the block size the caller hashes prompts in (the plan's KV block: 16 on
    GPUs, 128 on CPUs). A policy that turns cached blocks into tokens gets it, so a cached
    block counts the tokens it holds; a ``params`` value that disagrees is refused.
    ``registry``: where to look the name up (default ``POLICIES``, the live router's; the
    simulator adds its simulator-only baselines).
    ``engine``: the model's engine limits (``max_num_seqs``, ``max_loras``): a policy that takes
    one gets it unless ``params`` sets it.
    """
    registry = POLICIES if registry is None else registry
    if name not in registry:
        raise ValueError(f"{name!r} is not a routing policy; choose one of {', '.join(registry)}")
    cls = registry[name]
    params = dict(params or {})
    import inspect

    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "seed")]
    for key in params:
        if key not in accepted:
            raise ValueError(f"{key!r} is not a parameter of policy {name!r}; it takes {', '.join(accepted) or 'none'}")
    if block_tokens is not None and "block_tokens" in accepted:
        if params.setdefault("block_tokens", block_tokens) != block_tokens:
            raise ValueError(f"block_tokens {params['block_tokens']!r} of policy {name!r} differs from the "
                             f"{block_tokens}-token blocks the router hashes prompts in")
    for key, value in (engine or {}).items():
        if key in accepted:
            params.setdefault(key, value)
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
