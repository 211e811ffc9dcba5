"""Memory- and compute-pressure autoscaling: how many replicas a model needs, and why.

An LLM replica runs out of one of two things: KV-cache memory, or decode compute
(every running sequence waits for every engine step, so the inter-token latency
grows with the load long before the KV cache is full). ``decide`` sizes a
deployment for the larger of the two needs.

Memory: the predicted KV demand fits under ``target_kv_usage`` of the replicas'
KV capacity (the planner's KV tokens)::

    demand    = KV tokens in use + tokens of the requests queued in engines and at the router
    predicted = demand + max(0, its growth rate) × startup_s   (a new replica takes that long)
    by_kv     = ceil(predicted / (capacity × target_kv_usage))

Compute: the decode inter-token latency (ITL) is estimated from what replicas report,
Σ running sequences / Σ generated tokens per second over ``trend_window_s``. The
ITL floor (one sequence's ITL: ``itl_floor_s`` when set, else the replicas' own measurement,
``ReplicaSignals.itl_floor_s``, else the lowest windowed ITL seen)
is the engine's step cost with little load; the share of the step
time the load adds is the compute usage, which the policy keeps at
``target_compute_usage`` (an ITL of floor / (1 − usage): 3.3× the floor at the default 0.7)::

    usage      = 1 − ITL floor / ITL over the window
    by_compute = ceil(usage × mean serving replicas over the window / target_compute_usage)

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
    # Measured by the replica from its own engine (cluster.calibration); None: not measured yet.
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
    history: tuple[tuple[float, float], ...] = ()  # (time, KV demand in tokens), within the trend window
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
    history = tuple((t, d) for t, d in state.history if now - t <= cfg.trend_window_s) + ((now, demand),)
    slope = _slope(history)
    predicted = demand + max(0.0, slope) * cfg.startup_s
    by_kv = math.ceil(predicted / (cap * cfg.target_kv_usage)) if predicted > 0 else 0
    ratio = predicted / (cap * max(1, cur))

    # Compute: windowed waiting per replica and inter-token latency (see the module doc).
    gens = [r.generation_rate for r in inp.replicas if r.generation_rate is not None]
    reported = bool(inp.replicas) and len(gens) == len(inp.replicas)
    sample = (now, float(cur), (waiting + inp.queued_requests) / max(1, cur), running, sum(gens))
    load = tuple(x for x in state.load if now - x[0] <= cfg.trend_window_s) + ((sample,) if cur else ())
    waiting_avg = sum(x[2] for x in load) / len(load) if load else 0.0
    run_sum, gen_sum = sum(x[3] for x in load), sum(x[4] for x in load)
    serving_avg = sum(x[1] for x in load) / len(load) if load else float(cur)
    # Judge compute only on a window at least half full (the first seconds of traffic are prefills).
    known = reported and len(load) > 1 and now - load[0][0] >= cfg.trend_window_s / 2
    itl = run_sum / gen_sum if known and gen_sum > 0 and run_sum > 0 else None
    learned = state.itl_floor_s if itl is None else min(itl, state.itl_floor_s or itl)
    measured = sorted(r.itl_floor_s for r in inp.replicas if r.itl_floor_s)
    if cfg.itl_floor_s is not None:
        floor_s: float | None = cfg.itl_floor_s
        floor_source = "override"
    elif measured:  # the replicas' own step time at batch 1 (their median: one slow report moves nothing)
        floor_s = measured[len(measured) // 2]
        floor_source = "measured"
    else:
        floor_s = learned
        floor_source = "learned"
    if itl is not None and floor_s is not None:
        usage = max(0.0, 1.0 - floor_s / itl)
    elif known and run_sum > 0 and gen_sum == 0:
        usage = 1.0  # sequences running and no token generated in the whole window: saturated (or all prefilling)
    else:
        usage = 0.0
    by_compute = math.ceil(usage * serving_avg / cfg.target_compute_usage - 1e-9) if usage > 0 else 0
    # Without a judged window, the compute need is unknown: it neither adds replicas nor allows removing one.
    compute_floor = by_compute if known or not reported else have

    signals = {"kv_tokens_used": used, "kv_demand_tokens": demand, "kv_predicted_tokens": predicted,
               "kv_growth_tokens_per_s": slope, "waiting": waiting, "queued": inp.queued_requests,
               "waiting_per_replica_avg": waiting_avg, "compute_usage": usage}
    if itl is not None:
        signals["itl_s"] = itl
    if floor_s is not None:
        signals["itl_floor_s"] = floor_s
    busy = running + waiting + inp.queued_requests > 0 or any(r.token_rate > 0 for r in inp.replicas)
    max_kv = max((r.kv_cache_usage for r in inp.replicas), default=0.0)
    kv_high = max_kv >= cfg.high_kv_usage
    queueing = waiting_avg >= cfg.high_waiting_per_replica
    pressured = kv_high or queueing
    st = ScalerState(
        history=history,
        pressure_since=_since(state.pressure_since, now) if pressured else None,
        idle_since=None if busy else _since(state.idle_since, now),
        low_since=state.low_since,
        load=load,
        itl_floor_s=floor_s if floor_source == "override" else learned,
    )
    sources = {"itl_floor_s": floor_source, "kv_capacity_tokens": cap_source}

    def out(kind: str, desired: int, reason: str, **upd: float | None) -> tuple[Decision, ScalerState]:
        bounded = min(max(desired, inp.min_replicas), inp.max_replicas)
        if bounded != desired:
            reason += f" (held to [{inp.min_replicas}, {inp.max_replicas}])"
        return Decision(bounded, kind, reason, ratio, signals, sources), replace(st, **upd)

    def compute_text() -> str:
        if itl is None:
            return f"compute usage {usage:.0%}"
        return (f"compute usage {usage:.0%} (inter-token latency {itl * 1e3:,.0f} ms over {cfg.trend_window_s:.0f} s, "
                f"floor {floor_s * 1e3:,.0f} ms {floor_source})")

    if cur == 0:
        if inp.queued_requests > 0 or busy:
            return out("scale_from_zero", max(1, by_kv), f"scale from zero: {inp.queued_requests:.0f} requests waiting",
                       low_since=None)
        return out("idle_at_zero", 0, "idle at zero replicas")
    if by_kv > have and by_kv >= by_compute:
        return out("kv_demand", by_kv, f"KV demand {predicted:,.0f} tokens (growing {slope:,.0f}/s over a {cfg.startup_s:.0f} s "
                          f"start-up) exceeds {cfg.target_kv_usage:.0%} of {cur} replicas' capacity", low_since=None)
    if by_compute > have:
        return out("compute_demand", by_compute, f"{compute_text()} on {serving_avg:.1f} replicas exceeds the "
                   f"{cfg.target_compute_usage:.0%} target: {by_compute} replicas needed", low_since=None)
    if st.pressure_since is not None and now - st.pressure_since >= cfg.upscale_sustained_s:
        what = (f"max KV usage {max_kv:.0%}" if kv_high else "") + (", " if kv_high and queueing else "") + (
            f"{waiting_avg:.1f} requests waiting per replica over {cfg.trend_window_s:.0f} s" if queueing else "")
        if have > cur:
            return out("pressure_starting", have, f"sustained pressure for {now - st.pressure_since:.0f} s ({what}); "
                       f"{have - cur} replica(s) already starting", low_since=None)
        return out("sustained_pressure", cur + 1, f"sustained pressure for {now - st.pressure_since:.0f} s: {what}",
                   low_since=None, pressure_since=now)
    if inp.min_replicas == 0 and st.idle_since is not None and now - st.idle_since >= cfg.idle_to_zero_s:
        return out("scale_to_zero", 0, f"no traffic for {now - st.idle_since:.0f} s: scale to zero", low_since=None)
    floor = max(by_kv, compute_floor, 1)
    if floor < have and not pressured:
        low_since = state.low_since if state.low_since is not None else now
        why = (f"demand fits {floor} replica(s) at {cfg.target_kv_usage:.0%} KV and {cfg.target_compute_usage:.0%} "
               f"compute ({compute_text()}, {waiting_avg:.2f} waiting per replica)")
        if now - low_since >= cfg.downscale_delay_s:
            return out("downscale", have - 1, f"{why} for {now - low_since:.0f} s: remove one", low_since=now)
        return out("downscale_pending", have, f"{why}; waiting {cfg.downscale_delay_s - (now - low_since):.0f} s "
                   "more before scaling down", low_since=low_since)
    if pressured:
        return out("steady", have, f"steady: pressure for {now - st.pressure_since:.0f} s, under the "
                   f"{cfg.upscale_sustained_s:.0f} s sustain window", low_since=None)
    return out("steady", have, f"steady: demand fits the current replicas ({compute_text()})", low_since=None)


def _since(start: float | None, now: float) -> float:
    return now if start is None else start


def _slope(history: tuple[tuple[float, float], ...]) -> float:
    """Least-squares growth rate of KV demand, tokens per second."""
    if len(history) < 2:
        return 0.0
    n = len(history)
    mt = sum(t for t, _ in history) / n
    md = sum(d for _, d in history) / n
    var = sum((t - mt) ** 2 for t, _ in history)
    if var == 0:
        return 0.0
    return sum((t - mt) * (d - md) for t, d in history) / var
