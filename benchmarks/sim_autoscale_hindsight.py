"""How many GPU-hours an autoscaler could save on a trace if it knew the future: a hindsight bound.

    flock /tmp/kvpilot-heavy.lock .venv/bin/python benchmarks/sim_autoscale_hindsight.py \\
        [--trace benchmarks/traces/AzureLLMInferenceTrace_conv.csv] [--time-scale 2] [--window-s 120] \\
        [--per-replica 1.5,1.75,...] [--json OUT.json]

The ``hindsight`` autoscaler reads the trace's arrivals ahead of time: at every tick it asks for
``ceil(offered req/s / per_replica)`` replicas, the rate taken over ``--window-s`` around each
moment, and the largest such count over the next start-up (so a replica it needs is ready when the
load arrives, and one it removes is not needed again before another could start). It runs in the
same simulator, with the same routing, start-up, billing and bounds as ``kvpilot simulate
--autoscale`` (replicas 2..12, 4 ready at t = 0, start-up 133 s). For each ``per_replica`` it prints
GPU-hours and SLO attainment; the cheapest schedule holding 99% is what foresight of the load alone
buys, which no reactive policy can beat by much. kvpilot (defaults) and the smallest fixed count
holding 99% run beside it.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cluster.sim.autoscale import Autoscaler, Observation, default_startup_s, simulate_autoscale  # noqa: E402
from cluster.sim.simulator import make_setup  # noqa: E402
from cluster.sim.workload import load_trace  # noqa: E402

SLO_GOAL = 0.99


class HindsightScaler(Autoscaler):
    """Replica count from the future offered rate (see the module doc)."""

    name = "hindsight"

    def __init__(self, arrivals: list[float], per_replica: float, window_s: float, startup_s: float):
        super().__init__()
        self.arrivals, self.per_replica = sorted(arrivals), per_replica
        self.window_s, self.startup_s = window_s, startup_s

    def needed(self, t: float) -> int:
        lo = bisect.bisect_left(self.arrivals, t - self.window_s / 2)
        hi = bisect.bisect_left(self.arrivals, t + self.window_s / 2)
        return math.ceil((hi - lo) / self.window_s / self.per_replica - 1e-9)

    def __call__(self, obs: Observation) -> tuple[int, str]:
        ahead = max(self.needed(obs.now + dt) for dt in range(0, int(self.startup_s) + 1, 5))
        return min(max(ahead, obs.min_replicas), obs.max_replicas), "schedule"


def row(name: str, r) -> dict:
    return {"autoscaler": name, "gpu_hours": round(r.gpu_hours, 3),
            "slo_attainment": round(r.serving.slo_attainment, 5),
            "replicas_mean": round(r.replicas_mean, 3), "replicas_max": r.replicas_max,
            "ttft_p99_s": round(r.serving.ttft_p99_s, 3), "tpot_p99_s": round(r.serving.tpot_p99_s, 4)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trace", default=str(ROOT / "benchmarks/traces/AzureLLMInferenceTrace_conv.csv"))
    p.add_argument("--time-scale", type=float, default=2.0)
    p.add_argument("--window-s", type=float, default=120.0)
    p.add_argument("--per-replica", default="1.5,1.75,2,2.25,2.5,2.75,3,3.25,3.5",
                   help="offered req/s one replica is given, comma-separated")
    p.add_argument("--min-replicas", type=int, default=2)
    p.add_argument("--max-replicas", type=int, default=12)
    p.add_argument("--initial-replicas", type=int, default=4)
    p.add_argument("--fixed", default="4,5", help="fixed counts to run beside it (min = max = initial)")
    p.add_argument("--json", type=Path)
    ns = p.parse_args()
    setup = make_setup(ns.max_replicas)
    startup = default_startup_s(setup)
    w = load_trace(ns.trace, time_scale=ns.time_scale, max_model_len=setup.max_model_len)
    bounds = dict(min_replicas=ns.min_replicas, max_replicas=ns.max_replicas, initial_replicas=ns.initial_replicas)
    print(f"{Path(ns.trace).name} x{ns.time_scale:g}: {len(w.requests)} requests over "
          f"{w.requests[-1].arrival_s:.0f} s; replicas {ns.min_replicas}..{ns.max_replicas}, "
          f"{ns.initial_replicas} ready at t = 0, start-up {startup:.0f} s, window {ns.window_s:g} s", flush=True)
    rows = []
    for k in (int(x) for x in ns.fixed.split(",") if x):
        r = simulate_autoscale(w, "kvpilot", setup, startup_s=startup, min_replicas=k, max_replicas=k,
                               initial_replicas=k)
        rows.append(row(f"fixed {k}", r))
        print(rows[-1], flush=True)
    rows.append(row("kvpilot (defaults)", simulate_autoscale(w, "kvpilot", setup, startup_s=startup, **bounds)))
    print(rows[-1], flush=True)
    arrivals = [q.arrival_s for q in w.requests]
    for per in (float(x) for x in ns.per_replica.split(",")):
        scaler = HindsightScaler(arrivals, per, ns.window_s, startup)
        rows.append({**row(f"hindsight {per:g} req/s per replica", simulate_autoscale(
            w, scaler, setup, startup_s=startup, **bounds)), "per_replica": per})
        print(rows[-1], flush=True)
    holding = [r for r in rows if r["slo_attainment"] >= SLO_GOAL]
    best = {kind: min((r for r in holding if r["autoscaler"].startswith(kind)), key=lambda r: r["gpu_hours"],
                      default=None) for kind in ("fixed", "hindsight")}
    print(f"cheapest holding {SLO_GOAL:.0%}: " + "; ".join(
        f"{k}: {b['autoscaler']} {b['gpu_hours']} GPU-h ({b['slo_attainment']:.2%})" if b else f"{k}: none"
        for k, b in best.items()))
    if best["fixed"] and best["hindsight"]:
        print(f"hindsight / fixed: {best['hindsight']['gpu_hours'] / best['fixed']['gpu_hours']:.3f}; "
              f"kvpilot / fixed: {rows[len(ns.fixed.split(','))]['gpu_hours'] / best['fixed']['gpu_hours']:.3f}")
    if ns.json:
        ns.json.parent.mkdir(parents=True, exist_ok=True)
        ns.json.write_text(json.dumps({"args": vars(ns) | {"json": str(ns.json)}, "startup_s": startup,
                                       "rows": rows, "best": best}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
