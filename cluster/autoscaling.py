"""Memory-pressure autoscaling: how many replicas a model needs, from KV-cache demand.

An LLM replica is full when its KV cache is full, not when it holds N requests.
``decide`` sizes a deployment so that the predicted KV demand fits under
``target_kv_usage`` of the replicas' KV capacity (the planner's KV tokens):

    demand    = KV tokens in use + tokens of the requests queued in engines and at the router
    predicted = demand + max(0, its growth rate) × startup_s   (a new replica takes that long)
    desired   = ceil(predicted / (capacity × target_kv_usage))

It also adds a replica under sustained pressure (KV usage above ``high_kv_usage``
or requests waiting, for ``upscale_sustained_s``), removes replicas one at a time
only after demand has stayed low for ``downscale_delay_s``, goes to zero after
``idle_to_zero_s`` without traffic when ``min_replicas`` is 0, and starts one as
soon as a request waits at zero. Every decision carries its reason.
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


@dataclass(frozen=True)
class Decision:
    desired: int
    kind: str  # a short, stable label: kv_demand, sustained_pressure, downscale, ...
    reason: str  # the sentence with the numbers
    kv_demand_ratio: float  # predicted demand over the current replicas' KV capacity
    signals: dict[str, float] = field(default_factory=dict)


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
    cap = max(1, inp.kv_capacity_tokens)
    used = sum(r.kv_cache_usage for r in inp.replicas) * cap
    running = sum(r.num_running for r in inp.replicas)
    waiting = sum(r.num_waiting for r in inp.replicas)
    per_request = used / running if running else DEFAULT_TOKENS_PER_REQUEST
    demand = used + (waiting + inp.queued_requests) * per_request
    history = tuple((t, d) for t, d in state.history if now - t <= cfg.trend_window_s) + ((now, demand),)
    slope = _slope(history)
    predicted = demand + max(0.0, slope) * cfg.startup_s
    by_kv = math.ceil(predicted / (cap * cfg.target_kv_usage)) if predicted > 0 else 0
    ratio = predicted / (cap * max(1, cur))
    signals = {"kv_tokens_used": used, "kv_demand_tokens": demand, "kv_predicted_tokens": predicted,
               "kv_growth_tokens_per_s": slope, "waiting": waiting, "queued": inp.queued_requests}
    busy = running + waiting + inp.queued_requests > 0 or any(r.token_rate > 0 for r in inp.replicas)
    pressured = any(r.kv_cache_usage >= cfg.high_kv_usage for r in inp.replicas) or waiting > 0
    st = ScalerState(
        history=history,
        pressure_since=_since(state.pressure_since, now) if pressured else None,
        idle_since=None if busy else _since(state.idle_since, now),
        low_since=state.low_since,
    )

    def out(kind: str, desired: int, reason: str, **upd: float | None) -> tuple[Decision, ScalerState]:
        bounded = min(max(desired, inp.min_replicas), inp.max_replicas)
        if bounded != desired:
            reason += f" (held to [{inp.min_replicas}, {inp.max_replicas}])"
        return Decision(bounded, kind, reason, ratio, signals), replace(st, **upd)

    if cur == 0:
        if inp.queued_requests > 0 or busy:
            return out("scale_from_zero", max(1, by_kv), f"scale from zero: {inp.queued_requests:.0f} requests waiting", low_since=None)
        return out("idle_at_zero", 0, "idle at zero replicas")
    if by_kv > have:
        return out("kv_demand", by_kv, f"KV demand {predicted:,.0f} tokens (growing {slope:,.0f}/s over a {cfg.startup_s:.0f} s "
                          f"start-up) exceeds {cfg.target_kv_usage:.0%} of {cur} replicas' capacity", low_since=None)
    if st.pressure_since is not None and now - st.pressure_since >= cfg.upscale_sustained_s:
        if have > cur:
            return out("pressure_starting", have, f"sustained pressure for {now - st.pressure_since:.0f} s; "
                       f"{have - cur} replica(s) already starting", low_since=None)
        return out("sustained_pressure", cur + 1, f"sustained pressure for {now - st.pressure_since:.0f} s: max KV usage "
                            f"{max(r.kv_cache_usage for r in inp.replicas):.0%}, {waiting:.0f} waiting",
                   low_since=None, pressure_since=now)
    if inp.min_replicas == 0 and st.idle_since is not None and now - st.idle_since >= cfg.idle_to_zero_s:
        return out("scale_to_zero", 0, f"no traffic for {now - st.idle_since:.0f} s: scale to zero", low_since=None)
    floor = max(by_kv, 1)
    if floor < have and not pressured:
        low_since = state.low_since if state.low_since is not None else now
        if now - low_since >= cfg.downscale_delay_s:
            return out("downscale", have - 1, f"demand fits {floor} replica(s) at {cfg.target_kv_usage:.0%} KV for "
                                f"{now - low_since:.0f} s: remove one", low_since=now)
        return out("downscale_pending", have, f"demand fits {floor} replica(s); waiting {cfg.downscale_delay_s - (now - low_since):.0f} s "
                        "more before scaling down", low_since=low_since)
    return out("steady", have, "steady: demand fits the current replicas", low_since=None)


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
