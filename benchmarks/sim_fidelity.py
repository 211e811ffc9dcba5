"""Simulator fidelity: calibrate a CPU step model on the real tiny engine, then replay one trace slice
through the real kvpilot stack and through ``cluster.sim`` and compare TTFT, TPOT and throughput.

1. **Calibrate** (a subprocess running vLLM's offline ``LLM`` with the stack's own engine
   arguments, ``ModelConfig.engine_args()``; no Ray): a lone request of ``P`` prompt tokens and
   one output token (its wall time ≈ one prefill step plus the per-request overhead, like a
   lone request's TTFT), and ``B`` requests of ``L`` prompt tokens generating ``M1`` and ``M2``
   tokens (``(T(M2) − T(M1)) / (M2 − M1)`` = one decode step of ``B`` sequences at context
   ``L + (M1 + M2)/2``; the prefill and the per-request overhead cancel). Medians over
   ``--calib-reps`` runs, distinct random prompts each (no prefix-cache hits).
   ``cluster.sim.perfmodel.fit_rows`` fits ``StepModel`` to them; the in-sample fit error is printed.
2. **Simulate** the slice with that step model, the planner's KV blocks of the same config
   (block size 128), the same ``max_num_seqs`` / ``max_num_batched_tokens``, ``--replicas``
   replicas and the config's routing policy (kvpilot) and stats period.
3. **Profile** the stack, idle, before any replay, as a user would (``kvpilot bench --profile``:
   ``cluster.bench.profile``: lone-request TTFT by prompt length, a cached prompt, inter-token
   gaps by batch), and simulate the slice again with the profile's step model and per-request
   serving delay (``cluster.sim.profile``; ``--no-profile`` skips it). Then measure what the engines
   and the rest of the stack take of this host's cores (``measure_host``: one engine stepping alone,
   and the non-engine CPU per output token with 8 streams) and simulate once more with the engines
   slowed when they share the cores (``cluster.sim.host``; ``--no-host-share`` skips it).
4. **Replay** the same slice (same arrival offsets, lengths, output lengths with ``ignore_eos``)
   against the real stack (``fault_stack.LocalStack``: its own Ray, Serve, kvpilot) with
   ``cluster.bench``, after a short warm-up.
5. Print real vs sim (and sim/real) per ``--time-scales`` load level, preemptions included (real:
   ``kvpilot_engine_preemptions_total`` summed over the replicas from Ray's metrics endpoint, read
   before and after each level); write ``benchmarks/results/sim-fidelity-<HHMM>.json``.

Both sides' numbers come from per-request samples with the same definitions (numpy's linear
percentiles): TTFT (real: client send → first streamed chunk; sim: arrival → end of the step
that samples the first token), TPOT per request, output tok/s = output tokens of completed
requests / (first arrival → last completion).

    .venv/bin/python benchmarks/sim_fidelity.py                       # calibrate, simulate, replay
    .venv/bin/python benchmarks/sim_fidelity.py --calibration benchmarks/results/sim-fidelity-HHMM.json
    .venv/bin/python benchmarks/sim_fidelity.py --dry-run             # synthetic calibration, sim only
    .venv/bin/python benchmarks/sim_fidelity.py --replicas 2 --kv-gib 0.002 --scale-lengths 0.5  # KV pressure

Defaults: Azure conversation trace, first 200 requests, lengths × 0.25 (max_model_len 1024),
time scales 1 and 2 (3.3 and 6.5 req/s), 1 replica, max_num_seqs 32, max_num_batched_tokens 2048.
Not a test: the numbers depend on this machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fault_stack import ROOT, LocalStack, tiny_model  # noqa: E402

MODEL = "tiny"
TRACE = ROOT / "benchmarks" / "traces" / "AzureLLMInferenceTrace_conv.csv"
TOKEN_RANGE = (16, 480)  # ids valid in the tiny vocabulary, clear of special ids (as cluster.bench)


def model_dict(ns: argparse.Namespace) -> dict[str, Any]:
    return tiny_model(MODEL, ns.replicas, max_model_len=ns.max_model_len, max_num_seqs=ns.max_num_seqs,
                      cpu_kv_cache_space_gib=ns.kv_gib,
                      engine_kwargs={"max_num_batched_tokens": ns.max_num_batched_tokens})


# --- 1. calibration (runs in a subprocess: vLLM's CPU executor spawns processes that re-import __main__) ---


def _calibrate_worker(model_json: str, out: str, reps: int) -> None:
    from vllm import LLM, SamplingParams

    from cluster.config import ModelConfig

    cfg = ModelConfig(**json.loads(model_json))
    t0 = time.perf_counter()
    llm = LLM(**cfg.engine_args(), seed=0)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(1234)
    mml, seqs = cfg.effective_max_model_len(), cfg.max_num_seqs
    batched = int(cfg.engine_kwargs["max_num_batched_tokens"])

    def prompts(n: int, length: int) -> list[dict]:
        return [{"prompt_token_ids": rng.integers(*TOKEN_RANGE, length).tolist()} for _ in range(n)]

    def timed(n: int, length: int, max_tokens: int) -> float:
        ps = prompts(n, length)
        sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
        t = time.perf_counter()
        outs = llm.generate(ps, sp, use_tqdm=False)
        dt = time.perf_counter() - t
        assert all(len(o.outputs[0].token_ids) == max_tokens for o in outs)
        return dt

    for _ in range(3):  # warm-up: first calls allocate and compile
        timed(8, 256, 16)
        timed(1, 900 if mml > 900 else mml // 2, 1)
    rows = []
    for p in [16, 64, 128, 256, 384, 512, 768, 1000, 1536, 2000]:
        if p >= mml or p > batched:
            continue
        ts = [timed(1, p, 1) for _ in range(reps)]
        rows.append({"kind": "prefill", "prompt": p, "batch": 1, "samples_ms": [t * 1e3 for t in ts],
                     "prefill_tokens": p, "attn_pairs": p * p / 2, "decode_seqs": 0, "decode_ctx": 0,
                     "ms": float(np.median(ts) * 1e3)})
        print(f"prefill {p:5d} tokens: {rows[-1]['ms']:.1f} ms", flush=True)
    m1, m2 = 16, 80
    for length in (32, 512):
        if length + m2 > mml:
            continue
        for b in (1, 2, 4, 8, 16, 32):
            if b > seqs:
                continue
            t1 = [timed(b, length, m1) for _ in range(reps)]
            t2 = [timed(b, length, m2) for _ in range(reps)]
            step = (np.median(t2) - np.median(t1)) / (m2 - m1) * 1e3
            ctx = b * (length + (m1 + m2) / 2)
            rows.append({"kind": "decode", "prompt": length, "batch": b, "m1": m1, "m2": m2,
                         "samples_ms": {"m1": [t * 1e3 for t in t1], "m2": [t * 1e3 for t in t2]},
                         "prefill_tokens": 0, "attn_pairs": 0.0, "decode_seqs": b, "decode_ctx": int(ctx),
                         "ms": float(step)})
            print(f"decode batch {b:2d} at context {length + (m1 + m2) // 2}: {step:.2f} ms/step", flush=True)
    Path(out).write_text(json.dumps({"engine_load_s": load_s, "engine_args": {k: str(v) for k, v in
                                                                               cfg.engine_args().items()},
                                     "reps": reps, "rows": rows}, indent=2))


def calibrate(model: dict, reps: int, timeout_s: float) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "calib.json"
        env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "auto"}  # what the stack's CPU replica gets
        cmd = [sys.executable, str(Path(__file__).resolve()), "--calibrate-worker", str(out),
               "--model-json", json.dumps(model), "--calib-reps", str(reps)]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"calibration did not finish in {timeout_s:.0f} s") from None
        if rc != 0:
            raise RuntimeError(f"calibration subprocess exited with {rc}")
        return json.loads(out.read_text())


def synthetic_calibration() -> dict:
    """--dry-run: made-up rows in the right shape (no vLLM), to check the rest of the script."""
    rows = [{"kind": "prefill", "prompt": p, "batch": 1, "prefill_tokens": p, "attn_pairs": p * p / 2,
             "decode_seqs": 0, "decode_ctx": 0, "ms": 25 + 0.03 * p} for p in (16, 64, 256, 512, 1000)]
    rows += [{"kind": "decode", "prompt": length, "batch": b, "prefill_tokens": 0, "attn_pairs": 0.0,
              "decode_seqs": b, "decode_ctx": b * (length + 48), "ms": 8 + 0.4 * b + 2e-5 * b * (length + 48)}
             for length in (32, 512) for b in (1, 4, 16, 32)]
    return {"engine_load_s": None, "reps": 0, "rows": rows, "synthetic": True}


def profile_calibration(profile) -> dict:
    """A profile's measurements as calibration rows (for ``fit_table``): prefill net of the serving delay."""
    delay_ms = profile.serving_delay_s * 1e3
    rows = [{"kind": "prefill", "prompt": s.prompt_tokens, "batch": 1, "prefill_tokens": s.prompt_tokens,
             "attn_pairs": s.prompt_tokens ** 2 / 2, "decode_seqs": 0, "decode_ctx": 0,
             "ms": max(1e-3, s.ttft_ms - delay_ms)} for s in profile.prefill]
    rows += [{"kind": "decode", "prompt": d.context_tokens, "batch": d.batch, "prefill_tokens": 0, "attn_pairs": 0.0,
              "decode_seqs": d.batch, "decode_ctx": d.batch * d.context_tokens, "ms": d.itl_ms}
             for d in profile.decode]
    return {"rows": rows}


