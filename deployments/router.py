"""The live router: a Ray Serve ``RequestRouter`` that asks ``cluster.routing`` for every decision.

Selected per model through ``request_router_config`` (see
``cluster.placement.deployment_options``). It runs in the caller's process (the
ingress), so it sees every request this ingress sends to the model:

- its ``Ledger`` counts requests and tokens in flight per replica from
  ``on_request_routed`` to ``on_request_completed``, so a burst between two
  engine reports is not routed on a stale picture;
- its ``PrefixIndex`` records which prompt blocks went where, bounded, and
  forgets a replica the moment Serve reports it dead or gone;
- engine stats (KV use, running, waiting) come from each replica's
  ``record_routing_stats()``.
"""

from __future__ import annotations

import time
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from cluster import metrics as M
from cluster.routing import Candidates, Ledger, PrefixIndex, RoutingRequest, block_hashes, candidates, make_policy
from deployments.protocol import GenerationRequest
from deployments.telemetry import Recorder


class KVPilotRouter(RequestRouter):
    def initialize_state(
        self,
        model: str = "",
        policy: str = "kvpilot",
        params: dict[str, Any] | None = None,
        kv_capacity_tokens: int = 0,
        block_tokens: int = 16,
        max_index_blocks: int = 1_000_000,
        seed: int = 0,
    ) -> None:
        self._policy = make_policy(policy, params, seed)
        self._policy_name = policy
        self._rec = Recorder(model=model, policy=policy)
        self._block_tokens = block_tokens
        self._capacity = kv_capacity_tokens
        self._index = PrefixIndex(max_index_blocks, block_tokens)
        self._ledger = Ledger()
        self._inflight: dict[str, tuple[str, int]] = {}  # internal request id → (replica, tokens)
        self._pending: dict[str, RoutingRequest] = {}  # routing facts of requests being placed

    def _routing_request(self, pending: PendingRequest) -> RoutingRequest:
        rid = pending.metadata.internal_request_id
        req = self._pending.get(rid)
        if req is None:
            gen = next((a for a in pending.args if isinstance(a, GenerationRequest)), None)
            ids = gen.prompt_token_ids if gen is not None else []
            hashes = block_hashes(ids, self._block_tokens) if self._policy.uses_prefix else ()
            req = RoutingRequest(len(ids), (gen.max_tokens or 0) if gen is not None else 0, hashes)
            self._pending[rid] = req
        return req

    def _candidates(self, replicas: list[RunningReplica], req: RoutingRequest) -> Candidates:
        ids = [r.replica_id.unique_id for r in replicas]
        stats = [r.routing_stats or {} for r in replicas]
        return candidates(
            ids, self._ledger,
            kv_cache_usage=[float(s.get("kv_cache_usage", 0.0)) for s in stats],
            num_running=[int(s.get("num_running", 0)) for s in stats],
            num_waiting=[int(s.get("num_waiting", 0)) for s in stats],
            kv_capacity_tokens=self._capacity, index=self._index, block_hashes=req.block_hashes,
            index_blocks=self._policy.uses_index_blocks,
        )

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if pending_request is None:
            return [candidate_replicas]
        started = time.perf_counter()  # the decision's time includes hashing the prompt's blocks
        req = self._routing_request(pending_request)
        if len(candidate_replicas) <= 1:  # nothing to rank, but the time is still the router's
            self._rec.observe(M.ROUTER_DECISION_SECONDS, time.perf_counter() - started)
            return [candidate_replicas]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        ranked = self._policy.rank_columns(req, self._candidates(candidate_replicas, req))
        self._rec.observe(M.ROUTER_DECISION_SECONDS, time.perf_counter() - started)
        return [[by_id[uid]] for uid in ranked]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        rid = pending_request.metadata.internal_request_id
        req = self._routing_request(pending_request)
        del self._pending[rid]
        uid = replica_id.unique_id
        tokens = req.prompt_tokens + req.max_tokens
        self._ledger.sent(uid, tokens)
        self._inflight[rid] = (uid, tokens)
        if req.block_hashes:
            matched = self._index.match(uid, req.block_hashes)
            self._rec.observe(M.ROUTER_PREFIX_MATCH, matched / len(req.block_hashes))
            self._index.insert(uid, req.block_hashes)
        self._rec.inc(M.ROUTER_DECISIONS, 1, replica=uid)
        self._rec.set(M.ROUTER_TOKENS_IN_FLIGHT, self._ledger.tokens[uid], replica=uid)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._pending.pop(internal_request_id, None)
        entry = self._inflight.pop(internal_request_id, None)
        if entry is not None:
            self._ledger.finished(*entry)
            self._rec.set(M.ROUTER_TOKENS_IN_FLIGHT, self._ledger.tokens.get(entry[0], 0), replica=entry[0])

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        live = {r.replica_id.unique_id for r in replicas}
        for uid in set(self._index.replicas()) - live:
            self._forget(uid)
        if self._capacity:
            for uid in live:
                self._index.set_capacity(uid, self._capacity // self._block_tokens)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._forget(replica_id.unique_id)

    def _forget(self, uid: str) -> None:
        self._index.remove_replica(uid)
        self._ledger.forget(uid)
        for rid in [rid for rid, (u, _) in self._inflight.items() if u == uid]:
            del self._inflight[rid]
