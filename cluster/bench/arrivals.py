"""Arrival times for an open-loop run: Poisson, Gamma (bursty), or a trace's own clock.

All functions return offsets in seconds from the start of the run, sorted, the
first request at 0 for a trace and after one gap for a random process.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def gamma_intervals(rate: float, n: int, burstiness: float = 1.0, seed: int = 0) -> np.ndarray:
    """``n`` gaps between requests: Gamma with mean ``1/rate`` and shape ``burstiness``.

    Shape 1 is the exponential, i.e. Poisson arrivals. The coefficient of variation of
    the gaps is ``1/sqrt(burstiness)``: below 1 is burstier than Poisson, above 1
    smoother (vLLM's ``--burstiness`` has the same meaning).
    """
    if rate <= 0:
        raise ValueError(f"rate must be > 0 requests/s, got {rate}")
    if burstiness <= 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    if n < 0:
        raise ValueError(f"number of requests must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    return rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)


def random_arrivals(rate: float, n: int, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Offsets (s) of ``n`` arrivals at ``rate`` requests/s; ``burstiness`` 1.0 is Poisson."""
    return np.cumsum(gamma_intervals(rate, n, burstiness, seed)).tolist()


def trace_arrivals(timestamps_s: Sequence[float], time_scale: float = 1.0) -> list[float]:
    """A trace's own clock, shifted to start at 0 and divided by ``time_scale``.

    ``time_scale`` 2 replays twice as fast (the simulator's convention).
    """
    if time_scale <= 0:
        raise ValueError(f"time scale must be > 0, got {time_scale}")
    if not timestamps_s:
        return []
    t0 = min(timestamps_s)
    return [(t - t0) / time_scale for t in timestamps_s]
