"""Kill a model replica (or its vLLM engine) while concurrent streams run; count what the clients saw.

A local stack (its own Ray; see ``fault_stack.py``) serves the tiny fp16 model with two CPU
replicas. Each round opens ``--streams`` concurrent streamed completions; once ``--kill-after``
of them are streaming, one replica is killed:

* ``--target actor`` (default): ``ray.kill`` of the replica actor (the process dies);
* ``--target engine``: SIGKILL of the replica's vLLM EngineCore process (the actor lives on,
  its engine is dead: Serve's health check has to find it).

Per round it reports the streams that completed, failed mid-stream (tokens, then an error
event and ``data: [DONE]``), failed before streaming (an error before any token: what the
ingress's resubmission must prevent), failed uncleanly (no OpenAI error or no ``[DONE]``), or
hung (no end within ``--stream-timeout``); the seconds until two replicas serve again; and
engine processes the dead replica left behind. Exit status 1 if any stream hung, failed
uncleanly or failed before streaming.

    .venv/bin/python benchmarks/fault_kill.py                       # 3 rounds, actor kills
    .venv/bin/python benchmarks/fault_kill.py --target engine --rounds 2
    .venv/bin/python benchmarks/fault_kill.py --target actor,engine --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fault_stack import ROOT, LocalStack, tiny_model, wait_for  # noqa: E402

MODEL = "tiny"


@dataclass
class Stream:
    first_chunk_at: float | None = None
    ended_at: float | None = None
    # completed | failed_mid_stream (tokens, then an error event and [DONE]) | failed_before_streaming
    # (an OpenAI error before any token: what resubmission must prevent) | failed_unclean | hung
    result: str = "hung"


async def one_stream(http: httpx.AsyncClient, url: str, i: int, out: Stream, max_tokens: int,
                     headers: dict[str, str] | None = None) -> None:
    body = {"model": MODEL, "prompt": f"Stream number {i} tells a story", "max_tokens": max_tokens,
            "ignore_eos": True, "stream": True}
    try:
        async with http.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode()
                try:
                    clean = set(json.loads(text)["error"]) == {"message", "type", "param", "code"}
                except (ValueError, KeyError, TypeError):
                    clean = False
                out.result = "failed_before_streaming" if clean else "failed_unclean"
                return
            done = error = False
            tokens = 0
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                out.first_chunk_at = out.first_chunk_at or time.monotonic()
                data = line[6:]
                if data == "[DONE]":
                    done = True
                elif "error" in json.loads(data):
                    error = True
                else:
                    tokens += 1
            if not done:
                out.result = "failed_unclean"
            elif error:
                out.result = "failed_mid_stream" if tokens else "failed_before_streaming"
            else:
                out.result = "completed"
    except httpx.TimeoutException:
        out.result = "hung"
    except httpx.HTTPError:
        out.result = "failed_unclean"  # the connection broke without an error event
    finally:
        out.ended_at = time.monotonic()


def engine_cores(pid: int) -> list[int]:
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True) if "EngineCore" in p.name()]
    except psutil.NoSuchProcess:
        return []


def one_round(stack: LocalStack, n: int, max_tokens: int, kill_after: int, target: str, stream_timeout: float,
              recover_timeout: float, headers: dict[str, str] | None = None) -> dict:
    assert wait_for(lambda: stack.running_replicas(MODEL) == 2 and len(stack.replicas(MODEL)) == 2, 600) is not None
    before = {r["name"]: r["pid"] for r in stack.replicas(MODEL)}
    victim = sorted(before)[0]
    cores = engine_cores(before[victim])
    streams = [Stream() for _ in range(n)]
    killed_at = 0.0

    async def main() -> None:
        nonlocal killed_at
        timeout = httpx.Timeout(stream_timeout, connect=30.0)
        async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=n + 4)) as http:
            tasks = [asyncio.create_task(one_stream(http, stack.url, i, streams[i], max_tokens, headers))
                     for i in range(n)]
            while sum(s.first_chunk_at is not None for s in streams) < kill_after:
                await asyncio.sleep(0.02)
            if target == "actor":
                stack.kill_replica(victim)
            else:
                for pid in cores:
                    os.kill(pid, signal.SIGKILL)
            killed_at = time.monotonic()
            await asyncio.wait(tasks, timeout=stream_timeout + 30)

    asyncio.run(main())
    kinds = ("completed", "failed_mid_stream", "failed_before_streaming", "failed_unclean", "hung")
    counts = {k: sum(s.result == k for s in streams) for k in kinds}
    # Client-side view (racy: a chunk may be sent before the kill and read after it), for context only.
    waiting = [s for s in streams if s.first_chunk_at is None or s.first_chunk_at > killed_at]
    streams_done = max((s.ended_at or 0) for s in streams) - killed_at

    def recovered() -> bool:
        live = {r["name"] for r in stack.replicas(MODEL)}
        if stack.running_replicas(MODEL) != 2 or len(live) != 2 or victim in live:
            return False
        r = httpx.post(f"{stack.url}/v1/completions", json={"model": MODEL, "prompt": "ping", "max_tokens": 1},
                       headers=headers, timeout=60)
        return r.status_code == 200

    took = wait_for(recovered, recover_timeout, period_s=1.0)
    time.sleep(5)
    orphans = [pid for pid in cores if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    return {
        "target": target, "streams": n, "max_tokens": max_tokens, "kill_after_streaming": kill_after, **counts,
        "first_chunk_read_after_kill": len(waiting),
        "first_chunk_read_after_kill_completed": sum(s.result == "completed" for s in waiting),
        "seconds_until_streams_ended": round(streams_done, 1),
        "seconds_until_two_replicas_serve": None if took is None else round(time.monotonic() - killed_at, 1),
        "orphaned_engine_processes": len(orphans),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=8, help="per replica: the rest wait in Serve's queue")
    p.add_argument("--kill-after", type=int, default=8, help="kill once this many streams have a first chunk")
    p.add_argument("--target", default="actor", help="actor, engine, or both comma-separated (alternating)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--stream-timeout", type=float, default=300.0, help="a stream not ended by then counts as hung")
    p.add_argument("--recover-timeout", type=float, default=600.0)
    p.add_argument("--num-cpus", type=int, default=4)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ns = p.parse_args(argv)
    targets = ns.target.split(",")
    if not set(targets) <= {"actor", "engine"}:
        p.error(f"--target {ns.target}: choose actor, engine or actor,engine")

    stack = LocalStack({"models": [tiny_model(MODEL, 2, max_num_seqs=ns.max_num_seqs)]}, num_cpus=ns.num_cpus)
    started = time.monotonic()
    stack.start()
    print(f"stack up in {time.monotonic() - started:.0f} s at {stack.url}", flush=True)
    rounds = []
    try:
        for i in range(ns.rounds):
            for target in targets:
                r = one_round(stack, ns.streams, ns.max_tokens, ns.kill_after, target, ns.stream_timeout,
                              ns.recover_timeout)
                rounds.append(r)
                print(f"round {i + 1} ({target}): {json.dumps(r)}", flush=True)
    finally:
        stack.stop()
    ns.out.mkdir(parents=True, exist_ok=True)
    path = ns.out / f"fault-kill-{'-'.join(targets)}-{datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps({"args": {k: str(v) for k, v in vars(ns).items()}, "rounds": rounds,
                                "load_average": os.getloadavg()}, indent=2))
    print(f"wrote {path}")
    bad = [r for r in rounds if r["hung"] or r["failed_before_streaming"] or r["failed_unclean"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