def fit(calib: dict):
    from cluster.sim.perfmodel import MeasuredStep, fit_rows

    steps = [MeasuredStep(r["prefill_tokens"], r["attn_pairs"], r["decode_seqs"], r["decode_ctx"], r["ms"])
             for r in calib["rows"]]
    notes = ["prefill rows: wall time of a lone request with one output token (LLM.generate), so c0_prefill "
                 "includes the offline front end's per-request overhead",
             "decode rows: (T(M2) - T(M1)) / (M2 - M1) of B requests generating M1 and M2 tokens"]
    return fit_rows(steps, hardware="cpu", tp=1, quantization="none", notes=notes)


# --- 2./3. the slice, the simulator, the real stack -------------------------------------------------


def bench_workload(ns: argparse.Namespace):
    from cluster.bench.workload import build_workload

    return build_workload(trace=ns.trace, num_requests=ns.num_requests, offset=ns.trace_offset,
                          scale_lengths=ns.scale_lengths, max_model_len=ns.max_model_len, seed=0,
                          token_id_range=TOKEN_RANGE)


def summarize(ttft: list[float], tpot: list[float], e2e: list[float], out_tokens: int, duration_s: float,
              completed: int, requests: int) -> dict:
    def pct(v: list[float], q: float) -> float | None:
        return float(np.percentile(v, q)) if v else None

    return {"requests": requests, "completed": completed, "duration_s": duration_s,
            "ttft_p50_s": pct(ttft, 50), "ttft_p90_s": pct(ttft, 90), "ttft_p99_s": pct(ttft, 99),
            "tpot_p50_s": pct(tpot, 50), "tpot_p90_s": pct(tpot, 90), "e2e_p50_s": pct(e2e, 50),
            "output_tok_s": out_tokens / duration_s if duration_s > 0 else 0.0}


