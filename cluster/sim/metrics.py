"""Serving metrics of one simulated run, defined as the field's benchmarks define them.

TTFT: arrival at the router to the first token. TPOT: (end-to-end latency − TTFT)
/ (output tokens − 1), per request. ITL: every gap between two tokens of a
request (a preempted request's gap includes its wait). End-to-end: arrival to
last token. Goodput: requests meeting every SLO (default TTFT ≤ 2 s and TPOT ≤
0.2 s, MLPerf's Llama-2-70B server targets) per second of the run, the run
lasting from the first arrival to the last completion (as vLLM's
``benchmark_serving`` counts it). Prefix hit rate: prompt tokens the engines'
own prefix caches supplied at each request's first admission, over all prompt
tokens. Load spread: coefficient of variation of the tokens each replica
computed (prefill and decode).

The SLO, TPOT and what meets the SLO are ``cluster.traces``'s, shared with the bench's
summary (``cluster.bench.metrics``). Percentiles here are the lower empirical quantile (ITL
weighted by the tokens sharing a gap); the bench's are numpy's linear interpolation, as
vLLM's benchmark computes them from measured streams.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from cluster.sim.engine import Replica, SimRequest
from cluster.traces import SLO, meets_slo, tpot_s


@dataclass
class PolicyResult:
    policy: str
    requests: int
    completed: int
    duration_s: float
    goodput_rps: float
    slo_attainment: float
    throughput_rps: float
    output_tok_s: float
    ttft_p50_s: float
    ttft_p90_s: float
    ttft_p99_s: float
    tpot_p50_s: float
    tpot_p90_s: float
    tpot_p99_s: float
    itl_p50_s: float
    itl_p90_s: float
    itl_p99_s: float
    e2e_p50_s: float
    e2e_p90_s: float
    e2e_p99_s: float
    prefix_hit_rate: float
    preemptions: int
    preempted_requests: int
    load_cv: float
    kv_blocks_peak_frac: float
    decision_us_p50: float
    decision_us_p99: float
    wall_s: float
    ttft_samples: list[float] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("ttft_samples")
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in d.items()}


def weighted_percentiles(values: np.ndarray, weights: np.ndarray | None, qs: Sequence[float]) -> list[float]:
    """Percentiles (0..100) of ``values`` where each value counts ``weights`` times (lower empirical quantile)."""
    if len(values) == 0:
        return [float("nan")] * len(qs)
    if weights is None:
        return [float(x) for x in np.percentile(values, qs, method="lower")]
    order = np.argsort(values, kind="stable")
    v, cw = values[order], np.cumsum(weights[order])
    total = cw[-1]
    out = []
    for q in qs:
        i = int(np.searchsorted(cw, q / 100 * total, side="left"))
        out.append(float(v[min(i, len(v) - 1)]))
    return out


def itl_samples(replicas: Sequence[Replica]) -> tuple[np.ndarray, np.ndarray]:
    vals = [np.asarray(r.itl_values, float) for r in replicas]
    wts = [np.asarray(r.itl_weights, float) for r in replicas]
    for r in replicas:
        if not r.macro_itl:
            continue
        m = np.asarray(r.macro_itl, float)  # rows (a, b, k, n): steps 1..k-1 last a + b*i each, n tokens per step
        ks = m[:, 2].astype(np.int64) - 1
        idx = np.repeat(np.arange(len(m)), ks)
        starts = np.cumsum(ks) - ks
        i = np.arange(ks.sum()) - np.repeat(starts, ks) + 1
        vals.append(m[idx, 0] + m[idx, 1] * i)
        wts.append(m[idx, 3])
    return np.concatenate(vals) if vals else np.zeros(0), np.concatenate(wts) if wts else np.zeros(0)


def summarize(policy: str, requests: Sequence[SimRequest], replicas: Sequence[Replica], slo: SLO, *,
              decision_us: Sequence[float], wall_s: float, kv_peak_frac: float) -> PolicyResult:
    done = [r for r in requests if r.finish_t >= 0]
    arrivals = np.array([r.arrival for r in requests]) if requests else np.zeros(1)
    t0 = float(arrivals.min())
    t1 = max((r.finish_t for r in done), default=t0)
    duration = max(t1 - t0, 1e-9)
    ttft = np.array([r.first_t - r.arrival for r in done])
    e2e = np.array([r.finish_t - r.arrival for r in done])
    tpots = [tpot_s(r.first_t, r.finish_t, r.target) for r in done]
    tpot = np.array([t for t in tpots if t is not None])
    good = sum(meets_slo(first, t, slo) for first, t in zip(ttft, tpots))
    itl_values, itl_weights = itl_samples(replicas)
    tokens = np.array([r.tokens_processed for r in replicas], float)
    prompt = sum(r.prompt for r in done)
    ttft_p, tpot_p, e2e_p = (weighted_percentiles(a, None, (50, 90, 99)) for a in (ttft, tpot, e2e))
    itl_p = weighted_percentiles(itl_values, itl_weights, (50, 90, 99))
    decision_p = weighted_percentiles(np.asarray(decision_us, float), None, (50, 99))
    return PolicyResult(
        policy=policy,
        requests=len(requests),
        completed=len(done),
        duration_s=duration,
        goodput_rps=good / duration,
        slo_attainment=good / len(requests) if requests else 0.0,
        throughput_rps=len(done) / duration,
        output_tok_s=sum(r.target for r in done) / duration,
        ttft_p50_s=ttft_p[0], ttft_p90_s=ttft_p[1], ttft_p99_s=ttft_p[2],
        tpot_p50_s=tpot_p[0], tpot_p90_s=tpot_p[1], tpot_p99_s=tpot_p[2],
        itl_p50_s=itl_p[0], itl_p90_s=itl_p[1], itl_p99_s=itl_p[2],
        e2e_p50_s=e2e_p[0], e2e_p90_s=e2e_p[1], e2e_p99_s=e2e_p[2],
        prefix_hit_rate=sum(r.cached_tokens for r in done) / prompt if prompt else 0.0,
        preemptions=sum(r.preemptions for r in replicas),
        preempted_requests=sum(1 for r in done if r.preemptions),
        load_cv=float(tokens.std() / tokens.mean()) if tokens.mean() > 0 else 0.0,
        kv_blocks_peak_frac=kv_peak_frac,
        decision_us_p50=decision_p[0], decision_us_p99=decision_p[1],
        wall_s=wall_s,
        ttft_samples=sorted(ttft.tolist()),
    )
