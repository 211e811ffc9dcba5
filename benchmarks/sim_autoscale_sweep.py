"""Each autoscaler's best setting in the simulator: the cheapest (GPU-hours) with >= 99% SLO attainment.

Runs ``cluster.sim.autoscale.simulate_autoscale`` on a trace (default: the Azure
conversation trace at the ``kvpilot simulate --autoscale`` defaults: time scale 2,
replicas 2..12, 4 at t = 0, start-up from the weights) for a few settings per
autoscaler, one after another in this process, and prints and saves what it
tried. The picks go into ``cluster.sim.autoscale.TUNED`` by hand.

    .venv/bin/python benchmarks/sim_autoscale_sweep.py [--trace PATH] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cluster.cli.simulate import AUTOSCALE_INITIAL, AUTOSCALE_MAX, AUTOSCALE_MIN  # noqa: E402
from cluster.sim.autoscale import default_startup_s, simulate_autoscale, single_stream_itl_s  # noqa: E402
from cluster.sim.simulator import make_setup  # noqa: E402
from cluster.sim.workload import load_trace  # noqa: E402

GRID: dict[str, list[dict[str, float]]] = {
    # kvpilot runs on its shipped AutoscalingConfig defaults in the comparison; the others are for information.
    # (main adds the ITL floor set by hand to one request's ITL: what the replicas' own measurement replaces)
    "kvpilot": [{}, {"target_compute_usage": 0.6}, {"target_compute_usage": 0.65}],
    "ray_default": [{}, {"target_ongoing_requests": 16}, {"target_ongoing_requests": 32},
                    {"target_ongoing_requests": 48}, {"target_ongoing_requests": 64}],
    "queue": [{}, {"threshold": 1}, {"threshold": 0}],
    "kv_target": [{}, {"target": 0.3}, {"target": 0.2}],
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default=str(ROOT / "benchmarks" / "traces" / "AzureLLMInferenceTrace_conv.csv"))
    ap.add_argument("--time-scale", type=float, default=2.0)
    ap.add_argument("--only", help="comma-separated autoscalers (default: all)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / f"autoscale-{datetime.now():%H%M}"))
    ns = ap.parse_args()
    names = ns.only.split(",") if ns.only else list(GRID)
    setup = make_setup(AUTOSCALE_MAX)
    startup = default_startup_s(setup)
    GRID["kvpilot"].append({"itl_floor_s": round(single_stream_itl_s(setup), 5)})
    w = load_trace(ns.trace, time_scale=ns.time_scale, max_model_len=setup.max_model_len)
    rows, best = [], {}
    for name in names:
        for params in GRID[name]:
            t0 = time.perf_counter()
            r = simulate_autoscale(w, name, setup, min_replicas=AUTOSCALE_MIN, max_replicas=AUTOSCALE_MAX,
                                   initial_replicas=AUTOSCALE_INITIAL, startup_s=startup, params=params)
            d = {"autoscaler": name, "setting": params, "gpu_hours": round(r.gpu_hours, 3),
                 "slo_attainment": round(r.serving.slo_attainment, 5), "ttft_p99_s": round(r.serving.ttft_p99_s, 3),
                 "tpot_p99_s": round(r.serving.tpot_p99_s, 4), "replicas_mean": round(r.replicas_mean, 2),
                 "replicas_max": r.replicas_max, "scale_events": r.scale_ups + r.scale_downs}
            rows.append(d)
            print(f"{name:12s} {json.dumps(params):42s} {d['gpu_hours']:7.3f} GPU-h  SLO {d['slo_attainment']:.2%}  "
                  f"TTFT p99 {d['ttft_p99_s']:.2f} s  TPOT p99 {d['tpot_p99_s'] * 1e3:.0f} ms  replicas mean "
                  f"{d['replicas_mean']:.2f} max {d['replicas_max']}  ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
            if d["slo_attainment"] >= 0.99 and (name not in best or d["gpu_hours"] < best[name]["gpu_hours"]):
                best[name] = d
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"trace": w.summary(), "startup_s": startup, "min_replicas": AUTOSCALE_MIN, "max_replicas": AUTOSCALE_MAX,
           "initial_replicas": AUTOSCALE_INITIAL, "tried": rows,
           "best": {k: {"setting": v["setting"], "gpu_hours": v["gpu_hours"], "slo_attainment": v["slo_attainment"]}
                    for k, v in best.items()},
           "no_setting_reached_99": [n for n in names if n not in best]}
    (out / "sweep.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc["best"], indent=2))
    print(f"no setting reached 99%: {doc['no_setting_reached_99']}; written {out / 'sweep.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
