"""The cluster loop: simulated vLLM replicas behind one router running a ``cluster.routing.policies`` policy.

Per request, at its arrival, the router builds its snapshot of the routable replicas
(``cluster.routing.policies.candidates``: a column per ``ReplicaLoad`` field) from

* its own ``Ledger`` (requests and prompt + output tokens sent and not yet seen
  finish; updated at send and at finish, never stale),
* engine stats (KV cache usage, running, waiting) that each replica reports
  every ``stats_period_s`` seconds, with its own random phase (Ray Serve's
  ``request_routing_stats_period_s``, 10 s by default; 0 means always fresh),
* the leading blocks of the prompt a router-side ``PrefixIndex`` believes each
  replica holds (the request's blocks are inserted on the chosen replica at
  routing time; capacity per replica = the planner's KV blocks),

and sends it to ``policy.rank_columns(...)[0]``, then calls the policy's ``on_routed`` on
that replica and its ``on_finished`` when the request ends, as the live router does.

``SimCluster.run`` advances time event by event. Each event has a named handler:

* an arrival (``_on_arrival``): route the request and submit it to its replica, ``serving_delay_s``
  after the client sent it (the serving path's per-request delay, from a measured profile:
  ``cluster.sim.profile``; 0 by default, when the simulator models the engine alone);
* a step end (``_on_step_end``): the engine's finished requests go back to the router;
  the next step is scheduled; a draining replica with nothing left stops;
* a stats report (``_on_stats_report``): a replica's engine stats (and adapters, with
  LoRA on) reach the router;
* a replica ready (``_on_replica_ready``): a started replica becomes routable;
* a periodic tick (``_on_tick``): the ``Periodic`` handler given to the cluster runs
  (autoscaling: ``cluster.sim.autoscale``), and may add or drain replicas
  (``add_replica``, ``cancel``, ``drain``).

Events at equal times run in the order of their kind (``STEP_END`` first), an arrival after
every event at its time. Replicas have integer ids (their index in ``replicas``); the router
knows them by ``name`` (``replica-<id>``), as the live router knows replicas by their ids.
"""

from __future__ import annotations

import heapq
import inspect
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from cluster.routing.policies import (AdapterLedger, Ledger, LoraRequestsInfo, PrefixIndex, RoutingRequest, candidates,
                             make_policy)
from cluster.routing.lora_policies import SIM_POLICIES
from cluster.sim.engine import Replica, SimRequest
from cluster.sim.host import HostContention
from cluster.sim.workload import BLOCK_TOKENS as HASH_BLOCK_TOKENS, TraceRequest

if TYPE_CHECKING:
    from cluster.sim.simulator import Setup

STEP_END, STATS_REPORT, REPLICA_READY, TICK = 0, 1, 2, 3  # event kinds; at equal times in this order
STARTING, READY, DRAINING, STOPPED = "starting", "ready", "draining", "stopped"
PROGRESS_EVERY = 256  # arrivals between progress callbacks


class ReplicaSlot:
    """One replica of the cluster: its engine, its life (requested, ready, stopped) and the router's view of it."""

    __slots__ = ("id", "name", "engine", "requested_s", "ready_s", "stopped_s", "state", "step_version",
                 "snapshot", "rate_since_s", "tokens_processed_then", "tokens_generated_then")

    def __init__(self, replica_id: int, engine: Replica, requested_s: float, ready_s: float):
        self.id, self.name, self.engine = replica_id, f"replica-{replica_id}", engine
        self.requested_s, self.ready_s, self.stopped_s = requested_s, ready_s, None
        self.state = STARTING
        self.step_version = 0  # bumped at every scheduled step end; an event of an older one is stale
        self.snapshot = (0.0, 0, 0)  # the last stats report: (KV usage, running, waiting)
        # token counters at the last autoscaler sample (rates are per second since then)
        self.rate_since_s, self.tokens_processed_then, self.tokens_generated_then = requested_s, 0, 0

    def in_flight(self, ledger: Ledger) -> int:
        return ledger.requests.get(self.name, 0)


class Periodic(Protocol):
    """A handler the cluster calls every ``period_s`` of simulated time from t = 0 (autoscaling), and at
    every change of the replica set the cluster makes itself (a replica ready, a drained one stopped)."""

    period_s: float

    def tick(self, cluster: SimCluster, now: float) -> None: ...

    def changed(self, cluster: SimCluster, now: float) -> None: ...


