"""Robust, not tuned: every routing policy over 0.5x-2.5x of each workload's rate, every autoscaler over
several workloads and replica bounds against the smallest fixed replica count that meets the SLO.

    flock /tmp/kvpilot-heavy.lock .venv/bin/python benchmarks/sim_robustness.py [--part routing|autoscaling|both]
        [--workloads mooncake,azure,shared_prefix,...] [--requests 1500] [--scales 0.5,1,1.5,2,2.5] [--jobs 2]
        [--autoscale-workloads azure,multiscale_bursts,long_prompt_bursts,overload] [--autoscale-minutes 60]
        [--bounds 2..12,2..24] [--json benchmarks/results/robustness-DATE.json]

Workloads: the two traces in benchmarks/traces/ (``mooncake``, ``azure``: their first --requests
requests, skipped with a message when the folder is absent) and the generators of
``cluster/sim/synthetic.py`` at the base rates in ``BASE_RATE`` (for 16 replicas of the
simulator's 70B AWQ TP=2 H100 setup). Every policy runs with its defaults only.

Routing prints, per workload and load, kvpilot's goodput, the best peer's, and their ratio, and
lists the points where kvpilot is below the best peer. Autoscaling (``--autoscale-minutes`` of each
synthetic workload at ``AUTOSCALE_RATE``, the traces whole, 4 replicas ready at t = 0) prints GPU-hours
and SLO attainment of each autoscaler (peers at their ``TUNED`` settings, kvpilot at its defaults),
the fixed baseline (the smallest replica count within the bounds holding >= 99% SLO, found by a walk
from kvpilot's mean count; a fixed count starts ready and is billed from t = 0), kvpilot's GPU-hours
over the best of (peers holding 99%, the fixed baseline), and where kvpilot misses the goal.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cluster.sim.autoscale import TUNED, default_startup_s, simulate_autoscale  # noqa: E402
from cluster.sim.simulator import make_setup, simulate  # noqa: E402
from cluster.sim.synthetic import SYNTHETIC  # noqa: E402
from cluster.sim.workload import load_trace  # noqa: E402

TRACES = {"mooncake": "mooncake_conversation_trace.jsonl", "azure": "AzureLLMInferenceTrace_conv.csv"}
TRACE_DIR = ROOT / "benchmarks" / "traces"
# req/s at "1x" for the synthetic workloads: near where 16 replicas start to queue (read off this sweep).
BASE_RATE = {"shared_prefix": 8.0, "multiscale_bursts": 10.0, "long_prompt_short_output": 3.0, "overload": 6.0,
             "long_prompt_bursts": 2.6}
# Autoscaling runs the synthetic workloads at these rates instead, for --autoscale-minutes: loads whose peaks a
# 2..12 deployment can hold (multiscale_bursts at 10 req/s needs 18 fixed replicas), so that every bound of the
# sweep has a fixed baseline to lose to. long_prompt_bursts: the bursty long-prompt load, 2.6 req/s.
AUTOSCALE_RATE = {**BASE_RATE, "multiscale_bursts": 5.0}
ROUTING_WORKLOADS = "mooncake,azure,shared_prefix,multiscale_bursts,long_prompt_short_output,overload"
ROUTING_POLICIES = ("kvpilot", "sglang", "prefix_affinity", "llmd", "dynamo", "pow2", "round_robin", "least_kv")
AUTOSCALERS = ("kvpilot", "ray_default", "queue", "kv_target")
SLO_GOAL = 0.99
GPU_GOAL = 0.9  # kvpilot's GPU-hours over the best holder's, at most (the goal)


def workload(name: str, scale: float, n: int | None, seed: int, max_model_len: int, minutes: float | None = None):
    """The first ``n`` requests, or (``minutes``) a synthetic run of that length at ``AUTOSCALE_RATE``, or a
    whole trace (both traces are about an hour at 1x)."""
    if name in TRACES:
        return load_trace(TRACE_DIR / TRACES[name], time_scale=scale, max_requests=None if minutes else n,
                          max_model_len=max_model_len)
    if minutes:
        rate = AUTOSCALE_RATE[name] * scale
        # Bursts start in their off half: the run begins quiet, as a deployment starts before its traffic. A
        # burst at t = 0 meets the 4 initial replicas whatever the policy (a new one serves only after its
        # start-up), while a fixed count starts ready: it would decide the comparison, not the policy.
        quiet = {"off_first": True} if name in ("multiscale_bursts", "long_prompt_bursts") else {}
        return SYNTHETIC[name](rate, math.ceil(rate * minutes * 60), seed=seed, **quiet)
    return SYNTHETIC[name](BASE_RATE[name] * scale, n, seed=seed)


def _route(job: tuple) -> dict:
    name, scale, policy, replicas, n, seed = job
    setup = make_setup(replicas)
    w = workload(name, scale, n, seed, setup.max_model_len)
    res, _, _ = simulate(w, policy, setup)
    d = res.to_dict()
    d.update(workload=name, scale=scale, offered_rps=w.summary()["rate_rps"])
    return d


def _scale(job: tuple) -> dict:
    name, scaler, lo, hi, minutes, seed, scale = job
    setup = make_setup(hi)
    w = workload(name, scale, None, seed, setup.max_model_len, minutes)
    params = {} if scaler in ("kvpilot", "fixed") else dict(TUNED.get(scaler, {}))
    kw = dict(min_replicas=lo, max_replicas=hi, initial_replicas=min(hi, max(lo, 4)))
    if scaler.startswith("fixed-"):
        k = int(scaler.split("-")[1])
        kw = dict(min_replicas=k, max_replicas=k, initial_replicas=k)
        scaler_name = "kvpilot"  # held to [k, k]: never changes the count
    else:
        scaler_name = scaler
    r = simulate_autoscale(w, scaler_name, setup, startup_s=default_startup_s(setup), params=params, **kw)
    return {"workload": name, "autoscaler": scaler, "bounds": [lo, hi], "gpu_hours": round(r.gpu_hours, 3),
            "requests": len(w.requests), "span_s": round(w.summary()["span_s"]),
            "slo_attainment": round(r.serving.slo_attainment, 5), "replicas_mean": round(r.replicas_mean, 2),
            "replicas_max": r.replicas_max, "ttft_p99_s": round(r.serving.ttft_p99_s, 2),
            "tpot_p99_s": round(r.serving.tpot_p99_s, 4), "setting": params}


def _available(names: list[str]) -> list[str]:
    out = []
    for n in names:
        if n in TRACES and not (TRACE_DIR / TRACES[n]).is_file():
            print(f"skip {n}: {TRACE_DIR / TRACES[n]} is absent ",
                  file=sys.stderr)
            continue
        out.append(n)
    return out


def routing(ns, ex) -> list[dict]:
    names = _available(ns.workloads.split(","))
    scales = [float(s) for s in ns.scales.split(",")]
    policies = ns.policies.split(",")
    jobs = [(w, s, p, ns.replicas, ns.requests, ns.seed) for w in names for s in scales for p in policies]
    rows = list(ex.map(_route, jobs))
    print(f"\n## Routing, {ns.replicas} replicas, first {ns.requests} requests, defaults only\n")
    print("| workload | load | offered req/s | kvpilot goodput | best peer | peer goodput | ratio | kvpilot hit / best's | "
          "kvpilot preempt / best's |")
    print("|---|---|---|---|---|---|---|---|---|")
    losses = []
    for w in names:
        for s in scales:
            at = {r["policy"]: r for r in rows if r["workload"] == w and r["scale"] == s}
            k = at["kvpilot"]
            peers = [r for p, r in at.items() if p != "kvpilot"]
            if not peers:
                continue
            best = max(peers, key=lambda r: r["goodput_rps"])
            ratio = k["goodput_rps"] / best["goodput_rps"] if best["goodput_rps"] else float("inf")
            print(f"| {w} | {s:g}x | {k['offered_rps']:.2f} | {k['goodput_rps']:.3f} | {best['policy']} | "
                  f"{best['goodput_rps']:.3f} | {ratio:.2f} | {k['prefix_hit_rate']:.1%} / {best['prefix_hit_rate']:.1%} | "
                  f"{k['preemptions']} / {best['preemptions']} |")
            if ratio < 1.0:
                losses.append((w, s, ratio, best["policy"]))
    print("\nkvpilot below the best peer: " + ("; ".join(f"{w} {s:g}x {r:.2f}x of {p}" for w, s, r, p in losses)
                                             or "nowhere"))
    return rows


def autoscaling(ns, ex) -> list[dict]:
    names = _available(ns.autoscale_workloads.split(","))
    bounds = [tuple(int(x) for x in b.split("..")) for b in ns.bounds.split(",")]
    rows: list[dict] = []
    print(f"\n## Autoscaling, {ns.autoscale_minutes:g} min of each synthetic workload (traces whole), routing kvpilot, "
          "peers at TUNED, kvpilot defaults\n")
    print("| workload | bounds | autoscaler | GPU-h | SLO met | replicas mean / max |")
    print("|---|---|---|---|---|---|")
    summary = []
    fixed: dict[tuple[str, int], dict] = {}  # (workload, count) -> run: a fixed count is the same under any bounds
    for w in names:
        for lo, hi in bounds:
            base = (w, lo, hi, ns.autoscale_minutes, ns.seed, ns.autoscale_scale)
            got = list(ex.map(_scale, [(w, a, lo, hi, *base[3:]) for a in AUTOSCALERS]))
            k = next(r for r in got if r["autoscaler"] == "kvpilot")

            def run_fixed(n: int, w: str = w, base: tuple = base) -> dict:
                if (w, n) not in fixed:
                    fixed[(w, n)] = _scale((w, f"fixed-{n}", n, n, *base[3:]))
                return fixed[(w, n)]

            tried, best_fixed = smallest_fixed(run_fixed, lo, hi, guess=math.ceil(k["replicas_mean"]))
            got += [dict(r, bounds=[lo, hi]) for r in tried]
            rows += got
            for r in got:
                print(f"| {w} | {lo}..{hi} | {r['autoscaler']} | {r['gpu_hours']:.2f} | {r['slo_attainment']:.2%} | "
                      f"{r['replicas_mean']:.1f} / {r['replicas_max']} |", flush=True)
            holders = [r for r in got if r["autoscaler"] in AUTOSCALERS[1:] and r["slo_attainment"] >= SLO_GOAL]
            if best_fixed is not None:
                holders.append(best_fixed)
            ref = min(holders, key=lambda r: r["gpu_hours"]) if holders else None
            summary.append((w, lo, hi, k, ref))
    print("\n| workload | bounds | kvpilot GPU-h | kvpilot SLO | best holding 99% | its GPU-h | kvpilot / it |")
    print("|---|---|---|---|---|---|---|")
    for w, lo, hi, k, ref in summary:
        if ref is None:
            print(f"| {w} | {lo}..{hi} | {k['gpu_hours']:.2f} | {k['slo_attainment']:.2%} | none (not even {hi} fixed) | | |")
        else:
            print(f"| {w} | {lo}..{hi} | {k['gpu_hours']:.2f} | {k['slo_attainment']:.2%} | {ref['autoscaler']} | "
                  f"{ref['gpu_hours']:.2f} | {k['gpu_hours'] / ref['gpu_hours']:.2f} |")
    misses = [f"{w} {lo}..{hi}: " + ", ".join(
        ([f"SLO {k['slo_attainment']:.2%} < {SLO_GOAL:.0%}"] if k["slo_attainment"] < SLO_GOAL else [])
        + ([f"{k['gpu_hours'] / ref['gpu_hours']:.2f}x the GPU-h of {ref['autoscaler']} > {GPU_GOAL}x"]
           if ref is not None and k["gpu_hours"] > GPU_GOAL * ref["gpu_hours"] else []))
        for w, lo, hi, k, ref in summary
        if k["slo_attainment"] < SLO_GOAL or (ref is not None and k["gpu_hours"] > GPU_GOAL * ref["gpu_hours"])]
    print(f"\nkvpilot misses the goal (>= {SLO_GOAL:.0%} SLO, <= {GPU_GOAL}x the best holder's GPU-h): "
          + ("; ".join(misses) or "nowhere"))
    return rows


def smallest_fixed(run, lo: int, hi: int, guess: int) -> tuple[list[dict], dict | None]:
    """The runs tried and the smallest fixed count in [lo, hi] holding the goal (None: not even ``hi``).

    Attainment grows with the count: a bisection, its first probe at ``guess`` (kvpilot's mean count,
    rounded up), which usually splits the range near the answer."""
    seen: dict[int, dict] = {}

    def holds(m: int) -> bool:
        if m not in seen:
            seen[m] = run(m)
        return seen[m]["slo_attainment"] >= SLO_GOAL

    a, b = lo, hi + 1  # the answer is in [a, b]; b = hi + 1: none holds
    m = min(max(guess, lo), hi)
    while a < b:
        if holds(m):
            b = m
        else:
            a = m + 1
        m = (a + b) // 2
    return [seen[k] for k in sorted(seen)], seen.get(a) if a <= hi else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("routing", "autoscaling", "both"), default="both")
    ap.add_argument("--workloads", default=ROUTING_WORKLOADS)
    ap.add_argument("--policies", default=",".join(ROUTING_POLICIES))
    ap.add_argument("--scales", default="0.5,1,1.5,2,2.5")
    ap.add_argument("--replicas", type=int, default=16)
    ap.add_argument("--requests", type=int, default=1500)
    # mooncake and long_prompt_short_output are left out: a third of their prompts are too long to prefill
    # within the 2 s TTFT target even alone (24 fixed replicas hold 71% and 31%), so no policy can hold 99%.
    ap.add_argument("--autoscale-workloads", default="azure,multiscale_bursts,long_prompt_bursts,overload")
    ap.add_argument("--autoscale-minutes", type=float, default=60.0,
                    help="length of the synthetic runs: long against the start-up and the downscale delay")
    ap.add_argument("--autoscale-scale", type=float, default=1.0, help="load of the autoscaling runs (x base rate)")
    ap.add_argument("--bounds", default="2..12,2..24")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--json")
    ns = ap.parse_args()
    t0 = time.perf_counter()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    print(f"{datetime.now():%Y-%m-%d %H:%M} commit {commit}: {' '.join(sys.argv)}")
    out: dict = {"date": f"{datetime.now():%Y-%m-%d %H:%M}", "commit": commit, "argv": sys.argv, "base_rate": BASE_RATE}
    with ProcessPoolExecutor(ns.jobs) as ex:
        if ns.part in ("routing", "both"):
            out["routing"] = routing(ns, ex)
        if ns.part in ("autoscaling", "both"):
            out["autoscaling"] = autoscaling(ns, ex)
    print(f"\n{time.perf_counter() - t0:.0f} s")
    if ns.json:
        Path(ns.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
