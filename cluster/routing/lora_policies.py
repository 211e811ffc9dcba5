"""The peers' LoRA-aware routing, as baselines for the simulator (``cluster.sim``); pure, like ``cluster.routing.policies``.

Both read what vLLM exports per engine as ``vllm:lora_requests_info`` (the adapters with
requests running, those with requests waiting, and ``max_lora``): the ``lora_info`` column
of the snapshot (``cluster.routing.policies.LoraRequestsInfo``), as stale as the engines' last report.
The live router does not collect that gauge, so these are simulator-only
(``SIM_LORA_POLICIES``, not ``cluster.routing.policies.POLICIES``). Written from the peers'
documented behaviour and published source, not copied:

``llmd_lora``
    llm-d's endpoint picker, in the Gateway API Inference Extension's default LoRA decision
    tree (kubernetes-sigs/gateway-api-inference-extension, ``pkg/epp/scheduling``: the
    ``low-queue``, ``lora-affinity``, ``least-queue`` and ``least-kv-cache`` filters, and its
    ``lora-affinity-scorer``, ``pkg/epp/scheduling/framework/plugins/scorer/lora_affinity.go``,
    which ranks the same way: adapter active 1.0, room for one more 0.8, adapter waiting 0.6,
    else 0). Replicas whose waiting queue is at most ``queue_threshold`` (128) pass the load
    filter; among them the LoRA filter keeps those with the adapter running or waiting
    (affinity) or, failing that, those with room for another adapter (running + waiting
    adapters < ``max_lora``), preferring affinity with probability ``affinity_threshold``
    (0.999); then the least-queue filter keeps the replicas whose queue lies in the lowest
    1/n of the range, the least-KV filter likewise, and one of those is picked at random. If no
    replica passes the load filter, least-queue comes first, then the LoRA filter, then KV.
    A filter that keeps nothing hands its input on unchanged (the decision tree's failure branch).
``aibrix_lora``
    AIBrix's gateway ``lora-affinity`` routing (vllm-project/aibrix,
    ``pkg/plugins/gateway/algorithms/lora_affinity.go``): the same two groups (affinity: the
    adapter running or waiting; available: room for another adapter), affinity chosen with
    probability 0.999 when both exist, then the replica with the fewest requests in flight in
    the chosen group (AIBrix's least-request pick); neither group: a replica at random. No load
    filter. (The published code reads ``max_lora`` from the waiting-adapters gauge, which
    leaves the available group empty; this baseline follows the documented intent instead.)

A request without an adapter (the base model) is not in any adapter list, so both peers treat
it as a request for an adapter nobody holds, as their code does. ``pow2`` (adapter-blind) is
``cluster.routing.policies.PowerOfTwo``.
"""

from __future__ import annotations

from collections.abc import Sequence

from cluster.routing.policies import POLICIES, Candidates, LoraRequestsInfo, Policy, ReplicaLoad

_NO_INFO = LoraRequestsInfo()


def _lora_groups(adapter: str | None, infos: Sequence[LoraRequestsInfo | None], idx: Sequence[int]
                 ) -> tuple[list[int], list[int]]:
    """(replicas with the adapter running or waiting, replicas with room for another adapter), as indices."""
    affinity, available = [], []
    for i in idx:
        info = infos[i] or _NO_INFO
        if adapter is not None and (adapter in info.running or adapter in info.waiting):
            affinity.append(i)
        elif len(info.running | info.waiting) < info.max_lora:
            available.append(i)
    return affinity, available


class LlmDLora(Policy):
    """llm-d / Gateway API Inference Extension: load filter, LoRA-affinity filter, least queue, least KV, random."""

    name = "llmd_lora"

    def __init__(self, seed: int = 0, queue_threshold: int = 128, affinity_threshold: float = 0.999):
        super().__init__(seed)
        self.queue_threshold = queue_threshold
        self.affinity_threshold = affinity_threshold

    def rank(self, req, replicas):
        return self.rank_columns(req, Candidates.of(replicas))

    def rank_columns(self, req, cands):
        waiting, kv = cands.num_waiting, cands.kv_cache_usage
        everyone = list(range(len(cands)))
        low = [i for i in everyone if waiting[i] <= self.queue_threshold]
        if low:
            picked = self._least(self._lora(req.adapter, cands.lora_info, low), waiting)
        else:
            picked = self._lora(req.adapter, cands.lora_info, self._least(everyone, waiting))
        picked = self._least(picked, kv)
        first = picked[self.rng.randrange(len(picked))]
        ids = cands.replica_id
        return [ids[first]] + [ids[i] for i in everyone if i != first]

    def _lora(self, adapter: str | None, infos: Sequence[LoraRequestsInfo | None], idx: list[int]) -> list[int]:
        affinity, available = _lora_groups(adapter, infos, idx)
        if affinity and available:
            return affinity if self.rng.random() < self.affinity_threshold else available
        return affinity or available or idx

    @staticmethod
    def _least(idx: list[int], values: Sequence[float]) -> list[int]:
        """The replicas whose value lies in the lowest 1/n of the range (GIE's least-queue / least-KV filters)."""
        lo, hi = min(values[i] for i in idx), max(values[i] for i in idx)
        return [i for i in idx if values[i] <= lo + (hi - lo) / len(idx)] or idx


class AIBrixLora(Policy):
    """AIBrix's lora-affinity routing: adapter holders (else replicas with room) by fewest requests in flight."""

    name = "aibrix_lora"

    def __init__(self, seed: int = 0, affinity_threshold: float = 0.999):
        super().__init__(seed)
        self.affinity_threshold = affinity_threshold

    def rank(self, req: object, replicas: Sequence[ReplicaLoad]) -> list[str]:
        return self.rank_columns(req, Candidates.of(replicas))

    def rank_columns(self, req, cands):
        everyone = list(range(len(cands)))
        affinity, available = _lora_groups(req.adapter, cands.lora_info, everyone)
        if affinity and available:
            group = affinity if self.rng.random() < self.affinity_threshold else available
        else:
            group = affinity or available
        in_flight = cands.requests_in_flight
        if group:
            first = min(group, key=lambda i: (in_flight[i], self.rng.random()))
        else:
            first = self.rng.randrange(len(everyone))
        ids = cands.replica_id
        return [ids[first]] + [ids[i] for i in everyone if i != first]


SIM_LORA_POLICIES: dict[str, type[Policy]] = {p.name: p for p in (LlmDLora, AIBrixLora)}
SIM_POLICIES: dict[str, type[Policy]] = {**POLICIES, **SIM_LORA_POLICIES}  # what the simulator can run
