"""LoRA routing in the simulator: kvpilot against llm-d's and AIBrix's LoRA routing and adapter-blind pow2.

    flock /tmp/kvpilot-heavy.lock .venv/bin/python benchmarks/sim_lora.py

Requests: ShareGPT lengths (``benchmarks/traces/sharegpt_8k_...csv``, rows in a seeded order),
Poisson arrivals, each naming one of ``--adapters`` (50) LoRA adapters with Zipf popularity
(``--zipf``, s = 1.0; ``cluster.sim.lora.with_adapters``). Replicas: the simulator's
Llama-2-70B AWQ on H100 TP=2 with ``--max-loras`` (4) adapters a batch and ``--max-cpu-loras``
(16) in host memory; an adapter load costs its bytes over the assumed bandwidths
(``cluster.sim.lora``). The loads are fractions (``--loads``, 0.6 and 0.9) of the cluster's
capacity, measured first: the completion rate of the same requests without adapters, all
arriving at once, under pow2 (``--capacity`` skips the measurement). Writes
``benchmarks/results/lora-sim-<date>/`` (README.md with the table, results.json).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cluster.sim.lora import lora_spec_for, with_adapters  # noqa: E402
from cluster.sim.simulator import make_setup, simulate  # noqa: E402
from cluster.sim.workload import load_length_table  # noqa: E402

TRACE = ROOT / "benchmarks/traces/sharegpt_8k_filtered_stats_llama2_tokenizer.csv"
POLICIES = ("kvpilot", "llmd_lora", "aibrix_lora", "pow2")
PEERS = POLICIES[1:]
HOT = "lora-0"  # the most popular adapter


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--replicas", type=int, default=16)
    ap.add_argument("--requests", type=int, default=8000)
    ap.add_argument("--loads", default="0.6,0.9", help="fractions of the measured capacity")
    ap.add_argument("--capacity", type=float, help="req/s; default: measured (pow2, no adapters, all at once)")
    ap.add_argument("--adapters", type=int, default=50)
    ap.add_argument("--zipf", type=float, default=1.0)
    ap.add_argument("--base-share", type=float, default=0.0, help="share of base-model requests")
    ap.add_argument("--max-loras", type=int, default=4)
    ap.add_argument("--max-cpu-loras", type=int, default=16)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--h2d-gbps", type=float, default=25.0, help="host-to-GPU GB/s (assumed)")
    ap.add_argument("--disk-gbps", type=float, default=2.0, help="disk-to-host GB/s (assumed)")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", help="results folder (default benchmarks/results/lora-sim-<date>)")
    return ap.parse_args(argv)


def _workload(ns: argparse.Namespace, rate: float, adapters: bool):
    w = load_length_table(TRACE, rate=rate, seed=ns.seed, max_requests=ns.requests, max_model_len=32768)
    return with_adapters(w, ns.adapters, ns.zipf, ns.base_share, seed=ns.seed) if adapters else w


def _setup(ns: argparse.Namespace, lora: bool):
    setup = make_setup(ns.replicas, seed=ns.seed)
    if not lora:
        return setup
    spec = lora_spec_for(setup.model, ns.rank, max_loras=ns.max_loras, max_cpu_loras=ns.max_cpu_loras,
                         h2d_bytes_per_s=ns.h2d_gbps * 1e9, disk_bytes_per_s=ns.disk_gbps * 1e9)
    return replace(setup, lora=spec)


def measure_capacity(ns: argparse.Namespace) -> float:
    """Completions per second of the adapter-free requests, all arriving within a second (pow2)."""
    res, _, _ = simulate(_workload(ns, rate=ns.requests, adapters=False), "pow2", _setup(ns, lora=False))
    return res.throughput_rps


def run_one(job: tuple[argparse.Namespace, float, float, str]) -> dict:
    """One policy at one load: the simulator's metrics, plus the adapters' loads and the hot adapter's spread."""
    ns, load, rate, policy = job
    res, sims, reps = simulate(_workload(ns, rate, adapters=True), policy, _setup(ns, lora=True))
    d = res.to_dict()
    n = len(reps)
    d.update(load=load, offered_rps=rate,
             adapter_loads_per_replica=sum(r.lora_loads for r in reps) / n,
             disk_loads_per_replica=sum(r.lora_disk_loads for r in reps) / n,
             load_s_per_replica=sum(r.lora_load_s for r in reps) / n,
             batch_adapters_peak=max(r.lora_batch_peak for r in reps),
             hot_adapter_replicas=len({q.replica for q in sims if q.adapter == HOT}),
             adapters_per_replica=sum(len({q.adapter for q in sims if q.replica == i}) for i in range(n)) / n)
    return d


