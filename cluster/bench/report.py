"""A run's report: a rich table on the terminal, JSON, and PNG plots (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from cluster.bench.metrics import RequestRecord

_LATENCIES = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E latency"))


def _ms(v: float | None) -> str:
    return "–" if v is None else f"{v:,.1f}"


def describe_mode(cfg: dict[str, Any]) -> str:
    if cfg["mode"] == "concurrency":
        return f"closed loop, {cfg['concurrency']} concurrent"
    if cfg["mode"] == "rate":
        process = "Poisson" if cfg["burstiness"] == 1 else f"Gamma, burstiness {cfg['burstiness']:g}"
        return f"{cfg['rate']:g} req/s ({process})"
    return f"trace timestamps ÷ {cfg['time_scale']:g}"


def render(result: dict[str, Any], console: Console) -> None:
    """The summary of ``BenchResult.to_dict()`` as two tables and a few lines."""
    s, cfg, w = result["summary"], result["config"], result["workload"]
    mode = describe_mode(cfg)
    t = Table(title=f"{cfg['model']} at {cfg['base_url']}: {mode}", title_justify="left", show_header=False)
    t.add_row("workload", f"{w['name']} ({w['source']}), {w['num_requests']} requests, {w['prompt_format']} prompts")
    t.add_row("lengths (mean)", f"prompt {w['input_len_mean']:,.1f}, output {w['output_len_mean']:,.1f} tokens")
    t.add_row("scaling", w["scaling"])
    t.add_row("completed / failed", f"{s['completed']:,} / {s['failed']:,}"
              + (f"  ({', '.join(f'{k}: {v}' for k, v in s['errors'].items())})" if s["errors"] else ""))
    t.add_row("duration", f"{s['duration_s']:.2f} s")
    t.add_row("request throughput", f"{s['request_throughput']:.2f} req/s")
    t.add_row("output throughput", f"{s['output_throughput']:,.1f} tok/s")
    t.add_row("total token throughput", f"{s['total_token_throughput']:,.1f} tok/s")
    slo = s["slo"]
    t.add_row(f"goodput (TTFT ≤ {slo['ttft_s']:g} s, TPOT ≤ {slo['tpot_s'] * 1000:g} ms)",
              f"{s['goodput']:.2f} req/s ({s['slo_attainment']:.1%} of requests)")
    t.add_row("tokens: prompt / output / cached",
              f"{s['prompt_tokens']:,} / {s['output_tokens']:,} / {s['cached_tokens']:,}")
    if s["tokens_per_chunk"] is not None:
        t.add_row("output tokens per streamed chunk", f"{s['tokens_per_chunk']:.2f}")
    console.print(t)

    keys = [k for k in s["ttft_ms"] if k.startswith("p")]
    lt = Table(title="latency (ms)", title_justify="left")
    lt.add_column("metric")
    for k in ["mean", *keys, "max"]:
        lt.add_column(k, justify="right")
    for key, label in _LATENCIES:
        d = s[key]
        lt.add_row(label, *(_ms(d[k]) for k in ["mean", *keys, "max"]))
    console.print(lt)
    for kind, msg in s.get("error_examples", {}).items():
        console.print(f"  error {kind}: {msg}", highlight=False, markup=False)
    if s["output_len_mismatches"]:
        console.print(f"  [yellow]warning:[/yellow] {s['output_len_mismatches']} requests returned another output "
                      "length than requested (does the server honour ignore_eos?)", highlight=False)
    if s["usage_missing"]:
        console.print(f"  [yellow]warning:[/yellow] {s['usage_missing']} streams had no usage chunk: output tokens "
                      "counted as chunks", highlight=False)
    env = result["environment"]
    console.print(f"  load average before/after: {env['loadavg_before'][0]:.2f} / {env['loadavg_after'][0]:.2f} "
                  f"on {env['cpu_count']} CPUs", highlight=False)


def _cdf(ax: Any, values_ms: list[float], label: str) -> None:
    if not values_ms:
        return
    v = np.sort(np.asarray(values_ms))
    ax.plot(v, np.arange(1, v.size + 1) / v.size, label=label)


def latency_samples(records: list[RequestRecord]) -> dict[str, list[float]]:
    done = [r for r in records if r.ok]
    return {
        "ttft_ms": [r.ttft_s * 1000 for r in done],
        "tpot_ms": [t * 1000 for r in done if (t := r.tpot_s) is not None],
        "itl_ms": [g * 1000 for r in done for g in r.itl_s],
        "e2e_ms": [r.latency_s * 1000 for r in done],
    }


def plot_cdfs(runs: dict[str, list[RequestRecord]], path: str | Path, title: str = "") -> Path:
    """Latency CDFs (TTFT, TPOT, ITL, E2E), one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (key, label) in zip(axes.flat, _LATENCIES):
        for name, records in runs.items():
            _cdf(ax, latency_samples(records)[key], name)
        ax.set_xlabel(f"{label} (ms)")
        ax.set_ylabel("fraction of requests" if key != "itl_ms" else "fraction of gaps")
        ax.grid(alpha=0.3)
        if key in ("itl_ms", "e2e_ms"):
            ax.set_xscale("symlog", linthresh=1.0)
        if len(runs) > 1 or key == "ttft_ms":
            ax.legend(fontsize=8)
    return _save(fig, path, title)


def plot_timeline(timelines: dict[str, dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Output tokens/s and requests in flight over the run, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for name, tl in timelines.items():
        top.plot(tl["t_s"], tl["output_tok_s"], label=name)
        bottom.plot(tl["t_s"], tl["in_flight"], label=name)
    top.set_ylabel("output tokens/s")
    bottom.set_ylabel("requests in flight")
    bottom.set_xlabel("time since start (s)")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path, title)


def _save(fig: Any, path: str | Path, title: str) -> Path:
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
