"""Memory- and compute-pressure autoscaling: how many replicas a model needs, and why.

An LLM replica runs out of one of two things: KV-cache memory, or decode compute
(every running sequence waits for every engine step, so the inter-token latency
grows with the load long before the KV cache is full). ``decide`` sizes a
deployment for the larger of the two needs.

Memory: the predicted KV demand fits under ``target_kv_usage`` of the replicas'
KV capacity (the planner's KV tokens)::

    demand    = KV tokens in use + tokens of the requests queued in engines and at the router
    predicted = demand + max(0, growth rate of the KV in use) × startup_s   (a new replica takes that long)
    by_kv     = ceil(predicted / (capacity × target_kv_usage))

Queued requests count as they stand, not extrapolated: a queue grows while the deployment is
short of replicas and drains once the new ones serve, so its growth over a start-up is not a
lasting need (projecting it asked for 24 replicas where 9 held a 3× burst, in the simulator).

Compute: the decode inter-token latency (ITL) is estimated from what replicas report,
Σ running sequences / Σ generated tokens per second over ``trend_window_s``. The
ITL floor (one sequence's ITL: ``itl_floor_s`` when set, else the replicas' own measurement,
``ReplicaSignals.itl_floor_s``, else the lowest windowed ITL seen)
is the engine's step cost with little load; the share of the step
time the load adds is the compute usage, which the policy keeps at
``target_compute_usage`` (an ITL of floor / (1 − usage): 3.3× the floor at the default 0.7)::

    usage      = 1 − ITL floor / ITL of a report         (per report in the window)
    busy       = Σ running × serving replicas × usage / Σ running   (replicas' worth of compute in use)
    by_compute = ceil(busy / target_compute_usage)

Each report's usage is weighted with its own replica count, so a window that spans a change of
count (more sequences per replica after a downscale) is not read as more load.

It also adds a replica under sustained pressure (KV usage above ``high_kv_usage``,
or requests waiting in the engines, averaged over the window, above
``high_waiting_per_replica``) for ``upscale_sustained_s``; removes replicas one at
a time only after both needs have fitted one replica fewer, without pressure,
for ``downscale_delay_s`` (a request that waits for one engine step does not count);
goes to zero after ``idle_to_zero_s`` without traffic when ``min_replicas`` is 0;
and starts one as soon as a request waits at zero. Every decision carries its reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from cluster.config import AutoscalingConfig

# Tokens assumed per queued request before any request has been seen running.
DEFAULT_TOKENS_PER_REQUEST = 1024


@dataclass(frozen=True)
class ReplicaSignals:
    """What one replica reports through ``record_autoscaling_stats``."""

    kv_cache_usage: float
    num_running: float
    num_waiting: float
    token_rate: float = 0.0  # prompt + generated tokens per second
    gpu_memory_used_ratio: float | None = None
    generation_rate: float | None = None  # generated (output) tokens per second; None: not reported
    # Measured by the replica from its own engine (cluster.serving.calibration); None: not measured yet.
    itl_floor_s: float | None = None  # decode step time at batch 1
    kv_capacity_tokens: float | None = None  # KV blocks x block size as the engine allocated them


@dataclass(frozen=True)
class ScalingInput:
    now_s: float
    current_replicas: int
    replicas: tuple[ReplicaSignals, ...]
    queued_requests: float  # held at the handles: no replica yet, or all busy
    kv_capacity_tokens: int  # per replica, from the planner
    min_replicas: int
    max_replicas: int
    # Replicas already asked for, starting ones included (Ray's ``target_num_replicas``); None: current_replicas.
    target_replicas: int | None = None


@dataclass(frozen=True)
class ScalerState:
    history: tuple[tuple[float, float], ...] = ()  # (time, KV tokens in use), within the trend window
    pressure_since: float | None = None
    low_since: float | None = None
    idle_since: float | None = None
    # (time, serving replicas, waiting per serving replica, Σ running, Σ generated tokens/s), within the trend window
    load: tuple[tuple[float, float, float, float, float], ...] = ()
    itl_floor_s: float | None = None  # lowest windowed inter-token latency seen: the step cost with little load

    @classmethod
    def from_dict(cls, d: dict) -> ScalerState:
        """The state ``dataclasses.asdict`` wrote, also after a round trip that made its tuples lists (JSON)."""
        return cls(**{k: _tuples(v) for k, v in d.items()})


def _tuples(v):
    return tuple(map(_tuples, v)) if isinstance(v, (list, tuple)) else v


@dataclass(frozen=True)
class Decision:
    desired: int
    kind: str  # a short, stable label: kv_demand, sustained_pressure, downscale, ...
    reason: str  # the sentence with the numbers
    kv_demand_ratio: float  # predicted demand over the current replicas' KV capacity
    signals: dict[str, float] = field(default_factory=dict)
    # Where each fact came from: "override" (config), "measured" (replicas), "plan", or "learned" (traffic).
    sources: dict[str, str] = field(default_factory=dict)


def decide(inp: ScalingInput, cfg: AutoscalingConfig, state: ScalerState) -> tuple[Decision, ScalerState]:
    """Desired replica count, its reason, and the state to carry to the next call.

    ``current_replicas`` counts the replicas that serve (and report); replicas still
    starting (``target_replicas`` above it) are kept unless a downscale removes one,
    and sustained pressure adds no replica while one is starting: what it asked for is
    on its way (without this, a "steady" answer of the serving count would cancel the
    replica a pressure decision had just started).
    """
    now, cur = inp.now_s, inp.current_replicas
    have = max(cur, inp.target_replicas if inp.target_replicas is not None else cur)
    kv = _kv_need(inp, cfg, state)
    compute = _compute_need(inp, cfg, state, kv, have)
    max_kv = max((r.kv_cache_usage for r in inp.replicas), default=0.0)
    pressure = _Pressure(
        busy=kv.running + kv.waiting + inp.queued_requests > 0 or any(r.token_rate > 0 for r in inp.replicas),
        max_kv=max_kv,
        kv_high=max_kv >= cfg.high_kv_usage,
        queueing=compute.waiting_avg >= cfg.high_waiting_per_replica,
    )
    st = ScalerState(
        history=kv.history,
        pressure_since=_since(state.pressure_since, now) if pressure.pressured else None,
        idle_since=None if pressure.busy else _since(state.idle_since, now),
        low_since=state.low_since,
        load=compute.load,
        itl_floor_s=compute.floor_s if compute.floor_source == "override" else compute.learned,
    )
    kind, desired, reason, updates = _rule(inp, cfg, state, st, have, kv, compute, pressure)
    bounded = min(max(desired, inp.min_replicas), inp.max_replicas)
    if bounded != desired:
        reason += f" (held to [{inp.min_replicas}, {inp.max_replicas}])"
    sources = {"itl_floor_s": compute.floor_source, "kv_capacity_tokens": kv.capacity_source}
    return Decision(bounded, kind, reason, kv.ratio, _signals(inp, kv, compute), sources), replace(st, **updates)


@dataclass(frozen=True)
class _KvNeed:
    """The memory side of a decision (see the module doc)."""

    capacity_source: str  # "measured" (every replica reported its own) or "plan"
    used: float  # KV tokens in use
    running: float
    waiting: float  # in the engines
    demand: float  # tokens: in use plus the queued requests'
    history: tuple[tuple[float, float], ...]  # (time, KV in use) within the trend window, now included
    slope: float  # growth of the KV in use, tokens per second
    predicted: float  # demand after a new replica's start-up
    by_kv: int  # replicas the predicted demand needs
    ratio: float  # predicted demand over the current replicas' capacity


def _kv_need(inp: ScalingInput, cfg: AutoscalingConfig, state: ScalerState) -> _KvNeed:
    now, cur = inp.now_s, inp.current_replicas
    caps = [r.kv_capacity_tokens for r in inp.replicas if r.kv_capacity_tokens]
    if caps and len(caps) == len(inp.replicas):  # every replica measured its own: use those
        cap = max(1, round(sum(caps) / len(caps)))
        used = sum(r.kv_cache_usage * r.kv_capacity_tokens for r in inp.replicas)
        cap_source = "measured"
    else:
        cap = max(1, inp.kv_capacity_tokens)
        used = sum(r.kv_cache_usage for r in inp.replicas) * cap
        cap_source = "plan"
    running = sum(r.num_running for r in inp.replicas)
    waiting = sum(r.num_waiting for r in inp.replicas)
    per_request = used / running if running else DEFAULT_TOKENS_PER_REQUEST
    demand = used + (waiting + inp.queued_requests) * per_request
    history = tuple((t, d) for t, d in state.history if now - t <= cfg.trend_window_s) + ((now, used),)
    slope = _slope(history)
    predicted = demand + max(0.0, slope) * cfg.startup_s
    by_kv = math.ceil(predicted / (cap * cfg.target_kv_usage)) if predicted > 0 else 0
    return _KvNeed(cap_source, used, running, waiting, demand, history, slope, predicted, by_kv,
                   ratio=predicted / (cap * max(1, cur)))


@dataclass(frozen=True)
class _ComputeNeed:
    """The compute side of a decision: windowed waiting and inter-token latency (see the module doc)."""

    load: tuple[tuple[float, float, float, float, float], ...]  # ScalerState.load, now included
    waiting_avg: float  # requests waiting per serving replica, over the window
    serving_avg: float  # serving replicas, over the window
    itl: float | None  # inter-token latency over the window; None: not judged
    learned: float | None  # the lowest windowed ITL seen
    floor_s: float | None  # the ITL floor in use
    floor_source: str  # "override", "measured" or "learned"
    usage: float
    busy: float  # replicas' worth of decode compute in use over the window
    by_compute: int  # replicas the compute in use needs
    floor_need: int  # what compute allows scaling down to (``have`` while the need is unknown)

    def text(self, cfg: AutoscalingConfig) -> str:
        if self.itl is None:
            return f"compute usage {self.usage:.0%}"
        return (f"compute usage {self.usage:.0%} (inter-token latency {self.itl * 1e3:,.0f} ms over "
                f"{cfg.trend_window_s:.0f} s, floor {self.floor_s * 1e3:,.0f} ms {self.floor_source})")


def _compute_need(inp: ScalingInput, cfg: AutoscalingConfig, state: ScalerState, kv: _KvNeed,
                  have: int) -> _ComputeNeed:
    now, cur = inp.now_s, inp.current_replicas
    gens = [r.generation_rate for r in inp.replicas if r.generation_rate is not None]
    reported = bool(inp.replicas) and len(gens) == len(inp.replicas)
    sample = (now, float(cur), (kv.waiting + inp.queued_requests) / max(1, cur), kv.running, sum(gens))
    load = tuple(x for x in state.load if now - x[0] <= cfg.trend_window_s) + ((sample,) if cur else ())
    waiting_avg = sum(x[2] for x in load) / len(load) if load else 0.0
    run_sum, gen_sum = sum(x[3] for x in load), sum(x[4] for x in load)
    serving_avg = sum(x[1] for x in load) / len(load) if load else float(cur)
    # Judge compute only on a window at least half full (the first seconds of traffic are prefills).
    known = reported and len(load) > 1 and now - load[0][0] >= cfg.trend_window_s / 2
    itl = run_sum / gen_sum if known and gen_sum > 0 and run_sum > 0 else None
    learned = state.itl_floor_s if itl is None else min(itl, state.itl_floor_s or itl)
    floor_s, floor_source = _itl_floor(inp, cfg, learned)
    if itl is not None and floor_s is not None:
        usage = max(0.0, 1.0 - floor_s / itl)
        busy = _busy_replicas(load, floor_s)
    elif known and run_sum > 0 and gen_sum == 0:
        usage, busy = 1.0, serving_avg  # sequences running and no token generated in the window: saturated
    else:
        usage = busy = 0.0
    by_compute = math.ceil(busy / cfg.target_compute_usage - 1e-9) if busy > 0 else 0
    # Without a judged window, the compute need is unknown: it neither adds replicas nor allows removing one.
    floor_need = by_compute if known or not reported else have
    return _ComputeNeed(load, waiting_avg, serving_avg, itl, learned, floor_s, floor_source, usage, busy,
                        by_compute, floor_need)


def _busy_replicas(load: tuple[tuple[float, float, float, float, float], ...], floor_s: float) -> float:
    """Replicas' worth of decode compute in use over the window: each sample's serving replicas × its
    usage (1 − floor / that sample's ITL), weighted by its running sequences. Unlike the window's usage ×
    its mean replica count, this does not overstate the need while the window spans a change of count
    (after a downscale each replica runs more sequences, so the window's ITL is mostly the new one's)."""
    running = sum(x[3] for x in load)
    return max(0.0, (sum(x[1] * x[3] for x in load) - floor_s * sum(x[1] * x[4] for x in load)) / running)


def _itl_floor(inp: ScalingInput, cfg: AutoscalingConfig, learned: float | None) -> tuple[float | None, str]:
    """The ITL floor and where it came from: the config's override, the replicas' measurement, or traffic."""
    measured = sorted(r.itl_floor_s for r in inp.replicas if r.itl_floor_s)
    if cfg.itl_floor_s is not None:
        return cfg.itl_floor_s, "override"
    if measured:  # the replicas' own step time at batch 1 (their median: one slow report moves nothing)
        return measured[len(measured) // 2], "measured"
    return learned, "learned"


def _signals(inp: ScalingInput, kv: _KvNeed, compute: _ComputeNeed) -> dict[str, float]:
    signals = {"kv_tokens_used": kv.used, "kv_demand_tokens": kv.demand, "kv_predicted_tokens": kv.predicted,
               "kv_growth_tokens_per_s": kv.slope, "waiting": kv.waiting, "queued": inp.queued_requests,
               "waiting_per_replica_avg": compute.waiting_avg, "compute_usage": compute.usage}
    if compute.itl is not None:
        signals["itl_s"] = compute.itl
    if compute.floor_s is not None:
        signals["itl_floor_s"] = compute.floor_s
    return signals


@dataclass(frozen=True)
class _Pressure:
    busy: bool  # anything running, waiting, queued or flowing
    max_kv: float  # the fullest replica's KV usage
    kv_high: bool
    queueing: bool

    @property
    def pressured(self) -> bool:
        return self.kv_high or self.queueing


def _rule(inp: ScalingInput, cfg: AutoscalingConfig, state: ScalerState, st: ScalerState, have: int,
          kv: _KvNeed, compute: _ComputeNeed, p: _Pressure) -> tuple[str, int, str, dict[str, float | None]]:
    """The first rule that applies: (kind, desired replicas before the bounds, reason, state updates)."""
    now, cur, by_kv, by_compute = inp.now_s, inp.current_replicas, kv.by_kv, compute.by_compute
    if cur == 0:
        if inp.queued_requests > 0 or p.busy:
            return ("scale_from_zero", max(1, by_kv), f"scale from zero: {inp.queued_requests:.0f} requests waiting",
                    {"low_since": None})
        return "idle_at_zero", 0, "idle at zero replicas", {}
    if by_kv > have and by_kv >= by_compute:
        return ("kv_demand", by_kv, f"KV demand {kv.predicted:,.0f} tokens (in use growing {kv.slope:,.0f}/s over a "
                f"{cfg.startup_s:.0f} s start-up) exceeds {cfg.target_kv_usage:.0%} of {cur} replicas' capacity",
                {"low_since": None})
    if by_compute > have:
        return ("compute_demand", by_compute, f"{compute.text(cfg)}: {compute.busy:.2f} replicas' worth of compute "
                f"in use, over the {cfg.target_compute_usage:.0%} target of {have}: {by_compute} replicas needed",
                {"low_since": None})
    if st.pressure_since is not None and now - st.pressure_since >= cfg.upscale_sustained_s:
        what = (f"max KV usage {p.max_kv:.0%}" if p.kv_high else "") + (", " if p.kv_high and p.queueing else "") + (
            f"{compute.waiting_avg:.1f} requests waiting per replica over {cfg.trend_window_s:.0f} s"
            if p.queueing else "")
        if have > cur:
            return ("pressure_starting", have, f"sustained pressure for {now - st.pressure_since:.0f} s ({what}); "
                    f"{have - cur} replica(s) already starting", {"low_since": None})
        return ("sustained_pressure", cur + 1, f"sustained pressure for {now - st.pressure_since:.0f} s: {what}",
                {"low_since": None, "pressure_since": now})
    if inp.min_replicas == 0 and st.idle_since is not None and now - st.idle_since >= cfg.idle_to_zero_s:
        return "scale_to_zero", 0, f"no traffic for {now - st.idle_since:.0f} s: scale to zero", {"low_since": None}
    floor = max(by_kv, compute.floor_need, 1)
    if floor < have and not p.pressured:
        low_since = state.low_since if state.low_since is not None else now
        why = (f"demand fits {floor} replica(s) at {cfg.target_kv_usage:.0%} KV and {cfg.target_compute_usage:.0%} "
               f"compute ({compute.text(cfg)}, {compute.waiting_avg:.2f} waiting per replica)")
        if now - low_since >= cfg.downscale_delay_s:
            return "downscale", have - 1, f"{why} for {now - low_since:.0f} s: remove one", {"low_since": now}
        return ("downscale_pending", have, f"{why}; waiting {cfg.downscale_delay_s - (now - low_since):.0f} s "
                "more before scaling down", {"low_since": low_since})
    if p.pressured:
        return ("steady", have, f"steady: pressure for {now - st.pressure_since:.0f} s, under the "
                f"{cfg.upscale_sustained_s:.0f} s sustain window", {"low_since": None})
    return "steady", have, f"steady: demand fits the current replicas ({compute.text(cfg)})", {"low_since": None}


def _since(start: float | None, now: float) -> float:
    return now if start is None else start


def _slope(history: tuple[tuple[float, float], ...]) -> float:
    """Least-squares growth rate of the KV in use, tokens per second."""
    if len(history) < 2:
        return 0.0
    n = len(history)
    mt = sum(t for t, _ in history) / n
    md = sum(d for _, d in history) / n
    var = sum((t - mt) ** 2 for t, _ in history)
    if var == 0:
        return 0.0
    return sum((t - mt) * (d - md) for t, d in history) / var