def engine_setup(step, model: dict, replicas: int, max_num_batched_tokens: int):
    """The replica as the bare-engine calibration sees it: no serving path."""
    from cluster.config import ModelConfig
    from cluster.planning.planner import plan_model
    from cluster.sim.simulator import Setup

    cfg = ModelConfig(**model)
    return Setup(model=cfg, plan=plan_model(cfg), step=step, replicas=replicas,
                 max_model_len=cfg.effective_max_model_len(), max_num_batched_tokens=max_num_batched_tokens,
                 max_num_seqs=cfg.max_num_seqs, stats_period_s=cfg.routing.stats_period_s, seed=0)


def simulate_slice(wl, time_scale: float, setup):
    from cluster.bench.arrivals import trace_arrivals
    from cluster.sim.simulator import simulate
    from cluster.sim.workload import TraceRequest
    from cluster.sim.workload import Workload as SimWorkload

    offs = trace_arrivals([r.arrival_s for r in wl.requests], time_scale)
    reqs = sorted((TraceRequest(t, r.input_len, r.output_len, r.index) for r, t in zip(wl.requests, offs)),
                  key=lambda r: r.arrival_s)
    res, sims, _ = simulate(SimWorkload("azure-slice", reqs, "azure"), setup.model.routing.policy, setup)
    done = [s for s in sims if s.finish_t >= 0]
    t0 = min(s.arrival for s in sims)
    t1 = max((s.finish_t for s in done), default=t0)
    out = summarize([s.first_t - s.arrival for s in done],
                    [(s.finish_t - s.first_t) / (s.target - 1) for s in done if s.target > 1],
                    [s.finish_t - s.arrival for s in done], sum(s.target for s in done), t1 - t0, len(done),
                    len(sims))
    out.update(preemptions=res.preemptions, kv_blocks_peak_frac=res.kv_blocks_peak_frac,
               kv_blocks_per_replica=setup.plan.num_blocks, block_size=setup.plan.block_size)
    per_req = {s.index: s.first_t - s.arrival for s in done}
    return out, per_req, setup.to_dict()