class SimCluster:
    """Replicas behind one router, run by ``run`` over a list of trace requests."""

    def __init__(self, setup: Setup, policy_name: str, policy_params: dict | None = None,
                 periodic: Periodic | None = None):
        self.setup = setup
        # The policies' clock: the time of the latest arrival, when the router acts. A finish or an
        # adapter report between two arrivals is stamped with the earlier arrival's time.
        self.router_clock_s = 0.0
        self.policy = make_policy(policy_name, injected_params(policy_name, policy_params, setup, self._clock),
                                  seed=setup.seed, block_tokens=HASH_BLOCK_TOKENS, registry=SIM_POLICIES)
        self.index = PrefixIndex() if self.policy.uses_prefix else None
        self.ledger = Ledger()
        self.lora = _LoraReports(setup, self.policy, self._clock) if setup.lora is not None else None
        self.periodic = periodic
        self.stats_period_s = setup.stats_period_s
        self.kv_capacity_tokens = setup.num_blocks * setup.plan.block_size
        self.phase_rng = random.Random(setup.seed)  # each replica's stats-report phase
        self.replicas: list[ReplicaSlot] = []
        self.routable: list[ReplicaSlot] = []
        self.by_name: dict[str, ReplicaSlot] = {}
        self.events: list[tuple[float, int, int, int]] = []  # (time, kind, replica id or -1, step version)
        self.requests: list[SimRequest] = []
        self.decision_us: list[float] = []
        self.outstanding = 0
        self.kv_peak = 0.0
        self.now = 0.0
        self.host = (HostContention(setup.host, lambda: [slot.engine for slot in self.replicas])
                     if setup.host is not None else None)
        if periodic is not None:
            heapq.heappush(self.events, (0.0, TICK, -1, 0))

    def _clock(self) -> float:
        return self.router_clock_s

    # --- the loop -----------------------------------------------------------

    def run(self, trace: list[TraceRequest], progress: Callable[[int], None] | None = None) -> None:
        """Replay ``trace`` (sorted by arrival) until every request has finished."""
        total, arrived, never = len(trace), 0, float("inf")
        delay = self.setup.serving_delay_s  # the router sees a request this much after its client sent it
        while arrived < total or self.outstanding:
            next_arrival_s = trace[arrived].arrival_s + delay if arrived < total else never
            if self.events and self.events[0][0] <= next_arrival_s:
                self._on_event(*heapq.heappop(self.events))
                continue
            self._on_arrival(trace[arrived])
            arrived += 1
            if progress is not None and arrived % PROGRESS_EVERY == 0:
                progress(arrived)
        if progress is not None:
            progress(total)
        self.kv_peak = max(self.kv_peak, *(slot.engine.usage() for slot in self.replicas))

    def _on_event(self, time_s: float, kind: int, replica_id: int, version: int) -> None:
        self.now = time_s
        if kind == TICK:
            self._on_tick(time_s)
            return
        slot = self.replicas[replica_id]
        if kind == REPLICA_READY:
            self._on_replica_ready(slot, time_s)
        elif kind == STATS_REPORT:
            self._on_stats_report(slot, time_s)
        elif version == slot.step_version:
            self._on_step_end(slot, time_s)

    # --- handlers -----------------------------------------------------------

    def _on_arrival(self, trace_request: TraceRequest) -> None:
        # The request's own arrival stays the client's (its TTFT and latency count the serving path).
        self.now = self.router_clock_s = trace_request.arrival_s + self.setup.serving_delay_s
        hashes = trace_request.block_hashes()  # once per request, outside the timed decision
        started = time.perf_counter()
        usage, running, waiting = self._engine_columns()
        lora = () if self.lora is None else (self.lora.ledger, self.lora.infos(self.routable, self.stats_period_s <= 0))
        choice, request = route(self.policy, trace_request, hashes, [slot.name for slot in self.routable], usage,
                                running, waiting, self.ledger, self.index, self.kv_capacity_tokens, *lora)
        self.decision_us.append((time.perf_counter() - started) * 1e6)
        self.requests.append(request)
        self.outstanding += 1
        slot = self.by_name[choice]
        if slot.engine.submit(request, self.now):
            self._schedule_step_end(slot)

    def _engine_columns(self) -> tuple:
        """KV usage, running and waiting of the routable replicas: their last reports, or now with no period."""
        if self.stats_period_s > 0:
            return tuple(zip(*(slot.snapshot for slot in self.routable)))
        engines = [slot.engine for slot in self.routable]
        return ([e.usage() for e in engines], [len(e.running) for e in engines], [len(e.waiting) for e in engines])

    def _on_step_end(self, slot: ReplicaSlot, now: float) -> None:
        engine = slot.engine
        for request in engine.end_step(now):
            finished(self.policy, self.ledger, slot.name, request)
            self.outstanding -= 1
        if engine.busy:
            self._schedule_step_end(slot)
        elif slot.state == DRAINING and slot.in_flight(self.ledger) == 0:
            self._stop(slot, now)
            self._changed(now)

    def _on_stats_report(self, slot: ReplicaSlot, now: float) -> None:
        if slot.state != READY:  # a draining replica takes no requests: the router stops reading it
            return
        engine = slot.engine
        usage = engine.usage()
        self.kv_peak = max(self.kv_peak, usage)
        slot.snapshot = (usage, len(engine.running), len(engine.waiting))
        if self.lora is not None:
            self.lora.report(slot)
        heapq.heappush(self.events, (now + self.stats_period_s, STATS_REPORT, slot.id, 0))

    def _on_replica_ready(self, slot: ReplicaSlot, now: float) -> None:
        if slot.state == STARTING:  # not cancelled meanwhile
            self._make_ready(slot, now)
            self._changed(now)

    def _on_tick(self, now: float) -> None:
        self.periodic.tick(self, now)
        heapq.heappush(self.events, (now + self.periodic.period_s, TICK, -1, 0))

    # --- the replica set ----------------------------------------------------

    def add_replica(self, now: float, ready_s: float) -> ReplicaSlot:
        """A new replica, requested at ``now``, routable from ``ready_s`` (at once if that is not later)."""
        setup = self.setup
        engine = Replica(len(self.replicas), num_blocks=setup.num_blocks, model=setup.step,
                         block_size=setup.plan.block_size, max_num_batched_tokens=setup.max_num_batched_tokens,
                         max_num_seqs=setup.max_num_seqs, lora=setup.lora)
        if self.host is not None:
            engine.slowdown = self.host.slowdown
        slot = ReplicaSlot(len(self.replicas), engine, now, ready_s)
        self.replicas.append(slot)
        self.by_name[slot.name] = slot
        if self.index is not None:
            self.index.set_capacity(slot.name, setup.num_blocks)
        if ready_s <= now:
            self._make_ready(slot, now)
        else:
            heapq.heappush(self.events, (ready_s, REPLICA_READY, slot.id, 0))
        return slot

    def _make_ready(self, slot: ReplicaSlot, now: float) -> None:
        slot.state = READY
        slot.rate_since_s = now
        slot.tokens_processed_then, slot.tokens_generated_then = (slot.engine.tokens_processed,
                                                                  slot.engine.tokens_generated)
        slot.snapshot = (0.0, 0, 0)
        self.routable.append(slot)
        if self.stats_period_s > 0:
            phase = self.phase_rng.uniform(0, self.stats_period_s)
            heapq.heappush(self.events, (now + phase, STATS_REPORT, slot.id, 0))

    def starting(self) -> list[ReplicaSlot]:
        return [slot for slot in self.replicas if slot.state == STARTING]

    def cancel(self, slot: ReplicaSlot, now: float) -> None:
        """Stop a replica that is not routable yet."""
        self._stop(slot, now)

    def drain(self, slot: ReplicaSlot, now: float) -> None:
        """Stop routing to ``slot``; it stops once what it holds has finished."""
        self.routable.remove(slot)
        if slot.in_flight(self.ledger) == 0:
            self._stop(slot, now)
        else:
            slot.state = DRAINING

    def _stop(self, slot: ReplicaSlot, now: float) -> None:
        slot.state, slot.stopped_s = STOPPED, now

    def _changed(self, now: float) -> None:
        if self.periodic is not None:
            self.periodic.changed(self, now)

    def _schedule_step_end(self, slot: ReplicaSlot) -> None:
        slot.step_version += 1
        heapq.heappush(self.events, (slot.engine.t_end, STEP_END, slot.id, slot.step_version))