def _ratios(rows: list[dict], load: float) -> dict:
    """kvpilot ÷ the best peer at one load: goodput (higher is better) and TTFT p90 (lower is better)."""
    at = {r["policy"]: r for r in rows if r["load"] == load}
    peers = [at[p] for p in PEERS if p in at]
    if "kvpilot" not in at or not peers:
        return {}
    best_g = max(peers, key=lambda r: r["goodput_rps"])
    best_t = min(peers, key=lambda r: r["ttft_p90_s"])
    k = at["kvpilot"]
    return {"goodput": k["goodput_rps"] / best_g["goodput_rps"] if best_g["goodput_rps"] else float("inf"),
            "goodput_peer": best_g["policy"], "ttft_p90": k["ttft_p90_s"] / best_t["ttft_p90_s"],
            "ttft_peer": best_t["policy"]}


def table(rows: list[dict], loads: list[float]) -> str:
    head = ("| load | policy | goodput req/s | SLO met | TTFT p50 / p90 s | TPOT p50 ms | GPU loads / replica "
            "| disk loads / replica | replicas serving lora-0 | adapters / replica |\n|" + "---|" * 10)
    lines = [head]
    for load in loads:
        for r in (r for r in rows if r["load"] == load):
            lines.append(f"| {load:g}× ({r['offered_rps']:.2f} req/s) | {r['policy']} | {r['goodput_rps']:.3f} "
                         f"| {r['slo_attainment']:.1%} | {r['ttft_p50_s']:.2f} / {r['ttft_p90_s']:.2f} "
                         f"| {r['tpot_p50_s'] * 1e3:.0f} | {r['adapter_loads_per_replica']:.1f} "
                         f"| {r['disk_loads_per_replica']:.1f} | {r['hot_adapter_replicas']} "
                         f"| {r['adapters_per_replica']:.1f} |")
    for load in loads:
        q = _ratios(rows, load)
        if q:
            lines.append(f"\nAt {load:g}×: kvpilot's goodput is {q['goodput']:.2f}× the best peer's "
                         f"({q['goodput_peer']}), its TTFT p90 {q['ttft_p90']:.2f}× the best peer's ({q['ttft_peer']}).")
    return "\n".join(lines)


def _commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "cluster", "benchmarks/sim_lora.py"],
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except OSError:
        return "unknown"


def write_results(ns: argparse.Namespace, argv: list[str], capacity: float, measured: bool, rows: list[dict],
                  wall_s: float) -> Path:
    out = Path(ns.out) if ns.out else ROOT / f"benchmarks/results/lora-sim-{date.today():%Y%m%d}"
    out.mkdir(parents=True, exist_ok=True)
    loads = [float(x) for x in ns.loads.split(",")]
    setup = _setup(ns, lora=True)
    spec = setup.lora
    cmd = "flock /tmp/kvpilot-heavy.lock .venv/bin/python benchmarks/sim_lora.py " + " ".join(argv)
    text = f"""# LoRA routing in the simulator, {date.today():%Y-%m-%d}

Commit {_commit()}; {wall_s:.0f} s of wall time on this 2-core VM.

    {cmd.strip()}

{ns.replicas} replicas of Llama-2-70B AWQ (H100, TP=2); {ns.requests} ShareGPT-length requests, Poisson
arrivals (seed {ns.seed}), each naming one of {ns.adapters} adapters with Zipf popularity (s = {ns.zipf:g};
{ns.base_share:.0%} base-model requests). max_loras {spec.max_loras}, max_cpu_loras {spec.max_cpu_loras};
a rank-{ns.rank} adapter is {spec.file_bytes / 1e6:.0f} MB ({spec.gpu_bytes / 1e6:.0f} MB per GPU): a GPU load
{spec.gpu_load_s * 1e3:.0f} ms at {ns.h2d_gbps:g} GB/s, a disk load {spec.disk_load_s * 1e3:.0f} ms more at
{ns.disk_gbps:g} GB/s (assumed bandwidths, `cluster/sim/lora.py`). Capacity {capacity:.2f} req/s
({'measured: pow2, no adapters, all requests at once' if measured else 'given'}); loads are fractions of it.
SLO: TTFT ≤ {setup.slo.ttft_s:g} s and TPOT ≤ {setup.slo.tpot_s * 1e3:.0f} ms; goodput counts requests meeting both.
Engine stats (and the adapters they hold) reach the router every {setup.stats_period_s:g} s.

{table(rows, loads)}
"""
    (out / "README.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"capacity_rps": capacity, "capacity_measured": measured,
                                                  "lora": spec.to_dict(), "rows": rows}, indent=1))
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ns = _args(argv)
    t0 = time.perf_counter()
    measured = ns.capacity is None
    capacity = measure_capacity(ns) if measured else ns.capacity
    print(f"capacity {capacity:.2f} req/s ({'measured' if measured else 'given'})", flush=True)
    loads = [float(x) for x in ns.loads.split(",")]
    jobs = [(ns, load, load * capacity, p) for load in loads for p in ns.policies.split(",")]
    with ProcessPoolExecutor(ns.jobs) as ex:
        rows = list(ex.map(run_one, jobs))
    print(table(rows, loads))
    out = write_results(ns, argv, capacity, measured, rows, time.perf_counter() - t0)
    print(f"wrote {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
