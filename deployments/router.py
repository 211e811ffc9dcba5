"""The live router: a Ray Serve ``RequestRouter`` that asks ``cluster.routing.policies`` for every decision.

Selected per model through ``request_router_config`` (see
``cluster.serving.placement.deployment_options``). It runs in the caller's process (the
ingress), so it sees every request this ingress sends to the model:

- ``choose_replicas`` only ranks (the policy's ranking changes no account), so Serve
  may call it again after a backoff and use any replica of the ranking;
- ``on_request_routed`` charges the replica Serve actually used, once: the router's
  ``Ledger`` (requests and tokens in flight per replica, so a burst between two engine
  reports is not routed on a stale picture), its ``PrefixIndex`` (which prompt blocks
  went where, bounded) and the policy's ``on_routed``;
- ``on_request_completed`` gives it back (``Ledger.finished``, the policy's
  ``on_finished``), and so does a replica that Serve reports dead or gone, whose
  blocks the index forgets at once;
- engine stats (KV use, running, waiting) come from each replica's
  ``record_routing_stats()``, and so do the facts the replica measured of its engine
  (``cluster.serving.calibration``: KV capacity, prefill speed): used when present, the plan's
  otherwise (or the policy's override), with a log line whenever a replica's source
  changes and the speed in use in ``kvpilot_router_prefill_tokens_per_second{source}``.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from cluster import metrics
from cluster.planning.hardware import GPU_BLOCK_SIZE
from cluster.routing.policies import (
    AdapterLedger, Candidates, Ledger, PrefixIndex, RoutingRequest, block_hashes, candidates, make_policy,
)
from cluster.serving.calibration import KV_CAPACITY_KEY, PREFILL_KEY, SourceLog
from deployments.telemetry import Recorder

# Requests whose routing facts are kept between Serve's calls (choose_replicas, again after a
# backoff, then on_request_routed): one that is cancelled before it is routed is never told to
# the router, so the oldest entries go beyond this many (re-hashed if Serve asks again).
MAX_PLACING = 4096
CHOSEN_TTL_S = 10.0  # Serve routes a ranked request within milliseconds (and re-ranks after a backoff)

logger = logging.getLogger("kvpilot.router")


def _routing_facts(args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[Sequence[int], int]:
    """(prompt token ids, max_tokens) of the request: the first argument that has both attributes.

    The router needs nothing else of the request object, so any object the ingress passes
    to the replica will do; none found: an empty prompt and no decode budget.
    """
    for arg in (*args, *kwargs.values()):
        if hasattr(arg, "prompt_token_ids") and hasattr(arg, "max_tokens"):
            return arg.prompt_token_ids or (), arg.max_tokens or 0
    return (), 0


def _adapter_of(args: Sequence[Any], kwargs: dict[str, Any]) -> str | None:
    """The LoRA adapter the request names (``HttpCall.adapter``); None: the base model."""
    for arg in (*args, *kwargs.values()):
        if hasattr(arg, "prompt_token_ids") and hasattr(arg, "max_tokens"):
            return getattr(arg, "adapter", None)
    return None


class KVPilotRouter(RequestRouter):
    def initialize_state(
        self,
        model: str = "",
        policy: str = "kvpilot",
        params: dict[str, Any] | None = None,
        kv_capacity_tokens: int = 0,
        block_tokens: int = GPU_BLOCK_SIZE,  # the plan's block size comes with the deployment options
        max_index_blocks: int = 1_000_000,
        seed: int = 0,
        engine: dict[str, int] | None = None,
    ) -> None:
        self._policy = make_policy(policy, params, seed, block_tokens=block_tokens, engine=engine)
        self._policy_name = policy
        self._rec = Recorder(model=model, policy=policy)
        self._block_tokens = block_tokens
        self._capacity = kv_capacity_tokens
        self._index = PrefixIndex(max_index_blocks, block_tokens)
        self._ledger = Ledger()
        self._adapters = AdapterLedger()  # which replicas hold which LoRA adapters (reports + routing)
        if hasattr(self._policy, "adapters"):
            self._policy.adapters = self._adapters
        self._inflight: dict[str, tuple[str, RoutingRequest]] = {}  # internal request id → (replica, request)
        self._placing: OrderedDict[str, RoutingRequest] = OrderedDict()  # routing facts, hashed once per request
        # Ranked but not yet routed: Serve ranks a burst's requests before any is acknowledged
        # (on_request_routed comes after the replica accepts), so each counts where it was ranked first.
        self._chosen: OrderedDict[str, tuple[str, float]] = OrderedDict()  # request id → (replica ranked first, when)
        self._model = model
        self._facts: dict[str, tuple[Any, Any]] = {}  # replica -> (prefill speed, KV capacity) it last reported
        self._caps: dict[str, int] = {}  # replica -> its measured KV capacity in tokens
        self._sources = SourceLog()

    def _routing_request(self, pending: PendingRequest) -> RoutingRequest:
        rid = pending.metadata.internal_request_id
        req = self._placing.get(rid)
        if req is None:
            ids, max_tokens = _routing_facts(pending.args, pending.kwargs or {})
            hashes = block_hashes(ids, self._block_tokens) if self._policy.uses_prefix else ()
            adapter = _adapter_of(pending.args, pending.kwargs or {})
            req = self._placing[rid] = RoutingRequest(len(ids), max_tokens, hashes, adapter)
            if len(self._placing) > MAX_PLACING:
                self._placing.popitem(last=False)
        return req

    def _with_chosen(self, rid: str) -> Ledger:
        """The ledger plus the requests ranked but not yet routed (other than ``rid``) where they were ranked first.

        Requests only, not tokens: a policy counts a request's prefill itself once it is routed
        (``on_routed``); tokens here would be "someone else's" load to it and double its weight
        (seen: the live prefix test recomputed 8 of 48 documents instead of 0).
        """
        if not self._chosen:
            return self._ledger
        requests = dict(self._ledger.requests)
        recent = time.monotonic() - CHOSEN_TTL_S  # a request cancelled before it was routed stops counting
        for other, (uid, when) in self._chosen.items():
            if other != rid and when > recent and other in self._placing:
                requests[uid] = requests.get(uid, 0) + 1
        return Ledger(requests, self._ledger.tokens)

    def _candidates(self, replicas: list[RunningReplica], req: RoutingRequest, rid: str = "") -> Candidates:
        ids = [r.replica_id.unique_id for r in replicas]
        stats = [r.routing_stats or {} for r in replicas]
        facts = self._facts
        for uid, s in zip(ids, stats):
            reported = (s.get(PREFILL_KEY), s.get(KV_CAPACITY_KEY))
            if facts.get(uid) != reported:
                self._calibrate(uid, *reported)
            if "adapters" in s:
                self._adapters.report(uid, s["adapters"])
        caps = self._capacity if not self._caps else [self._caps.get(uid, self._capacity) for uid in ids]
        return candidates(
            ids, self._with_chosen(rid),
            kv_cache_usage=[float(s.get("kv_cache_usage", 0.0)) for s in stats],
            num_running=[int(s.get("num_running", 0)) for s in stats],
            num_waiting=[int(s.get("num_waiting", 0)) for s in stats],
            kv_capacity_tokens=caps, index=self._index, block_hashes=req.block_hashes,
            index_blocks=self._policy.uses_index_blocks, has_adapter=self._adapters.column(ids, req.adapter),
        )

    def _calibrate(self, uid: str, prefill: Any, capacity: Any) -> None:
        """A replica reported new measurements: use them (or the plan's where absent), and say so when the source changes."""
        self._facts[uid] = (prefill, capacity)
        if capacity:
            self._caps[uid] = int(capacity)
            self._index.set_capacity(uid, int(capacity) // self._block_tokens)
        else:
            self._caps.pop(uid, None)
        cap_source = "measured" if capacity else "plan"
        if self._sources.changed(f"{uid}/kv", cap_source):
            logger.info("router %s: replica %s KV capacity %s tokens (%s)", self._model, uid,
                        f"{int(capacity or self._capacity):,}", cap_source)
        setter = getattr(self._policy, "set_prefill_rate", None)
        if setter is None:
            return
        used, source = setter(uid, None if prefill is None else float(prefill))
        self._rec.set(metrics.ROUTER_PREFILL_RATE, used, replica=uid, source=source)
        if self._sources.changed(f"{uid}/prefill", source):
            logger.info("router %s: replica %s prefill speed %s tokens/s (%s)", self._model, uid, f"{used:,.0f}", source)

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if pending_request is None:
            return [candidate_replicas]
        started = time.perf_counter()  # the decision's time includes hashing the prompt's blocks
        req = self._routing_request(pending_request)
        rid = pending_request.metadata.internal_request_id
        if len(candidate_replicas) <= 1:  # nothing to rank, but the time is still the router's
            self._rec.observe(metrics.ROUTER_DECISION_SECONDS, time.perf_counter() - started)
            return [candidate_replicas]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        ranked = self._policy.rank_columns(req, self._candidates(candidate_replicas, req, rid))
        self._rec.observe(metrics.ROUTER_DECISION_SECONDS, time.perf_counter() - started)
        self._chosen[rid] = (ranked[0], time.monotonic())
        if len(self._chosen) > MAX_PLACING:
            self._chosen.popitem(last=False)
        return [[by_id[uid]] for uid in ranked]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        rid = pending_request.metadata.internal_request_id
        req = self._routing_request(pending_request)
        self._placing.pop(rid, None)
        self._chosen.pop(rid, None)
        if rid in self._inflight:  # routed again under the same id: the earlier placement is over
            self._release(rid)
        uid = replica_id.unique_id
        matched = self._index.match(uid, req.block_hashes) if req.block_hashes else 0
        self._policy.on_routed(req, uid, matched)  # before the adapter ledger: a load it needed counts there
        self._adapters.routed(uid, req.adapter)
        self._ledger.sent(uid, req.prompt_tokens + req.max_tokens)
        self._inflight[rid] = (uid, req)
        if req.block_hashes:
            self._rec.observe(metrics.ROUTER_PREFIX_MATCH, matched / len(req.block_hashes))
            self._index.insert(uid, req.block_hashes)
        self._rec.inc(metrics.ROUTER_DECISIONS, 1, replica=uid)
        self._rec.set(metrics.ROUTER_TOKENS_IN_FLIGHT, self._ledger.tokens[uid], replica=uid)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._placing.pop(internal_request_id, None)
        self._chosen.pop(internal_request_id, None)
        uid = self._release(internal_request_id)
        if uid is not None:
            self._rec.set(metrics.ROUTER_TOKENS_IN_FLIGHT, self._ledger.tokens.get(uid, 0), replica=uid)

    def _release(self, rid: str) -> str | None:
        """Give back what a routed request was charged (ledger and policy); its replica, None if unknown."""
        entry = self._inflight.pop(rid, None)
        if entry is None:
            return None
        uid, req = entry
        self._ledger.finished(uid, req.prompt_tokens + req.max_tokens)
        self._policy.on_finished(req, uid)
        return uid

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        live = {r.replica_id.unique_id for r in replicas}
        for uid in (set(self._index.replicas()) | set(self._ledger.requests)) - live:
            self._forget(uid)
        for uid in live:
            cap = self._caps.get(uid, self._capacity)
            if cap:
                self._index.set_capacity(uid, cap // self._block_tokens)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._forget(replica_id.unique_id)

    def _forget(self, uid: str) -> None:
        for rid in [rid for rid, (u, _) in self._inflight.items() if u == uid]:
            self._release(rid)
        self._index.remove_replica(uid)
        self._ledger.forget(uid)
        self._adapters.forget(uid)
        self._facts.pop(uid, None)
        self._caps.pop(uid, None)
        self._sources.forget(f"{uid}/kv")
        self._sources.forget(f"{uid}/prefill")
        setter = getattr(self._policy, "set_prefill_rate", None)
        if setter is not None:
            setter(uid, None)