COUNTERS = ("kvpilot_engine_preemptions_total", "kvpilot_engine_generation_tokens_total")


def engine_counters() -> dict[str, float]:
    """kvpilot's engine counters summed over the replicas, from Ray's metrics endpoint (this driver's node).

    Ray exports application metrics with a ``ray_`` prefix, and a counter only once it was
    incremented: an absent preemption counter is 0; the generation-token counter must be there
    once anything was generated (else this reads the wrong endpoint or names).
    """
    import urllib.request

    import ray

    port = ray._private.worker._global_node.metrics_export_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = dict.fromkeys(COUNTERS, 0.0)
    for line in text.splitlines():
        for name in COUNTERS:
            if line.startswith(f"ray_{name}{{"):
                out[name] += float(line.rsplit(" ", 1)[1])
    return out


def cpu_snapshot() -> tuple[float, dict[int, tuple[str, float]]]:
    """(machine busy CPU seconds, {pid: (process name, CPU seconds)}) for this user's processes, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        fields = [float(x) for x in f.readline().split()[1:]]
    busy = (sum(fields) - fields[3] - fields[4]) / tick  # all but idle and iowait
    procs: dict[int, tuple[str, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid != os.getuid():
                continue
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone meanwhile
            continue
        rest = stat[stat.rindex(")") + 2:].split()
        name = "benchmark client (this process)" if int(entry) == os.getpid() else _process_name(cmd, stat)
        procs[int(entry)] = (name, (float(rest[11]) + float(rest[12])) / tick)
    return busy, procs


def _process_name(cmd: str, stat: str) -> str:
    """A stable name for a process: Ray's actor title (``ray::ServeReplica:...``, without the ``.method`` of
    the task it runs now, which Ray adds to the title), vLLM's engine core, else the executable and script."""
    if cmd.startswith("ray::"):
        return cmd.split(" ")[0].split(".")[0]
    if cmd.startswith("VLLM") or not cmd:
        return (cmd or stat[stat.index("(") + 1:stat.rindex(")")]).split(" ")[0]
    words = [w for w in cmd.split(" ") if w and not w.startswith("-")]
    return " ".join(Path(w).name for w in words[:2])


