"""Config changes deployed mid-load, and a scale-down under long generations: what the clients saw.

A local stack (its own Ray; ``fault_stack.py``) serves the tiny fp16 model with two CPU replicas.
``--clients`` closed-loop clients stream completions the whole time (each starts its next stream
when the last one ends). Then, one step at a time, an edited config is deployed over the running
app, as ``serve deploy`` of an edited file does (Serve's in-place update: new replicas start,
then the old ones stop taking requests and drain for ``graceful_shutdown_s``):

* ``max_num_seqs``: the model's ``max_num_seqs`` changes (every model replica and the ingress
  are replaced);
* ``add_model``: a second model is added beside the first;
* ``scale_down``: the model goes from two replicas to one while every client runs a long
  generation (``--long-tokens``): the replica being removed must finish its streams.

Per step: the streams that overlapped it, by outcome (completed; failed mid-stream, with an
error event and ``[DONE]``; refused or failed before streaming; unclean; hung, which must be 0);
the seconds the deploy took (until Serve reports the app running); the seconds until the new
shape serves (its replicas running, the old ones gone, a request answered); and at the end the
stack's engine processes still alive after it stopped (orphans, must be 0). Exit status 1 if any
stream was not completed.

    .venv/bin/python benchmarks/fault_upgrade.py                    # 32 clients, all three steps
    .venv/bin/python benchmarks/fault_upgrade.py --steps scale_down --long-tokens 900
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fault_kill import MODEL, Stream, one_stream  # noqa: E402
from fault_stack import EngineWatch, LocalStack, add_fault_args, start_stack, tiny_model, wait_for, write_result  # noqa: E402

KINDS = ("completed", "failed_mid_stream", "failed_before_streaming", "failed_unclean", "hung")
STEPS = ("max_num_seqs", "add_model", "scale_down")


def step_models(step: str, ns: argparse.Namespace) -> list[dict[str, Any]]:
    """The config's models after ``step`` (each step starts from the previous step's config)."""
    first = tiny_model(MODEL, 2, max_num_seqs=ns.max_num_seqs)
    changed = tiny_model(MODEL, 2, max_num_seqs=ns.new_max_num_seqs)
    second = tiny_model("tiny2", 1, max_num_seqs=4, cpu_kv_cache_space_gib=0.25)
    return {"start": [first], "max_num_seqs": [changed], "add_model": [changed, second],
            "scale_down": [tiny_model(MODEL, 1, max_num_seqs=ns.new_max_num_seqs), second]}[step]


def run_step(stack: LocalStack, step: str, ns: argparse.Namespace) -> dict[str, Any]:
    models = step_models(step, ns)
    tokens = ns.long_tokens if step == "scale_down" else ns.max_tokens
    old = {r["name"] for r in stack.replicas(MODEL)}
    streams: list[Stream] = []
    timing: dict[str, float] = {}

    async def client(http: httpx.AsyncClient, stop: asyncio.Event, k: int) -> None:
        while not stop.is_set():
            s = Stream()
            streams.append(s)
            await one_stream(http, stack.url, k, s, tokens)

    async def main() -> None:
        stop = asyncio.Event()
        limits = httpx.Limits(max_connections=ns.clients + 4)
        async with httpx.AsyncClient(timeout=httpx.Timeout(ns.stream_timeout, connect=30.0), limits=limits) as http:
            tasks = [asyncio.create_task(client(http, stop, k)) for k in range(ns.clients)]
            while sum(s.first_chunk_at is not None for s in streams) < ns.clients:
                await asyncio.sleep(0.05)  # every client is streaming before the change
            started = time.monotonic()
            await asyncio.to_thread(stack.redeploy, {"models": models})
            timing["deploy_s"] = time.monotonic() - started
            took = await asyncio.to_thread(wait_for, lambda: _new_shape(stack, step, models, old),
                                           ns.recover_timeout, 1.0)
            timing["serves_s"] = -1.0 if took is None else time.monotonic() - started
            stop.set()
            await asyncio.wait(tasks, timeout=ns.stream_timeout + 30)

    asyncio.run(main())
    counts = {k: sum(s.result == k for s in streams) for k in KINDS}
    return {"step": step, "clients": ns.clients, "max_tokens": tokens, "streams": len(streams), **counts,
            "deploy_s": round(timing["deploy_s"], 1),
            "seconds_until_new_shape_serves": None if timing["serves_s"] < 0 else round(timing["serves_s"], 1)}


def _new_shape(stack: LocalStack, step: str, models: list[dict[str, Any]], old: set[str]) -> bool:
    """Each model runs its configured replica count; after ``max_num_seqs`` none of the old replicas is left."""
    for m in models:
        live = {r["name"] for r in stack.replicas(m["name"])}
        if len(live) != m["min_replicas"] or stack.running_replicas(m["name"]) != m["min_replicas"]:
            return False
        if step == "max_num_seqs" and live & old:
            return False
    r = httpx.post(f"{stack.url}/v1/completions", timeout=60,
                   json={"model": models[-1]["name"], "prompt": "ping", "max_tokens": 1})
    return r.status_code == 200


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, in order, among {', '.join(STEPS)}")
    p.add_argument("--max-tokens", type=int, default=120, help="tokens per stream in the update steps")
    p.add_argument("--long-tokens", type=int, default=800, help="tokens per stream in the scale-down step")
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--new-max-num-seqs", type=int, default=12)
    add_fault_args(p, stream_timeout=600.0, num_cpus=6)
    ns = p.parse_args(argv)
    steps = ns.steps.split(",")
    if not set(steps) <= set(STEPS):
        p.error(f"--steps {ns.steps}: choose among {', '.join(STEPS)}")

    stack = LocalStack({"models": step_models("start", ns)}, num_cpus=ns.num_cpus)
    start_stack(stack)
    watch = EngineWatch()
    results = []
    try:
        for step in steps:
            watch.see(stack.processes())
            r = run_step(stack, step, ns)
            watch.see(stack.processes())
            results.append(r)
            print(f"{step}: {json.dumps(r)}", flush=True)
    finally:
        stack.stop()
    left = watch.orphans(within_s=15)
    stop = {"engine_processes_seen": len(watch.seen), "orphans_after_stop": len(left), "orphans": left}
    print(f"after the stop: {json.dumps(stop)}", flush=True)
    write_result(ns.out, "fault-upgrade", ns, steps=results, after_stop=stop)
    return 0 if all(r["completed"] == r["streams"] for r in results) and not left else 1


if __name__ == "__main__":
    sys.exit(main())
