"""Harder workloads than the two shipped traces, generated from a seed: ``SYNTHETIC[name](rate, n, seed)``.

Each returns a ``Workload`` (``cluster.sim.workload``) whose shared prefixes are Mooncake-style
chain ids (one per 512-token block), so the simulated prefix cache and the router's index
share exactly what the generator says is shared. ``rate`` is the mean arrival rate in
requests/s; the sweep (``benchmarks/sim_robustness.py``) scales it.

``shared_prefix``
    Many tenants (64), each with its own long system prompt (2k–12k tokens, 512-token
    aligned), tenant popularity Zipf (s = 1.1); each request is its tenant's system prompt
    plus 200–1,200 tokens of its own; outputs 50–400 tokens. Cache reuse decides TTFT.
``multiscale_bursts``
    Chat-like lengths (prompt lognormal, median 1,500; output median 200) with the rate
    modulated at three time scales at once (square waves of 20 s, 3 min and 15 min periods,
    each ×2.2 on / ×0.4 off): bursts shorter than a replica's start-up, and longer ones.
    (Both bursty generators start every wave in its on half, or with ``off_first`` in its off half.)
``long_prompt_short_output``
    Prompts 6k–24k tokens, outputs 8–64: prefill-bound (summaries, RAG, classification).
``long_prompt_bursts``
    Prompts 2k–8k tokens, outputs 8–64, arriving in bursts at two time scales (square waves of
    2 min and 15 min periods, ×2.2 on / ×0.4 off): a prefill-bound load whose peaks outlast a
    replica's start-up. The longest prompt prefills alone in about 1.3 s on the default 70B
    setup, inside the 2 s TTFT target (``long_prompt_short_output``'s longer prompts cannot meet
    it at any replica count, so its attainment measures the SLO, not an autoscaler).
``overload``
    Chat-like lengths; the rate ramps from 0.3× to 3× the given mean and back (a triangle
    over the run), so a part of the run is past any fixed capacity.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

from cluster.sim.workload import TRACE_BLOCK_TOKENS, Workload, _finish

_TENANT_STRIDE = 1 << 12  # chain ids per tenant (blocks of its system prompt)


def _arrivals(rng: random.Random, n: int, rate_at: Callable[[float], float], peak: float) -> list[float]:
    """``n`` arrivals of a Poisson process with intensity ``rate_at(t)`` <= ``peak`` (thinning)."""
    t, out = 0.0, []
    while len(out) < n:
        t += rng.expovariate(peak)
        if rng.random() * peak <= rate_at(t):
            out.append(t)
    return out


def _chat_lengths(rng: random.Random) -> tuple[int, int]:
    return max(16, min(16000, int(rng.lognormvariate(math.log(1500), 0.8)))), max(
        4, min(2000, int(rng.lognormvariate(math.log(200), 0.7))))


def shared_prefix(rate: float, n: int, seed: int = 0, tenants: int = 64) -> Workload:
    rng = random.Random(seed)
    sys_blocks = [rng.randint(4, 24) for _ in range(tenants)]  # 2k..12k tokens
    weights = [1 / (k + 1) ** 1.1 for k in range(tenants)]
    raw = []
    for t in _arrivals(rng, n, lambda _t: rate, rate):
        k = rng.choices(range(tenants), weights)[0]
        own = rng.randint(200, 1200)
        chain = tuple(k * _TENANT_STRIDE + b + 1 for b in range(sys_blocks[k]))
        raw.append((t, sys_blocks[k] * TRACE_BLOCK_TOKENS + own, rng.randint(50, 400), chain))
    return _finish("shared_prefix", "synthetic", raw, time_scale=1.0, max_requests=None, max_model_len=None,
                   notes=[f"{tenants} tenants, system prompts 2k-12k tokens, Zipf 1.1, Poisson {rate:g} req/s, seed {seed}"])


def _square_waves(rate: float, periods: tuple[float, ...], hi: float = 2.2, lo: float = 0.4, off_first: bool = False):
    """Intensity ``rate`` modulated by independent square waves (×hi on, ×lo off), mean ``rate``; and its peak.
    Each wave starts in its on half, or (``off_first``) in its off half."""
    norm = ((hi + lo) / 2) ** len(periods)  # the mean of the product of independent square waves

    def rate_at(t: float) -> float:
        m = 1.0
        for p in periods:
            m *= hi if ((t % p) < p / 2) != off_first else lo
        return rate * m / norm

    return rate_at, rate * hi ** len(periods) / norm


def multiscale_bursts(rate: float, n: int, seed: int = 0, off_first: bool = False) -> Workload:
    rng = random.Random(seed)
    rate_at, peak = _square_waves(rate, (20.0, 180.0, 900.0), off_first=off_first)
    raw = [(t, *_chat_lengths(rng), ()) for t in _arrivals(rng, n, rate_at, peak)]
    return _finish("multiscale_bursts", "synthetic", raw, time_scale=1.0, max_requests=None, max_model_len=None,
                   notes=[f"bursts at 20 s, 3 min and 15 min periods around {rate:g} req/s, seed {seed}"
                          + (", waves start off" if off_first else "")])


def long_prompt_short_output(rate: float, n: int, seed: int = 0) -> Workload:
    rng = random.Random(seed)
    raw = [(t, rng.randint(6000, 24000), rng.randint(8, 64), ()) for t in _arrivals(rng, n, lambda _t: rate, rate)]
    return _finish("long_prompt_short_output", "synthetic", raw, time_scale=1.0, max_requests=None,
                   max_model_len=None, notes=[f"prompts 6k-24k, outputs 8-64, Poisson {rate:g} req/s, seed {seed}"])


def long_prompt_bursts(rate: float, n: int, seed: int = 0, off_first: bool = False) -> Workload:
    rng = random.Random(seed)
    rate_at, peak = _square_waves(rate, (120.0, 900.0), off_first=off_first)
    raw = [(t, rng.randint(2000, 8000), rng.randint(8, 64), ()) for t in _arrivals(rng, n, rate_at, peak)]
    return _finish("long_prompt_bursts", "synthetic", raw, time_scale=1.0, max_requests=None, max_model_len=None,
                   notes=[f"prompts 2k-8k, outputs 8-64, bursts at 2 min and 15 min periods around {rate:g} req/s, "
                          f"seed {seed}" + (", waves start off" if off_first else "")])


def overload(rate: float, n: int, seed: int = 0) -> Workload:
    rng = random.Random(seed)
    span = n / rate  # the run's length at the mean rate (the triangle's mean is 1.65x; the run ends sooner)
    lo, hi = 0.3, 3.0

    def rate_at(t: float) -> float:
        x = min(t / span, 1.0)
        return rate * (lo + (hi - lo) * (1 - abs(2 * x - 1)))

    raw = [(t, *_chat_lengths(rng), ()) for t in _arrivals(rng, n, rate_at, rate * hi)]
    return _finish("overload", "synthetic", raw, time_scale=1.0, max_requests=None, max_model_len=None,
                   notes=[f"rate ramps {lo:g}x -> {hi:g}x -> {lo:g}x of {rate:g} req/s, seed {seed}"])


SYNTHETIC: dict[str, Callable[..., Workload]] = {
    f.__name__: f for f in (shared_prefix, multiscale_bursts, long_prompt_short_output, long_prompt_bursts, overload)
}