def injected_params(name: str, params: dict | None, setup: Setup, clock: Callable[[], float]) -> dict:
    """Parameters the simulator supplies to a policy that asks for them in its constructor.

    ``clock``: the simulated time (a live router passes ``time.monotonic``);
    ``prefill_tokens_per_s``: the replica's prefill speed from the step model (``StepModel.prefill_tokens_per_s``);
    ``max_loras``: the replicas' adapter slots, with LoRA on (a live router reads the model's
    ``lora.max_loras``). Values the caller gave win.
    """
    accepted = inspect.signature(SIM_POLICIES[name].__init__).parameters if name in SIM_POLICIES else {}
    out = dict(params or {})
    if "clock" in accepted:
        out.setdefault("clock", clock)
    if "prefill_tokens_per_s" in accepted:
        out.setdefault("prefill_tokens_per_s", setup.step.prefill_tokens_per_s())
    if "max_loras" in accepted and setup.lora is not None:
        out.setdefault("max_loras", setup.lora.max_loras)
    return out


def route(policy, trace_request: TraceRequest, hashes: tuple[int, ...], names: list[str], usage, running, waiting,
          ledger: Ledger, index: PrefixIndex | None, kv_capacity_tokens: int, adapters: AdapterLedger | None = None,
          lora_info: list[LoraRequestsInfo] | None = None) -> tuple[str, SimRequest]:
    """One routing decision, as the live router makes it: the candidates' column snapshot (engine
    reports beside the router's ledger and prefix index), the policy's first choice, then the
    router's own accounting of what it sent. ``index`` None: the policy does not use prefixes.
    ``adapters`` / ``lora_info`` (LoRA on): the router's adapter ledger and the engines' last
    LoRA reports; the ledger records the request after the policy's hook, as the live router's."""
    tr = trace_request
    adapter = tr.adapter
    request = RoutingRequest(prompt_tokens=tr.prompt_tokens, max_tokens=tr.output_tokens, block_hashes=hashes,
                             adapter=adapter)
    held = adapters.column(names, adapter) if adapters is not None and adapter is not None else None
    columns = candidates(names, ledger, usage, running, waiting, kv_capacity_tokens, index, hashes,
                         policy.uses_index_blocks, has_adapter=held, lora_info=lora_info)
    choice = policy.rank_columns(request, columns)[0]
    policy.on_routed(request, choice, columns.cached_blocks[names.index(choice)])
    if adapters is not None:
        adapters.routed(choice, adapter)
    ledger.sent(choice, tr.prompt_tokens + tr.output_tokens)
    if index is not None:
        index.insert(choice, hashes)
    return choice, SimRequest(tr.index, tr.arrival_s, tr.prompt_tokens, tr.output_tokens, hashes, adapter)


