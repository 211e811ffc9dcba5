"""Engines and the serving path sharing one host's cores (the CPU build of vLLM on a small machine).

On a GPU each engine steps on its own accelerator and the serving path (HTTP, Serve's proxy, the
ingress, the replica's front end) runs on host cores beside it. On the CPU build they all share the
host: an idle profile times a step with one engine on the cores, but under load two engines step at
once and the serving path takes a core's share per token streamed, so every step takes longer. With a
``HostShare`` on the ``Setup`` each step's time is multiplied by::

    serving   = serving_cpu_s_per_token × output tokens/s of the whole cluster over the last second
    available = max(cores − serving, 10 % of cores)
    slowdown  = max(1, engines stepping (this one included) × engine_cores / available)

``engine_cores`` is what one engine uses stepping alone, ``serving_cpu_s_per_token`` the CPU the rest
of the stack spends per output token; ``benchmarks/sim_fidelity.py`` measures both on the stack it
replays, before the replay. Off (None) by default: the engines are accelerators.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from cluster.sim.engine import Replica

RATE_WINDOW_S = 1.0
MIN_AVAILABLE = 0.1  # of the cores: the engines are never starved entirely


@dataclass(frozen=True)
class HostShare:
    cores: float  # the host's cores
    engine_cores: float  # cores one engine uses stepping alone
    serving_cpu_s_per_token: float  # CPU seconds the serving path spends per output token

    def __post_init__(self) -> None:
        for name in ("cores", "engine_cores"):
            if not getattr(self, name) > 0:
                raise ValueError(f"HostShare.{name}: {getattr(self, name)!r} must be > 0")
        if not self.serving_cpu_s_per_token >= 0:
            raise ValueError(f"HostShare.serving_cpu_s_per_token: {self.serving_cpu_s_per_token!r} must be >= 0")

    def to_dict(self) -> dict:
        return asdict(self)


class HostContention:
    """``slowdown(engine, now)`` for every engine of a cluster: see the module doc."""

    def __init__(self, share: HostShare, engines: Callable[[], Sequence[Replica]]):
        self.share, self.engines = share, engines
        self.samples: deque[tuple[float, int]] = deque()  # (time, output tokens of all engines so far)

    def _token_rate(self, now: float, engines: Sequence[Replica]) -> float:
        total = sum(e.tokens_generated for e in engines)
        if self.samples and self.samples[-1][0] == now:
            self.samples[-1] = (now, max(total, self.samples[-1][1]))
        else:
            self.samples.append((now, total))
        while len(self.samples) > 2 and now - self.samples[1][0] >= RATE_WINDOW_S:
            self.samples.popleft()
        t0, n0 = self.samples[0]
        return (total - n0) / (now - t0) if now > t0 else 0.0

    def slowdown(self, engine: Replica, now: float) -> float:
        engines = self.engines()
        share = self.share
        serving = share.serving_cpu_s_per_token * self._token_rate(now, engines)
        available = max(share.cores - serving, MIN_AVAILABLE * share.cores)
        stepping = 1 + sum(1 for e in engines if e is not engine and e.busy)
        return max(1.0, stepping * share.engine_cores / available)