def cpu_use(before: tuple, after: tuple, wall_s: float) -> dict[str, Any]:
    """Cores in use over ``wall_s`` between two ``cpu_snapshot``s: the machine's, and per process name."""
    by_name: dict[str, float] = {}
    for pid, (name, cpu) in after[1].items():
        was = before[1].get(pid)  # by pid alone: Ray retitles an actor's process with each task it runs
        used = cpu - (was[1] if was else 0.0)
        by_name[name] = by_name.get(name, 0.0) + max(0.0, used)
    ranked = sorted(((n, round(c / wall_s, 3)) for n, c in by_name.items() if c / wall_s >= 0.005),
                    key=lambda x: -x[1])
    return {"wall_s": round(wall_s, 1), "machine_cores_busy": round((after[0] - before[0]) / wall_s, 3),
            "cores": os.cpu_count(), "by_process": dict(ranked)}


def measure_host(url: str, max_model_len: int) -> dict[str, Any]:
    """What the engines and the serving path take of this host's cores (``cluster.sim.host``), on the stack
    before any replay: one engine stepping alone (one stream at a time: the engine processes' cores), and the
    rest of the machine's CPU per output token with 8 streams at once (everything but the engines)."""
    from cluster.bench.runner import BenchConfig, run_benchmark
    from cluster.bench.workload import Workload, build_workload

    def run(n: int, concurrency: int, prompt: int, output: int, seed: int) -> tuple[dict, int]:
        reqs = build_workload(num_requests=n, input_len=prompt, output_len=output, seed=seed,
                              max_model_len=max_model_len, token_id_range=TOKEN_RANGE).requests
        cfg = BenchConfig(base_url=url, model=MODEL, mode="concurrency", concurrency=concurrency, ignore_eos=True)
        before, t0 = cpu_snapshot(), time.monotonic()
        res = run_benchmark(cfg, Workload("host", "", reqs, False))
        use = cpu_use(before, cpu_snapshot(), time.monotonic() - t0)
        return use, sum(r.output_tokens or 0 for r in res.records if r.ok)

    def engine(use: dict) -> float:
        return sum(c for name, c in use["by_process"].items() if name.startswith("VLLM"))

    solo, _ = run(3, 1, 64, 256, 97)
    loaded, tokens = run(16, 8, 256, 128, 98)
    rest = max(0.0, loaded["machine_cores_busy"] - engine(loaded)) * loaded["wall_s"]
    return {"cores": float(os.cpu_count() or 1), "engine_cores": round(max(0.05, engine(solo)), 3),
            "serving_cpu_s_per_token": round(rest / max(1, tokens), 6), "solo": solo, "loaded": loaded,
            "loaded_output_tokens": tokens}


METRICS_SETTLE_S = 12.0  # Ray's metrics agent exports every few seconds (metrics_report_interval_ms, 10 s)


def run_real(url: str, wl, time_scale: float, warmup: list | None) -> tuple[dict, dict, dict]:
    from cluster.bench.metrics import run_duration
    from cluster.bench.runner import BenchConfig, run_benchmark
    from cluster.bench.workload import Workload

    cfg = BenchConfig(base_url=url, model=MODEL, mode="trace", time_scale=time_scale, ignore_eos=True,
                      request_timeout_s=600.0)
    if warmup:
        run_benchmark(BenchConfig(base_url=url, model=MODEL, mode="concurrency", concurrency=4), Workload(
            "warm-up", "", warmup, False))
    time.sleep(METRICS_SETTLE_S)
    before = engine_counters()
    cpu_before, t0 = cpu_snapshot(), time.monotonic()
    res = run_benchmark(cfg, wl)
    cpu = cpu_use(cpu_before, cpu_snapshot(), time.monotonic() - t0)
    time.sleep(METRICS_SETTLE_S)
    after = engine_counters()
    generated = after["kvpilot_engine_generation_tokens_total"] - before["kvpilot_engine_generation_tokens_total"]
    if generated <= 0:
        raise RuntimeError(f"Ray's metrics endpoint shows no generated tokens after the replay ({before} -> {after}): "
                           "the engine counters are not being read")
    done = [r for r in res.records if r.ok]
    out = summarize([r.ttft_s for r in done], [t for r in done if (t := r.tpot_s) is not None],
                    [r.latency_s for r in done], sum(r.output_tokens or 0 for r in done), run_duration(res.records),
                    len(done), len(res.records))
    out.update(failed=len(res.records) - len(done), errors=res.summary["errors"],
               output_len_mismatches=res.summary["output_len_mismatches"],
               itl_p50_s=(res.summary["itl_ms"]["p50"] or 0) / 1e3, environment=res.environment,
               preemptions=round(after["kvpilot_engine_preemptions_total"]
                                 - before["kvpilot_engine_preemptions_total"]),
               engine_generation_tokens=round(generated), cpu=cpu)
    return out, {r.index: r.ttft_s for r in done}, res.summary