def finished(policy, ledger: Ledger, name: str, request: SimRequest) -> None:
    """A request ended on replica ``name``: the router's ledger and the policy's hook, as the live router does."""
    ledger.finished(name, request.routing_tokens)
    policy.on_finished(RoutingRequest(prompt_tokens=request.prompt, max_tokens=request.target,
                                      adapter=request.adapter), name)


class _LoraReports:
    """What the replicas tell the router about adapters, every stats period, as the live replicas do.

    The adapters each engine holds go to the router's ``AdapterLedger`` (the policy's, like the
    live router's ``adapters``); the engines' ``vllm:lora_requests_info`` goes to the snapshot's
    ``lora_info`` column, which the peers' LoRA policies read.
    """

    def __init__(self, setup: Setup, policy, clock: Callable[[], float]):
        self.ledger = AdapterLedger(clock=clock)
        if hasattr(policy, "adapters"):
            policy.adapters = self.ledger
        self._empty = LoraRequestsInfo(max_lora=setup.lora.max_loras)
        self._info: dict[int, LoraRequestsInfo] = {}

    def report(self, slot: ReplicaSlot) -> None:
        self.ledger.report(slot.name, slot.engine.resident_adapters())
        self._info[slot.id] = slot.engine.lora_requests_info()

    def infos(self, routable: list[ReplicaSlot], fresh: bool) -> list[LoraRequestsInfo]:
        """The last reports of ``routable`` (``fresh``: the engines' state now, for a stats period of 0)."""
        if fresh:
            for slot in routable:
                self.report(slot)
        return [self._info.get(slot.id, self._empty) for slot in routable]
