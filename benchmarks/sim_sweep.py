"""Sweep ``--time-scale`` for routing policies on a trace: where does each saturate?

    .venv/bin/python benchmarks/sim_sweep.py --trace benchmarks/traces/mooncake_conversation_trace.jsonl \\
        --scales 1,1.25,1.5,1.75,2 --policies pow2,dynamo,prefix_affinity --jobs 2

Prints goodput (req/s), SLO attainment and TTFT p90 per (scale, policy), and
the offered rate. "Near saturation" for the best baseline is read off this
table: the scale past which its goodput stops growing with the offered rate.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.sim.simulator import make_setup, simulate  # noqa: E402
from cluster.sim.workload import load_trace  # noqa: E402


def _one(args: tuple[str, float, str, int, int | None, float, dict | None]) -> dict:
    trace, scale, policy, replicas, max_requests, stats_period, params = args
    w = load_trace(trace, time_scale=scale, max_requests=max_requests, max_model_len=32768)
    setup = make_setup(replicas, stats_period_s=stats_period)
    res, _, _ = simulate(w, policy, setup, policy_params=params)
    d = res.to_dict()
    d.update(scale=scale, offered_rps=w.summary()["rate_rps"])
    return d


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trace", required=True)
    ap.add_argument("--scales", default="1,1.5,2")
    ap.add_argument("--policies", default="round_robin,pow2,least_kv,prefix_affinity,llmd,dynamo,sglang,kvpilot")
    ap.add_argument("--replicas", type=int, default=16)
    ap.add_argument("--max-requests", type=int)
    ap.add_argument("--stats-period", type=float, default=1.0)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], help="kvpilot.PARAM=VALUE")
    ap.add_argument("--json", help="also write the rows here")
    ns = ap.parse_args()
    params: dict[str, dict[str, float]] = {}
    for item in ns.set:
        k, _, v = item.partition("=")
        pol, _, name = k.partition(".")
        params.setdefault(pol, {})[name] = float(v)
    jobs = [(ns.trace, float(s), p, ns.replicas, ns.max_requests, ns.stats_period, params.get(p))
            for s in ns.scales.split(",") for p in ns.policies.split(",")]
    with ProcessPoolExecutor(ns.jobs) as ex:
        rows = list(ex.map(_one, jobs))
    print(f"{'scale':>5} {'offered':>7}  {'policy':<16}{'goodput':>8}{'SLO met':>8}{'TTFT p50':>9}{'p90':>7}"
          f"{'TPOT p90':>9}{'hit':>7}{'preempt':>8}{'wall s':>7}")
    for r in rows:
        print(f"{r['scale']:>5g} {r['offered_rps']:>7.2f}  {r['policy']:<16}{r['goodput_rps']:>8.3f}"
              f"{r['slo_attainment']:>8.1%}{r['ttft_p50_s']:>9.2f}{r['ttft_p90_s']:>7.2f}"
              f"{r['tpot_p90_s'] * 1e3:>7.0f}ms{r['prefix_hit_rate']:>7.1%}{r['preemptions']:>8}{r['wall_s']:>7.1f}")
    if ns.json:
        Path(ns.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