# --- 4. the report ------------------------------------------------------------------------------------

ROWS = [("completed", "completed", 1, "{:.0f}"), ("TTFT p50 (ms)", "ttft_p50_s", 1e3, "{:.1f}"),
        ("TTFT p90 (ms)", "ttft_p90_s", 1e3, "{:.1f}"), ("TTFT p99 (ms)", "ttft_p99_s", 1e3, "{:.1f}"),
        ("TPOT p50 (ms)", "tpot_p50_s", 1e3, "{:.2f}"), ("E2E p50 (ms)", "e2e_p50_s", 1e3, "{:.0f}"),
        ("output tok/s", "output_tok_s", 1, "{:.1f}"), ("preemptions", "preemptions", 1, "{:.0f}")]


VARIANTS = (("sim", "sim"), ("sim_profile", "sim, profiled"), ("sim_host", "sim, profiled, shared host"))


def table(levels: list[dict]) -> str:
    """Per load level: real, then each simulation present and its ratio sim/real."""
    cols = []  # (header, level, key or None for real, is_ratio)
    for lv in levels:
        x = f"x{lv['time_scale']:g}"
        cols.append((f"{x} real", lv, "real", False))
        for key, name in VARIANTS:
            if key in lv:
                cols += [(f"{x} {name}", lv, key, False), (f"{x} {name} / real", lv, key, True)]
    lines = ["| metric | " + " | ".join(c[0] for c in cols) + " |", "|---" * (1 + len(cols)) + "|"]
    for label, key, mul, fmt in ROWS:
        cells = []
        for _, lv, which, ratio in cols:
            v = (lv.get(which) or {}).get(key)
            if ratio:
                real = (lv.get("real") or {}).get(key)
                cells.append(f"{v / real:.2f}" if real and v is not None else "-")
            else:
                cells.append(fmt.format(v * mul) if v is not None else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fit_table(calib: dict, step) -> str:
    lines = ["| step | measured ms | model ms | error |", "|---|---|---|---|"]
    for r in calib["rows"]:
        pred = step.step_ms(r["prefill_tokens"], r["attn_pairs"], r["decode_seqs"], r["decode_ctx"])
        what = (f"prefill {r['prompt']}" if r["kind"] == "prefill"
                else f"decode B={r['batch']} ctx {r['decode_ctx'] // r['batch']}")
        lines.append(f"| {what} | {r['ms']:.2f} | {pred:.2f} | {(pred - r['ms']) / r['ms']:+.1%} |")
    return "\n".join(lines)


def report_fit(name: str, calib: dict, step) -> None:
    f = step.fit
    print(f"\n{name} step model: {step.describe()}")
    print(f"fit (in-sample, {f.rows} rows): MAPE {f.mape:.1%} (prefill {f.mape_prefill:.1%}, decode "
          f"{f.mape_decode:.1%}), max {f.max_ape:.1%}, R² {f.r2:.3f}")
    print(fit_table(calib, step), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", type=Path, default=TRACE)
    p.add_argument("--num-requests", type=int, default=200)
    p.add_argument("--trace-offset", type=int, default=0)
    p.add_argument("--scale-lengths", type=float, default=0.25)
    p.add_argument("--time-scales", default="1,2", help="load levels, comma-separated (2 = twice as fast)")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--kv-gib", type=float, default=0.5, help="cpu_kv_cache_space_gib per replica")
    p.add_argument("--calib-reps", type=int, default=3)
    p.add_argument("--calib-timeout", type=float, default=900.0)
    p.add_argument("--calibration", type=Path, help="reuse the calibration of an earlier output JSON")
    p.add_argument("--dry-run", action="store_true", help="synthetic calibration, simulator only (no vLLM, no Ray)")
    p.add_argument("--no-real", action="store_true", help="calibrate and simulate, do not start the stack")
    p.add_argument("--no-profile", dest="stack_calibration", action="store_false",
                   help="skip kvpilot bench --profile through the stack (and the simulation with it)")
    p.add_argument("--no-host-share", dest="host_share", action="store_false",
                   help="do not measure the host's cores (cluster.sim.host) nor simulate the slice with them")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--num-cpus", type=int, default=4, help="Ray's logical CPUs for the stack")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--calibrate-worker", help=argparse.SUPPRESS)
    p.add_argument("--model-json", help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.calibrate_worker:
        _calibrate_worker(ns.model_json, ns.calibrate_worker, ns.calib_reps)
        return 0

    os.chdir(ROOT)
    scales = [float(x) for x in ns.time_scales.split(",")]
    model = model_dict(ns)
    started = datetime.now(timezone.utc)
    if ns.dry_run:
        calib = synthetic_calibration()
    elif ns.calibration:
        calib = json.loads(ns.calibration.read_text())["calibration"]
        print(f"calibration reused from {ns.calibration}")
    else:
        t = time.monotonic()
        calib = calibrate(model, ns.calib_reps, ns.calib_timeout)
        print(f"calibrated in {time.monotonic() - t:.0f} s (engine load {calib['engine_load_s']:.0f} s)", flush=True)
    step = fit(calib)
    report_fit("engine-calibrated", calib, step)

    wl = bench_workload(ns)
    print(f"\nworkload: {ns.trace.name} requests {ns.trace_offset}..{ns.trace_offset + ns.num_requests - 1}, "
          f"{wl.scale.describe()}; prompt mean {np.mean([r.input_len for r in wl.requests]):.0f}, output mean "
          f"{np.mean([r.output_len for r in wl.requests]):.0f}, span "
          f"{wl.requests[-1].arrival_s - wl.requests[0].arrival_s:.1f} s at x1", flush=True)
    levels: list[dict] = []
    setup_d: dict = {}
    for s in scales:
        sim, sim_ttft, setup_d = simulate_slice(wl, s, engine_setup(step, model, ns.replicas,
                                                                    ns.max_num_batched_tokens))
        levels.append({"time_scale": s, "rate_rps": len(wl.requests) / max(1e-9, (wl.requests[-1].arrival_s -
                                                                                 wl.requests[0].arrival_s) / s),
                       "sim": sim, "_sim_ttft": sim_ttft})

    ns.out.mkdir(parents=True, exist_ok=True)
    path = ns.out / f"sim-fidelity-{started:%H%M}{'-dry' if ns.dry_run else ''}.json"
    command = " ".join([".venv/bin/python", "benchmarks/sim_fidelity.py", *(sys.argv[1:] if argv is None else argv)])

    def dump(error: str | None = None) -> None:  # written after the simulation too, so a failed replay keeps it
        path.write_text(json.dumps({
            "command": command, "started_at": started.isoformat(timespec="seconds"),
            "args": {k: str(v) for k, v in vars(ns).items() if k not in ("calibrate_worker", "model_json")},
            "model": model, "calibration": calib, "step_model": step.to_dict(), "sim_setup": setup_d,
            "workload": wl.describe(), "levels": [{k: v for k, v in lv.items() if not k.startswith("_")}
                                                  for lv in levels],
            "table_markdown": table(levels), "error": error, "load_average_end": os.getloadavg(), **extra,
        }, indent=2, default=str))

    extra: dict = {}
    dump()
    error = None
    if not (ns.dry_run or ns.no_real):
        from cluster.bench.workload import build_workload

        warm = build_workload(num_requests=ns.warmup, input_len=round(np.mean([r.input_len for r in wl.requests])),
                              output_len=round(np.mean([r.output_len for r in wl.requests])), seed=99,
                              max_model_len=ns.max_model_len, token_id_range=TOKEN_RANGE).requests
        stack = LocalStack({"models": [model]}, num_cpus=ns.num_cpus)
        t = time.monotonic()
        try:
            stack.start()
            print(f"stack up in {time.monotonic() - t:.0f} s at {stack.url}", flush=True)
            if ns.stack_calibration:  # kvpilot bench --profile, on the idle stack, before any replay
                from cluster.bench.profile import run_profile
                from cluster.config import ModelConfig
                from cluster.sim.simulator import profiled_setup

                t = time.monotonic()
                profile = run_profile(stack.url, MODEL, ns.max_model_len, reps=ns.calib_reps,
                                      max_batch=ns.max_num_seqs, replicas=ns.replicas,
                                      kv_tokens=setup_d["kv_tokens_per_replica"], token_id_range=TOKEN_RANGE,
                                      say=lambda line: print(f"profile: {line}", flush=True))
                print(f"profiled in {time.monotonic() - t:.0f} s: {profile.describe()}", flush=True)
                extra["profile"] = profile.to_dict()
                report_fit("profiled (through the stack)", profile_calibration(profile), profile.step)
                for lv in levels:
                    lv["sim_profile"], lv["_sim_profile_ttft"], _ = simulate_slice(
                        wl, lv["time_scale"], profiled_setup(ModelConfig(**model), profile, ns.replicas))
                dump()
                if ns.host_share:
                    from dataclasses import replace

                    from cluster.sim.host import HostShare

                    extra["host"] = measured = measure_host(stack.url, ns.max_model_len)
                    share = HostShare(measured["cores"], measured["engine_cores"], measured["serving_cpu_s_per_token"])
                    print(f"host: {share}", flush=True)
                    for lv in levels:
                        lv["sim_host"], lv["_sim_host_ttft"], _ = simulate_slice(wl, lv["time_scale"], replace(
                            profiled_setup(ModelConfig(**model), profile, ns.replicas), host=share))
                    dump()
            for i, lv in enumerate(levels):
                t = time.monotonic()
                real, real_ttft, _ = run_real(stack.url, wl, lv["time_scale"], warm if i == 0 else None)
                lv["real"] = real
                for key, _ in VARIANTS:
                    sim_ttft = lv.get(f"_{key}_ttft") or {}
                    gaps = [real_ttft[k] - sim_ttft[k] for k in real_ttft if k in sim_ttft]
                    lv[f"ttft_gap_real_minus_{key}_s"] = {q: float(np.percentile(gaps, int(q[1:])))
                                                         for q in ("p10", "p50", "p90")} if gaps else None
                print(f"x{lv['time_scale']:g}: replayed in {time.monotonic() - t:.0f} s, "
                      f"{real['completed']}/{real['requests']} completed, {real['preemptions']} preemptions; "
                      f"cores busy {real['cpu']['machine_cores_busy']:.2f} of {real['cpu']['cores']}, by process: "
                      + ", ".join(f"{n} {c:.2f}" for n, c in real["cpu"]["by_process"].items()), flush=True)
                dump()
        except Exception as e:  # keep what was measured; the stack is stopped below
            error = f"{type(e).__name__}: {e}"
            traceback.print_exc()
            print(f"real run failed: {error}", flush=True)
        finally:
            stack.stop()

    print()
    print(table(levels))
    for lv in levels:
        for key, name in VARIANTS:
            g = lv.get(f"ttft_gap_real_minus_{key}_s")
            if g:
                print(f"x{lv['time_scale']:g} ({lv['rate_rps']:.1f} req/s): per-request TTFT real − {name}: p10 "
                      f"{g['p10'] * 1e3:.1f} ms, p50 {g['p50'] * 1e3:.1f} ms, p90 {g['p90'] * 1e3:.1f} ms")
    dump(error)
    print(f"\nwrote {path}")
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main())
