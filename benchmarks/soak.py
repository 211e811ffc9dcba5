"""Soak: hours of steady load at ~80% of measured capacity; RSS of every process of the stack and errors.

A local stack (its own Ray; ``fault_stack.py``) serves a config's models (default
``configs/local-cpu.yaml``, the tiny AWQ model ``make serve`` runs) with API keys on. Then:

1. capacity: ``--clients`` closed-loop clients for ``--capacity-s`` seconds → requests/s;
2. soak: Poisson arrivals at ``--load`` × capacity for ``--minutes``; a mix of streamed and
   unstreamed completions and chats, a few malformed requests and a few with a wrong key
   (so refusals are soaked too);
3. every ``--sample-s`` the RSS of every process of the stack (driver, GCS, raylet, Serve
   controller, proxy, ingress, replicas, vLLM engine cores, Ray's agents).

Report: errors by kind, latency per interval, per-process RSS at the start and end of the soak,
growth and a least-squares slope (MiB/hour). Written to
``benchmarks/results/soak-<time>.{json,md}``.

    .venv/bin/python benchmarks/soak.py                  # 30 minutes
    .venv/bin/python benchmarks/soak.py --minutes 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fault_stack import ROOT, EngineWatch, LocalStack, provenance, role, start_stack, timestamp  # noqa: E402
from cluster.bench.client import sse_data  # noqa: E402

API_KEY = "sk-kvpilot-soak-0000000000000000000"
WORDS = ("the quick brown fox jumps over a lazy dog while seven tired engineers watch the cluster "
         "scale up and down again as tokens stream out of tiny random models").split()
MIB = 2**20


def _request(rng: random.Random, model: str, max_tokens: int) -> tuple[str, dict[str, Any], dict[str, str]]:
    """One request of the mix: path, body, headers."""
    auth = {"Authorization": f"Bearer {API_KEY}"}
    roll = rng.random()
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 96)))
    common = {"model": model, "max_tokens": rng.randint(max_tokens // 2, max_tokens), "ignore_eos": True,
              "stream": rng.random() < 0.5}
    if roll < 0.01:
        return "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": "many"}, auth  # 400
    if roll < 0.02:
        return "/v1/completions", {"model": model, "prompt": prompt}, {"Authorization": "Bearer wrong-key-00000000"}
    if roll < 0.5:
        return "/v1/completions", {**common, "prompt": prompt}, auth
    return "/v1/chat/completions", {**common, "messages": [{"role": "user", "content": prompt}]}, auth


def _refusal(status: int, body: bytes) -> str:
    """``http_<status>_<OpenAI error code>``, e.g. ``http_503_model_overloaded``."""
    try:
        code = json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = "not_openai_error"
    return f"http_{status}_{code}"


async def _send(http: httpx.AsyncClient, url: str, path: str, body: dict, headers: dict) -> tuple[str, float]:
    """Outcome kind ("ok", "http_<status>_<code>", "stream_error", "exception_<name>") and latency."""
    started = time.monotonic()
    try:
        if body.get("stream"):
            async with http.stream("POST", url + path, json=body, headers=headers) as r:
                if r.status_code != 200:
                    return _refusal(r.status_code, await r.aread()), time.monotonic() - started
                done = error = False
                async for data in sse_data(r.aiter_bytes()):
                    if data == "[DONE]":
                        done = True
                    elif data.startswith('{"error"'):
                        error = True
                kind = "ok" if done and not error else "stream_error"
                return kind, time.monotonic() - started
        r = await http.post(url + path, json=body, headers=headers)
        return ("ok" if r.status_code == 200 else _refusal(r.status_code, r.content)), time.monotonic() - started
    except Exception as e:
        return f"exception_{type(e).__name__}", time.monotonic() - started


async def measure_capacity(url: str, model: str, clients: int, seconds: float, max_tokens: int) -> float:
    rng = random.Random(1)
    done = 0
    deadline = time.monotonic() + seconds

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal done
        while time.monotonic() < deadline:
            path, body, headers = _request(rng, model, max_tokens)
            if (await _send(http, url, path, body, headers))[0] == "ok":
                done += 1

    async with httpx.AsyncClient(timeout=300) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return done / seconds


def sample_rss(stack: LocalStack) -> dict[str, tuple[str, int]]:
    out = {}
    for p in stack.processes():
        try:
            out[str(p.pid)] = (role(p), p.memory_info().rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


async def soak(stack: LocalStack, model: str, rate: float, minutes: float, sample_s: float, max_tokens: int,
               interval_s: float) -> dict[str, Any]:
    rng = random.Random(2)
    outcomes: Counter = Counter()
    per_interval: dict[int, list[float]] = defaultdict(list)
    errors_per_interval: dict[int, int] = defaultdict(int)
    samples: list[tuple[float, dict[str, tuple[str, int]]]] = []
    started = time.monotonic()
    end = started + minutes * 60
    pending: set[asyncio.Task] = set()

    async def one(http: httpx.AsyncClient, path: str, body: dict, headers: dict) -> None:
        kind, latency = await _send(http, stack.url, path, body, headers)
        expected_refusal = (body.get("max_tokens") == "many" and kind.startswith("http_400")) or \
            (headers.get("Authorization", "").endswith("wrong-key-00000000") and kind.startswith("http_401"))
        outcomes["refused_as_expected" if expected_refusal else kind] += 1
        slot = int((time.monotonic() - started) // interval_s)
        if kind == "ok":
            per_interval[slot].append(latency)
        elif not expected_refusal:
            errors_per_interval[slot] += 1

    async def sampler() -> None:
        while time.monotonic() < end:
            samples.append((time.monotonic() - started, sample_rss(stack)))
            await asyncio.sleep(sample_s)
        samples.append((time.monotonic() - started, sample_rss(stack)))

    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=512)) as http:
        sampling = asyncio.create_task(sampler())
        next_at = started
        while next_at < end:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            path, body, headers = _request(rng, model, max_tokens)
            task = asyncio.create_task(one(http, path, body, headers))
            pending.add(task)
            task.add_done_callback(pending.discard)
            next_at += rng.expovariate(rate)
        await sampling
        if pending:
            await asyncio.wait(pending, timeout=300)
    return {"outcomes": dict(outcomes), "samples": samples, "hung_at_end": sum(not t.done() for t in pending),
            "intervals": [
                {"minute_start": round(k * interval_s / 60, 1), "ok": len(v),
                 "p50_s": round(statistics.median(v), 3) if v else None,
                 "p99_s": round(sorted(v)[int(0.99 * (len(v) - 1))], 3) if v else None,
                 "errors": errors_per_interval.get(k, 0)}
                for k, v in sorted(per_interval.items())]}


def _slope_mib_per_h(points: list[tuple[float, int]]) -> float:
    if len(points) < 3:
        return 0.0
    xs, ys = [t / 3600 for t, _ in points], [b / MIB for _, b in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


def rss_report(samples: list[tuple[float, dict[str, tuple[str, int]]]], warmup_s: float = 0.0,
               rate_rps: float = 0.0) -> list[dict[str, Any]]:
    """Per process present at the first and last sample: start/end/max RSS, growth, slope; and after warm-up
    (samples from ``warmup_s`` on): the least-squares slope, in MiB/hour and KiB per request at ``rate_rps``,
    and the growth it implies over the rest of the soak as a percentage of the RSS at the end of warm-up."""
    first, last = samples[0][1], samples[-1][1]
    end_t = samples[-1][0]
    rows = []
    for pid in sorted(set(first) & set(last), key=lambda p: -last[p][1]):
        series = [(t, s[pid][1]) for t, s in samples if pid in s]
        after = [(t, b) for t, b in series if t >= warmup_s]
        slope = _slope_mib_per_h(after)
        base_mib = after[0][1] / MIB if after else 0.0
        rows.append({"pid": int(pid), "role": last[pid][0], "start_mib": round(first[pid][1] / MIB, 1),
                     "end_mib": round(last[pid][1] / MIB, 1), "max_mib": round(max(b for _, b in series) / MIB, 1),
                     "growth_mib": round((last[pid][1] - first[pid][1]) / MIB, 1),
                     "slope_mib_per_h": round(_slope_mib_per_h(series), 1),
                     "after_warmup_slope_mib_per_h": round(slope, 2),
                     "after_warmup_kib_per_request": round(slope * 1024 / (rate_rps * 3600), 3) if rate_rps else None,
                     "after_warmup_growth_pct": round(100 * slope * (end_t - warmup_s) / 3600 / base_mib, 2)
                     if base_mib else None})
    return rows


def rss_violations(rows: list[dict[str, Any]], max_growth_pct: float, max_kib_per_request: float | None,
                   min_mib: float = 50.0) -> list[str]:
    """Processes over a bound after warm-up (processes under ``min_mib`` are Ray's small helpers: skipped)."""
    bad = []
    for r in rows:
        if r["end_mib"] < min_mib:
            continue
        if r["after_warmup_growth_pct"] is not None and r["after_warmup_growth_pct"] > max_growth_pct:
            bad.append(f"{r['role']} (pid {r['pid']}): +{r['after_warmup_growth_pct']}% after warm-up "
                       f"(bound {max_growth_pct}%)")
        kib = r["after_warmup_kib_per_request"]
        if max_kib_per_request is not None and kib is not None and kib > max_kib_per_request:
            bad.append(f"{r['role']} (pid {r['pid']}): {kib} KiB per request after warm-up "
                       f"(bound {max_kib_per_request})")
    return bad


def scan_logs_for(logs: Path, secret: str) -> dict[str, Any]:
    """Every file under the stack's Ray log folder, searched for the API key (and its
    ``Bearer`` form): the soak sent it with every request, so any log line echoing a header or a
    body would show it."""
    files, size, hits = 0, 0, []
    needle = secret.encode()
    for f in sorted(p for p in logs.rglob("*") if p.is_file()):
        data = f.read_bytes()
        files, size = files + 1, size + len(data)
        if needle in data:
            hits.append(str(f.relative_to(logs)))
    return {"logs_dir": str(logs), "files": files, "mib": round(size / MIB, 1), "files_with_key": hits}


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# kvpilot soak {result['started']}", "",
             f"`{result['command']}` at commit {result['commit']}", "",
             f"{result['minutes']} min at {result['rate_rps']:.2f} req/s ({result['load']:.0%} of the measured "
             f"capacity {result['capacity_rps']:.2f} req/s); {result['load_average_end']} load average at the end.",
             "", f"outcomes: {result['outcomes']}; still running at the end: {result['hung_at_end']}", "",
             f"stack RSS: {result['total_start_mib']:.0f} MiB → {result['total_end_mib']:.0f} MiB "
             f"({result['total_end_mib'] - result['total_start_mib']:+.0f} MiB); processes that appeared or left "
             f"during the soak: {result['processes_changed']}", "",
             f"API key in the stack's logs: {len(result['key_scan']['files_with_key'])} of "
             f"{result['key_scan']['files']} files ({result['key_scan']['mib']} MiB scanned)", "",
             f"after a {result['warmup_min']} min warm-up: bounds {result['max_growth_pct']}% growth, "
             f"{result['max_kib_per_request']} KiB/request; over them: {result['rss_violations'] or 'none'}; "
             f"engine processes left after the stop: {result['orphans_after_stop']}", "",
             "| pid | role | start MiB | end MiB | max MiB | growth MiB | slope MiB/h | after warm-up: MiB/h "
             "| KiB/request | growth % |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rss"]:
        lines.append(f"| {r['pid']} | {r['role']} | {r['start_mib']} | {r['end_mib']} | {r['max_mib']} | "
                     f"{r['growth_mib']:+} | {r['slope_mib_per_h']:+} | {r['after_warmup_slope_mib_per_h']:+} | "
                     f"{r['after_warmup_kib_per_request']} | {r['after_warmup_growth_pct']} |")
    lines += ["", "| minute | ok | p50 s | p99 s | errors |", "|---|---|---|---|---|"]
    for i in result["intervals"]:
        lines.append(f"| {i['minute_start']} | {i['ok']} | {i['p50_s']} | {i['p99_s']} | {i['errors']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=ROOT / "configs/local-cpu.yaml")
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--load", type=float, default=0.8, help="fraction of the measured capacity")
    p.add_argument("--clients", type=int, default=16, help="closed-loop clients while measuring capacity")
    p.add_argument("--capacity-s", type=float, default=60.0)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--sample-s", type=float, default=30.0)
    p.add_argument("--interval-s", type=float, default=60.0, help="latency/error report interval")
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--warmup-min", type=float, default=None,
                   help="RSS slopes from this minute on (default: a fifth of the soak, at most 5)")
    p.add_argument("--max-growth-pct", type=float, default=5.0,
                   help="bound on every process's RSS growth after warm-up (exit status 1 beyond)")
    p.add_argument("--max-kib-per-request", type=float, default=None,
                   help="bound on every process's RSS slope after warm-up, KiB per request (a short soak's check)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ns = p.parse_args(argv)

    from cluster.config import read_serve_args

    args, _ = read_serve_args(ns.config)
    ns.out.mkdir(parents=True, exist_ok=True)
    stamp = timestamp()
    keys = ns.out / f".soak-keys-{stamp}"
    keys.write_text(API_KEY + "\n")
    args = {**args, "ingress": {"auth": "required", "api_keys_file": str(keys)}}
    model = args["models"][0]["name"]
    stack = LocalStack(args, num_cpus=ns.num_cpus)
    warmup_min = ns.warmup_min if ns.warmup_min is not None else min(5.0, ns.minutes / 5)
    watch = EngineWatch()
    start_stack(stack)
    try:
        capacity = asyncio.run(measure_capacity(stack.url, model, ns.clients, ns.capacity_s, ns.max_tokens))
        rate = ns.load * capacity
        print(f"capacity {capacity:.2f} req/s; soaking {ns.minutes} min at {rate:.2f} req/s", flush=True)
        run = asyncio.run(soak(stack, model, rate, ns.minutes, ns.sample_s, ns.max_tokens, ns.interval_s))
        run["key_scan"] = scan_logs_for(stack.logs_dir(), API_KEY)
    finally:
        watch.see(stack.processes())
        stack.stop()
        keys.unlink(missing_ok=True)
    orphans = watch.orphans(within_s=15)
    samples = run.pop("samples")
    first, last = samples[0][1], samples[-1][1]
    result = {**provenance(), "started": stamp, "config": str(ns.config), "minutes": ns.minutes, "load": ns.load,
              "capacity_rps": capacity, "rate_rps": rate, **run, "warmup_min": warmup_min,
              "rss": rss_report(samples, warmup_min * 60, rate),
              "max_growth_pct": ns.max_growth_pct, "max_kib_per_request": ns.max_kib_per_request,
              "orphans_after_stop": len(orphans),
              "total_start_mib": sum(b for _, b in first.values()) / MIB,
              "total_end_mib": sum(b for _, b in last.values()) / MIB,
              "processes_changed": len(set(first) ^ set(last)),
              "load_average_end": [round(x, 1) for x in os.getloadavg()],
              "rss_samples": [{"t_s": round(t, 1),
                               "rss_mib": {pid: [r, round(b / MIB, 1)] for pid, (r, b) in s.items()}}
                              for t, s in samples]}
    result["rss_violations"] = rss_violations(result["rss"], ns.max_growth_pct, ns.max_kib_per_request)
    (ns.out / f"soak-{stamp}.json").write_text(json.dumps(result, indent=1))
    (ns.out / f"soak-{stamp}.md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {ns.out / f'soak-{stamp}.md'}")
    errors = {k: v for k, v in result["outcomes"].items() if k not in ("ok", "refused_as_expected")}
    return 1 if errors or result["hung_at_end"] or result["rss_violations"] or orphans else 0


if __name__ == "__main__":
    sys.exit(main())
