"""``kvpilot simulate``: replay a trace through simulated replicas under each routing policy.

Wired into ``cluster/cli/kvpilot.py`` with ``add_simulate_parser(subparsers)`` and the
handler ``run_simulate(ns, console) -> exit status``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cluster.config import ClusterConfig
from cluster.routing.policies import POLICIES
from cluster.sim.autoscale import (AUTOSCALERS, DEFAULT_PERIOD_S, LOAD_BYTES_PER_S, TUNED, WARMUP_S, AutoscaleResult,
                                   default_startup_s, simulate_autoscale)
from cluster.sim.metrics import PolicyResult
from cluster.sim.perfmodel import HBM_BYTES_PER_S
from cluster.sim.profile import load_profile
from cluster.sim.simulator import (DEFAULT_MAX_MODEL_LEN, DEFAULT_STATS_PERIOD_S, Setup, make_setup, profiled_setup,
                                   simulate)
from cluster.sim.workload import Workload, load_trace
from cluster.traces import DEFAULT_TPOT_SLO_S, DEFAULT_TTFT_SLO_S, SLO

PROGRESS_MIN_REQUESTS = 2000  # below this a run takes about a second: no bar
# Autoscale defaults, chosen for the Azure conversation trace at --time-scale 2 (11 req/s, 29 min):
# demand there needs 2-3 replicas in the troughs and 5 at the peak (a fixed 5 meets the SLO:
# benchmarks/results/fixed-replicas-20261201); 4 are ready at t = 0 (what the first minutes need)
# and 12 at most leave room above the peak.
AUTOSCALE_MIN, AUTOSCALE_MAX, AUTOSCALE_INITIAL = 2, 12, 4


def add_simulate_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "simulate", help="replay a trace through simulated vLLM replicas under each routing policy",
        description="Discrete-event simulation of N vLLM replicas (Llama-2-70B AWQ, TP=2, H100 by default) behind "
                    "a router; compares routing policies on TTFT, TPOT, goodput and prefix hits.")
    p.add_argument("--trace", required=True, help="Mooncake JSONL, Azure CSV, or a length table (with --rate)")
    p.add_argument("--replicas", type=int, default=16, help="engines behind the router (default 16)")
    p.add_argument("--policies", default=",".join(POLICIES), help="comma-separated; default: all")
    p.add_argument("--time-scale", type=float, default=1.0, help="divide arrival times by X (2 = twice the rate)")
    p.add_argument("--stats-period", type=float,
                   help="seconds between engine stats reports to the router (Ray Serve's default is 10; 0 = fresh; "
                        f"default {DEFAULT_STATS_PERIOD_S:g}, with --profile the config's routing.stats_period_s)")
    p.add_argument("--max-requests", type=int, help="replay only the first M requests")
    p.add_argument("--max-model-len", type=int, default=DEFAULT_MAX_MODEL_LEN,
                   help=f"clip longer requests (default {DEFAULT_MAX_MODEL_LEN})")
    p.add_argument("--rate", type=float, help="length tables only: arrivals per second")
    p.add_argument("--cv", type=float, default=1.0, help="length tables only: Gamma CV of inter-arrivals (1 = Poisson)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gpu", choices=sorted(HBM_BYTES_PER_S), default="H100-80GB", help="profiled GPUs only")
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size of a replica")
    p.add_argument("--ttft-slo", type=float, default=DEFAULT_TTFT_SLO_S, help="seconds (goodput)")
    p.add_argument("--tpot-slo", type=float, default=DEFAULT_TPOT_SLO_S, help="seconds (goodput)")
    p.add_argument("--set", action="append", default=[], metavar="POLICY.PARAM=VALUE",
                   help="a policy parameter, e.g. kvpilot.kv_high=0.85 (repeatable)")
    p.add_argument("--profile", type=Path,
                   help="simulate a deployed model as measured: a file from kvpilot bench --profile (its step "
                        "model and per-request serving delay); needs --config")
    p.add_argument("--config", type=Path, help="with --profile: the Serve config of the deployment (its model's "
                                               "KV cache, batch limits and routing, as planned)")
    p.add_argument("--model", help="with --profile: the model in --config (default: the profile's model)")
    p.add_argument("--json", action="store_true", help="print results as JSON (no table, no plot unless --plot)")
    p.add_argument("--plot", help="PNG path (default without --json: sim-<trace>.png)")
    a = p.add_argument_group("autoscaling (--autoscale)")
    a.add_argument("--autoscale", action="store_true",
                   help="compare autoscalers instead of routing policies: the replica count changes over time")
    a.add_argument("--autoscalers", default=",".join(AUTOSCALERS), help="comma-separated; default: all")
    a.add_argument("--min-replicas", type=int, default=AUTOSCALE_MIN, help=f"default {AUTOSCALE_MIN}")
    a.add_argument("--max-replicas", type=int, default=AUTOSCALE_MAX, help=f"default {AUTOSCALE_MAX}")
    a.add_argument("--initial-replicas", type=int, default=AUTOSCALE_INITIAL,
                   help=f"ready at t = 0 (default {AUTOSCALE_INITIAL})")
    a.add_argument("--startup-s", type=float,
                   help="seconds from asking for a replica to its first request (default: weights / "
                        f"{LOAD_BYTES_PER_S / 1e9:g} GB/s + {WARMUP_S:g} s warm-up: 133 s for the default model)")
    a.add_argument("--autoscale-period", type=float, default=DEFAULT_PERIOD_S,
                   help=f"seconds of simulated time between autoscaler runs (default {DEFAULT_PERIOD_S:g})")
    a.add_argument("--routing", default="kvpilot", help="routing policy during autoscale runs (default kvpilot)")
    a.add_argument("--untuned", action="store_true",
                   help="run the peers on their own defaults instead of their tuned settings")
    return p


def _policy_params(items: list[str], policies: list[str], flag: str = "--policies") -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        name, dot, param = key.partition(".")
        if not (sep and dot and param):
            raise ValueError(f"--set: {item!r} is not POLICY.PARAM=VALUE")
        if param in ("clock", "seed"):
            raise ValueError(f"--set: {param!r} is set by the simulator (use --seed for the seed)")
        if name not in policies:
            raise ValueError(f"--set: {name!r} is not among {flag} ({', '.join(policies)})")
        try:
            out.setdefault(name, {})[param] = float(value)
        except ValueError:
            raise ValueError(f"--set: {item!r}: {value!r} is not a number") from None
    return out


def _setup(ns: argparse.Namespace, replicas: int) -> Setup:
    """The simulated replica: the default 70B AWQ one (``--gpu``, ``--tp``), or a deployed model as profiled."""
    slo = SLO(ns.ttft_slo, ns.tpot_slo)
    if ns.profile is None:
        for flag in ("config", "model"):
            if getattr(ns, flag) is not None:
                raise ValueError(f"--{flag}: {getattr(ns, flag)} applies only with --profile")
        period = DEFAULT_STATS_PERIOD_S if ns.stats_period is None else ns.stats_period
        return make_setup(replicas, max_model_len=ns.max_model_len, accelerator=ns.gpu, tensor_parallel_size=ns.tp,
                          stats_period_s=period, seed=ns.seed, slo=slo)
    if ns.config is None:
        raise ValueError(f"--profile: {ns.profile} needs --config, the Serve config of the deployment it measured "
                         "(its KV cache and batch limits)")
    for flag, default in (("gpu", "H100-80GB"), ("tp", 2), ("max_model_len", DEFAULT_MAX_MODEL_LEN)):
        if getattr(ns, flag) != default:
            raise ValueError(f"--{flag.replace('_', '-')}: {getattr(ns, flag)} does not apply with --profile "
                             f"(the model in --config is simulated as configured)")
    profile = load_profile(ns.profile)
    cluster_cfg = ClusterConfig.from_serve_yaml(ns.config)
    name = ns.model or profile.model
    try:
        cfg = cluster_cfg.model(name)
    except KeyError:
        raise ValueError(f"--model: {name!r} is not a model of {ns.config} "
                         f"({', '.join(m.name for m in cluster_cfg.models)})") from None
    return profiled_setup(cfg, profile, replicas, stats_period_s=ns.stats_period, seed=ns.seed, slo=slo)


def run_simulate(ns: argparse.Namespace, console: Console) -> int:
    if ns.autoscale:
        return run_autoscale(ns, console)
    policies = [p.strip() for p in ns.policies.split(",") if p.strip()]
    unknown = [p for p in policies if p not in POLICIES]
    if not policies or unknown:
        raise ValueError(f"--policies: {', '.join(unknown) or 'none given'}; choose from {', '.join(POLICIES)}")
    if ns.max_requests is not None and ns.max_requests < 1:
        raise ValueError(f"--max-requests: {ns.max_requests} must be >= 1")
    params = _policy_params(ns.set, policies)
    setup = _setup(ns, ns.replicas)
    workload = load_trace(ns.trace, time_scale=ns.time_scale, max_requests=ns.max_requests,
                          max_model_len=setup.max_model_len, rate=ns.rate, cv=ns.cv, seed=ns.seed)
    if not workload.requests:
        raise ValueError(f"--trace: {ns.trace} holds no requests")
    results = _run_all(workload, policies, setup, params)
    plot = ns.plot or (None if ns.json else f"sim-{Path(ns.trace).stem}.png")
    if plot:
        write_plot(results, workload, setup, plot)
    if ns.json:
        print(json.dumps(report(results, workload, setup, plot), indent=2))
    else:
        render(results, workload, setup, console, plot)
    return 0


def _run_all(workload: Workload, policies: list[str], setup: Setup,
             params: dict[str, dict[str, float]]) -> list[PolicyResult]:
    err = Console(stderr=True)
    show = len(workload.requests) >= PROGRESS_MIN_REQUESTS
    results = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True, disable=not show) as bar:
        for name in policies:
            task = bar.add_task(f"simulating {name}", total=len(workload.requests))
            res, _, _ = simulate(workload, name, setup, policy_params=params.get(name),
                                 progress=lambda done, t=task: bar.update(t, completed=done))
            bar.remove_task(task)
            results.append(res)
    return results


def report(results: list[PolicyResult], workload: Workload, setup: Setup, plot: str | None) -> dict:
    step = setup.step
    return {
        "policies": {r.policy: r.to_dict() for r in results},
        "perf_model": {
            "formula": step.describe(),
            "coefficients_ms": {k: round(getattr(step, k), 9) for k in
                                ("c0_decode", "c0_prefill", "c_prefill", "c_attn", "c_decode", "c_kv")},
            "fit": {k: round(v, 6) if isinstance(v, float) else v for k, v in step.fit.__dict__.items()},
            "fitted_on": (f"a profile of {setup.model.name} (kvpilot bench --profile)" if step.hardware == "measured"
                          else f"{step.hardware} TP={step.tp} fp16 rows of splitwise_sim_perf_model.csv"),
            "assumptions": step.assumptions,
        },
        "trace": workload.summary(),
        "setup": setup.to_dict(),
        "plot": plot,
    }


def _s(x: float) -> str:
    return f"{x:.2f}" if x < 10 else f"{x:.1f}"


def render(results: list[PolicyResult], workload: Workload, setup: Setup, console: Console, plot: str | None) -> None:
    w = workload.summary()
    console.print(f"{w['name']}: {w['requests']:,} requests over {w['span_s']:.0f} s; {setup.replicas} × "
                  f"{setup.model.name} ({setup.model.accelerator}, TP={setup.model.tensor_parallel_size}, "
                  f"{setup.num_blocks:,} KV blocks); engine stats every {setup.stats_period_s:g} s", highlight=False)
    best = max(r.goodput_rps for r in results)
    t = Table(box=box.SIMPLE_HEAD, title="serving", title_justify="left")
    for col in ("policy", "goodput/s", "SLO met", "done", "prefix hit", "preempt", "load CV", "wall s"):
        t.add_column(col, justify="left" if col == "policy" else "right")
    for r in results:
        mark = (lambda x: f"[bold]{x}[/bold]") if r.goodput_rps == best else (lambda x: x)
        t.add_row(mark(r.policy), mark(f"{r.goodput_rps:.3f}"), f"{r.slo_attainment:.1%}", f"{r.completed:,}",
                  f"{r.prefix_hit_rate:.1%}", f"{r.preemptions:,}", f"{r.load_cv:.3f}", f"{r.wall_s:.1f}")
    console.print(t)
    t = Table(box=box.SIMPLE_HEAD, title="latency (TTFT, E2E in s; TPOT, ITL in ms)", title_justify="left")
    for col in ("policy", "TTFT p50", "p90", "p99", "TPOT p50", "p90", "ITL p99", "E2E p50", "p90"):
        t.add_column(col, justify="left" if col == "policy" else "right")
    for r in results:
        t.add_row(r.policy, _s(r.ttft_p50_s), _s(r.ttft_p90_s), _s(r.ttft_p99_s), f"{r.tpot_p50_s * 1e3:.0f}",
                  f"{r.tpot_p90_s * 1e3:.0f}", f"{r.itl_p99_s * 1e3:.0f}", _s(r.e2e_p50_s), _s(r.e2e_p90_s))
    console.print(t)
    f = setup.step.fit
    console.print(f"  SLO: TTFT ≤ {setup.slo.ttft_s:g} s and TPOT ≤ {setup.slo.tpot_s:g} s; latencies in seconds",
                  highlight=False)
    console.print(f"  perf model: {setup.step.describe()}", highlight=False)
    console.print(f"  perf model fit on {f.rows} rows: MAPE {f.mape:.1%} (prefill {f.mape_prefill:.1%}, "
                  f"decode {f.mape_decode:.1%}), max {f.max_ape:.0%}, R² {f.r2:.4f}", highlight=False)
    for a in setup.step.assumptions + setup.notes + w["notes"]:
        console.print(f"  assumes: {a}", highlight=False)
    if plot:
        console.print(f"  plot: {plot}", highlight=False)


def write_plot(results: list[PolicyResult], workload: Workload, setup: Setup, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    colors = {r.policy: f"C{i % 10}" for i, r in enumerate(results)}
    for r in results:
        xs = r.ttft_samples
        if xs:
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            ax1.plot([max(x, 1e-3) for x in xs], ys, label=r.policy, color=colors[r.policy],
                     lw=2.2 if r.policy == "kvpilot" else 1.3)
    ax1.axvline(setup.slo.ttft_s, color="grey", ls="--", lw=1)
    ax1.set_xscale("log")
    ax1.set_xlabel("TTFT (s)")
    ax1.set_ylabel("fraction of requests")
    ax1.set_title(f"TTFT CDF: {workload.name}, {setup.replicas} replicas")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    names = [r.policy for r in results]
    ax2.bar(names, [r.goodput_rps for r in results], color=[colors[n] for n in names])
    ax2.set_ylabel("goodput (req/s)")
    ax2.set_title(f"goodput (TTFT ≤ {setup.slo.ttft_s:g} s, TPOT ≤ {setup.slo.tpot_s:g} s)")
    ax2.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- autoscaling -----------------------------------------------------------


def run_autoscale(ns: argparse.Namespace, console: Console) -> int:
    names = [a.strip() for a in ns.autoscalers.split(",") if a.strip()]
    unknown = [a for a in names if a not in AUTOSCALERS]
    if not names or unknown:
        raise ValueError(f"--autoscalers: {', '.join(unknown) or 'none given'}; choose from {', '.join(AUTOSCALERS)}")
    if ns.routing not in POLICIES:
        raise ValueError(f"--routing: {ns.routing!r}; choose from {', '.join(POLICIES)}")
    if ns.max_requests is not None and ns.max_requests < 1:
        raise ValueError(f"--max-requests: {ns.max_requests} must be >= 1")
    if ns.startup_s is not None and ns.startup_s < 0:
        raise ValueError(f"--startup-s: {ns.startup_s} must be >= 0")
    params = _policy_params(ns.set, names, "--autoscalers")
    setup = _setup(ns, max(1, ns.max_replicas))
    startup = default_startup_s(setup) if ns.startup_s is None else ns.startup_s
    workload = load_trace(ns.trace, time_scale=ns.time_scale, max_requests=ns.max_requests,
                          max_model_len=setup.max_model_len, rate=ns.rate, cv=ns.cv, seed=ns.seed)
    if not workload.requests:
        raise ValueError(f"--trace: {ns.trace} holds no requests")
    err = Console(stderr=True)
    results = []
    show = len(workload.requests) >= PROGRESS_MIN_REQUESTS
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True, disable=not show) as bar:
        for name in names:
            p = {} if ns.untuned else dict(TUNED.get(name, {}))
            p.update(params.get(name, {}))
            task = bar.add_task(f"autoscaling {name}", total=len(workload.requests))
            results.append(simulate_autoscale(
                workload, name, setup, min_replicas=ns.min_replicas, max_replicas=ns.max_replicas,
                initial_replicas=ns.initial_replicas, startup_s=startup, period_s=ns.autoscale_period,
                routing=ns.routing, params=p, progress=lambda done, t=task: bar.update(t, completed=done)))
            bar.remove_task(task)
    plot = ns.plot or (None if ns.json else f"autoscale-{Path(ns.trace).stem}.png")
    if plot:
        write_autoscale_plot(results, workload, setup, plot)
    rep = autoscale_report(results, workload, setup, plot, ns)
    if ns.json:
        print(json.dumps(rep, indent=2))
    else:
        render_autoscale(results, rep, console)
    return 0


def autoscale_report(results: list[AutoscaleResult], workload: Workload, setup: Setup, plot: str | None,
                     ns: argparse.Namespace) -> dict:
    r0 = results[0]
    return {
        "autoscalers": {r.autoscaler: r.to_dict() for r in results},
        "autoscale": {"min_replicas": ns.min_replicas, "max_replicas": ns.max_replicas,
                      "initial_replicas": ns.initial_replicas, "startup_s": r0.startup_s,
                      "startup_basis": f"weights {setup.plan.per_gpu.weights_bytes * setup.plan.tensor_parallel_size / 1e9:.1f} GB "
                                       f"/ {LOAD_BYTES_PER_S / 1e9:g} GB/s + {WARMUP_S:g} s warm-up"
                                       if ns.startup_s is None else "--startup-s",
                      "period_s": ns.autoscale_period, "routing": ns.routing,
                      "gpus_per_replica": setup.plan.tensor_parallel_size * setup.plan.pipeline_parallel_size,
                      "tuned": not ns.untuned},
        "trace": workload.summary(),
        "setup": {k: v for k, v in setup.to_dict().items() if k != "replicas"},
        "plot": plot,
    }


def render_autoscale(results: list[AutoscaleResult], rep: dict, console: Console) -> None:
    w, a = rep["trace"], rep["autoscale"]
    console.print(f"{w['name']}: {w['requests']:,} requests over {w['span_s']:.0f} s ({w['rate_rps']} req/s); "
                  f"replicas {a['min_replicas']}..{a['max_replicas']} ({a['initial_replicas']} at t=0), "
                  f"{a['gpus_per_replica']} GPUs each, start-up {a['startup_s']:g} s ({a['startup_basis']}), "
                  f"autoscaler every {a['period_s']:g} s, routing {a['routing']}", highlight=False)
    ok = [r for r in results if r.serving.slo_attainment >= 0.99]
    best = min((r.gpu_hours for r in ok), default=None)
    t = Table(box=box.SIMPLE_HEAD, title="autoscaling (TTFT in s, TPOT in ms; replicas billed: starting, serving, "
                                         "draining)", title_justify="left")
    for col in ("autoscaler", "GPU-h", "SLO met", "TTFT p50", "p99", "TPOT p50", "p99", "replicas min", "mean",
                "max", "scale ups", "downs", "setting"):
        t.add_column(col, justify="left" if col in ("autoscaler", "setting") else "right")
    for r in results:
        s = r.serving
        mark = (lambda x: f"[bold]{x}[/bold]") if r.gpu_hours == best else (lambda x: x)
        setting = ", ".join(f"{k}={v:g}" for k, v in sorted(r.setting.items()))
        t.add_row(mark(r.autoscaler), mark(f"{r.gpu_hours:.2f}"), f"{s.slo_attainment:.2%}", _s(s.ttft_p50_s),
                  _s(s.ttft_p99_s), f"{s.tpot_p50_s * 1e3:.0f}", f"{s.tpot_p99_s * 1e3:.0f}", str(r.replicas_min),
                  f"{r.replicas_mean:.2f}", str(r.replicas_max), str(r.scale_ups), str(r.scale_downs),
                  setting or "defaults")
    Console(width=max(console.width, 170), file=console.file, soft_wrap=True).print(t)
    console.print(f"  SLO: TTFT ≤ {rep['setup']['slo']['ttft_s']:g} s and TPOT ≤ {rep['setup']['slo']['tpot_s']:g} s; "
                  "bold: fewest GPU-hours among those with ≥ 99% SLO attainment", highlight=False)
    for n in w["notes"]:
        console.print(f"  assumes: {n}", highlight=False)
    if rep["plot"]:
        console.print(f"  plot: {rep['plot']}", highlight=False)


def write_autoscale_plot(results: list[AutoscaleResult], workload: Workload, setup: Setup, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.8))
    for i, r in enumerate(results):
        xs, ys = [row[0] / 60 for row in r.timeline], [row[1] for row in r.timeline]
        ax.step(xs, ys, where="post", color=f"C{i % 10}", lw=2.2 if r.autoscaler == "kvpilot" else 1.3,
                label=f"{r.autoscaler}: {r.gpu_hours:.2f} GPU-h, {r.serving.slo_attainment:.1%} SLO")
    ax.set_xlabel("time (min)")
    ax.set_ylabel("replicas (billed: starting, serving, draining)")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    bucket = 30.0
    arr = [q.arrival_s for q in workload.requests]
    n = int(max(arr) // bucket) + 1 if arr else 0
    counts = [0] * n
    for t in arr:
        counts[int(t // bucket)] += 1
    ax2.plot([(k + 0.5) * bucket / 60 for k in range(n)], [c / bucket for c in counts], color="grey", ls=":",
             lw=1.2, label="offered load")
    ax2.set_ylabel(f"offered requests/s ({bucket:g} s bins)")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper left")
    ax.set_title(f"replica count over time: {workload.name}, start-up {results[0].startup_s:g} s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
