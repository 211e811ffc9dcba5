"""Kill a model replica (or its vLLM engine) while concurrent streams run; count what the clients saw.

A local stack (its own Ray; see ``fault_stack.py``) serves the tiny fp16 model with two CPU
replicas. Each round opens ``--streams`` concurrent streamed completions; once ``--kill-after``
of them are streaming, one replica is killed:

* ``--target actor`` (default): ``ray.kill`` of the replica actor (the process dies);
* ``--target sigkill``: SIGKILL of the replica actor's process (as the OOM killer would);
* ``--target engine``: SIGKILL of the replica's vLLM EngineCore process (the actor lives on,
  its engine is dead: Serve's health check has to find it);
* ``--target ingress``: ``ray.kill`` of the ingress replica (every stream it relays breaks;
  Serve starts another);
* ``--target controller``: ``ray.kill`` of the Serve controller, which Ray restarts (the
  data plane must not notice: every stream completes).

At the end the stack is stopped (``--stop clean``: Serve and Ray shut down) or killed
(``--stop hard``: SIGKILL to every Ray process of the stack at once, as killing the process
group and then ``ray stop --force`` do), and every vLLM engine process the stack ever had
must be gone within 15 s: ``orphans_after_stop``.

Per round it reports the streams that completed, failed mid-stream (tokens, then an error
event and ``data: [DONE]``), failed before streaming (an error before any token: what the
ingress's resubmission must prevent), failed uncleanly (no OpenAI error or no ``[DONE]``), or
hung (no end within ``--stream-timeout``); the seconds until two replicas serve again; and
engine processes the dead replica left behind (still alive 5 s after it was replaced). Exit
status 1 if any stream hung, failed uncleanly or failed before streaming, or an engine process
was orphaned.

    .venv/bin/python benchmarks/fault_kill.py                       # 3 rounds, actor kills
    .venv/bin/python benchmarks/fault_kill.py --target engine --rounds 2
    .venv/bin/python benchmarks/fault_kill.py --target actor,engine --rounds 2
    .venv/bin/python benchmarks/fault_kill.py --target sigkill --rounds 1 --stop hard
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
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fault_stack import (EngineWatch, LocalStack, engines_under, is_openai_error,  # noqa: E402
                         machine_orphans, add_fault_args, start_stack, tiny_model, wait_for, write_result)
from cluster.bench.client import stream_outcome  # noqa: E402

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
                clean = is_openai_error((await r.aread()).decode())
                out.result = "failed_before_streaming" if clean else "failed_unclean"
                return
            def seen() -> None:
                out.first_chunk_at = out.first_chunk_at or time.monotonic()

            out.result = await stream_outcome(r.aiter_bytes(), seen)
    except httpx.TimeoutException:
        out.result = "hung"
    except (httpx.HTTPError, ValueError):
        out.result = "failed_unclean"  # the connection broke without an error event, or an event was cut
    finally:
        out.ended_at = time.monotonic()


def engine_cores(pid: int) -> list[int]:
    return [p.pid for p in engines_under(pid) if "EngineCore" in p.name()]


MODEL_TARGETS = ("actor", "sigkill", "engine")  # a model replica (or its engine) dies; else the ingress or controller


def _kill(stack: LocalStack, target: str, victim: str, pid: int, cores: list[int], ingress: list[str]) -> None:
    import ray

    if target == "actor":
        stack.kill_replica(victim)
    elif target == "sigkill":
        os.kill(pid, signal.SIGKILL)
    elif target == "engine":
        for core in cores:
            os.kill(core, signal.SIGKILL)
    elif target == "ingress":
        stack.kill_replica(ingress[0])
    elif target == "controller":
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

        ray.kill(ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE), no_restart=False)
    else:
        raise ValueError(f"--target {target!r}: choose actor, sigkill, engine, ingress or controller")


def one_round(stack: LocalStack, n: int, max_tokens: int, kill_after: int, target: str, stream_timeout: float,
              recover_timeout: float, headers: dict[str, str] | None = None, watch: EngineWatch | None = None) -> dict:
    assert wait_for(lambda: stack.running_replicas(MODEL) == 2 and len(stack.replicas(MODEL)) == 2, 600) is not None
    before = {r["name"]: r["pid"] for r in stack.replicas(MODEL)}
    victim = sorted(before)[0]
    ingress = [r["name"] for r in stack.deployment_replicas("ingress")]
    cores = engine_cores(before[victim])
    victim_engines = {p.pid for p in engines_under(before[victim])}  # its engine core and the core's workers
    watch = watch or EngineWatch()
    watch.see(stack.processes())
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
            _kill(stack, target, victim, before[victim], cores, ingress)
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
        if stack.running_replicas(MODEL) != 2 or len(live) != 2:
            return False
        if target in MODEL_TARGETS and victim in live:
            return False
        if target == "ingress" and not set(r["name"] for r in stack.deployment_replicas("ingress")) - set(ingress):
            return False
        r = httpx.post(f"{stack.url}/v1/completions", json={"model": MODEL, "prompt": "ping", "max_tokens": 1},
                       headers=headers, timeout=60)
        return r.status_code == 200

    took = wait_for(recovered, recover_timeout, period_s=1.0)
    watch.see(stack.processes())
    # Only a model target kills an engine's replica; after an ingress or controller kill its engines live on.
    orphans = watch.orphans(among=victim_engines, within_s=5) if target in MODEL_TARGETS else []
    return {
        "target": target, "streams": n, "max_tokens": max_tokens, "kill_after_streaming": kill_after, **counts,
        "first_chunk_read_after_kill": len(waiting),
        "first_chunk_read_after_kill_completed": sum(s.result == "completed" for s in waiting),
        "seconds_until_streams_ended": round(streams_done, 1),
        "seconds_until_two_replicas_serve": None if took is None else round(time.monotonic() - killed_at, 1),
        "victim_engine_processes": len(victim_engines),
        "orphaned_engine_processes": len(orphans),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=8, help="per replica: the rest wait in Serve's queue")
    p.add_argument("--kill-after", type=int, default=8, help="kill once this many streams have a first chunk")
    p.add_argument("--target", default="actor",
                   help="actor, sigkill, engine, ingress, controller, or several comma-separated (alternating)")
    p.add_argument("--stop", choices=("clean", "hard"), default="clean",
                   help="end with serve/ray shutdown, or SIGKILL to every Ray process of the stack")
    p.add_argument("--rounds", type=int, default=3)
    add_fault_args(p, stream_timeout=300.0, num_cpus=4)
    ns = p.parse_args(argv)
    targets = ns.target.split(",")
    if not set(targets) <= {*MODEL_TARGETS, "ingress", "controller"}:
        p.error(f"--target {ns.target}: choose among {', '.join(MODEL_TARGETS)}, ingress, controller")

    stack = LocalStack({"models": [tiny_model(MODEL, 2, max_num_seqs=ns.max_num_seqs)]}, num_cpus=ns.num_cpus)
    orphans_before = set(machine_orphans())  # other stacks' leftovers on this machine, not ours
    start_stack(stack)
    rounds = []
    watch = EngineWatch()
    try:
        for i in range(ns.rounds):
            for target in targets:
                r = one_round(stack, ns.streams, ns.max_tokens, ns.kill_after, target, ns.stream_timeout,
                              ns.recover_timeout, watch=watch)
                rounds.append(r)
                print(f"round {i + 1} ({target}): {json.dumps(r)}", flush=True)
    finally:
        watch.see(stack.processes())
        if ns.stop == "hard":
            killed = stack.hard_kill()
            print(f"hard stop: SIGKILL to {len(killed)} Ray processes of the stack", flush=True)
        else:
            stack.stop()
    left = watch.orphans(within_s=15)
    stop = {"stop": ns.stop, "engine_processes_seen": len(watch.seen), "orphans_after_stop": len(left),
            "orphans": left, "new_parent_1_engines_on_machine": len(set(machine_orphans()) - orphans_before)}
    print(f"after the {ns.stop} stop: {json.dumps(stop)}", flush=True)
    write_result(ns.out, f"fault-kill-{'-'.join(targets)}", ns, rounds=rounds, after_stop=stop)
    bad = [r for r in rounds if r["hung"] or r["failed_before_streaming"] or r["failed_unclean"]
           or r["orphaned_engine_processes"]]
    if ns.stop == "hard":
        os._exit(1 if bad or left else 0)  # the driver's Ray is gone: no clean interpreter exit to wait for
    return 1 if bad or left else 0


if __name__ == "__main__":
    sys.exit(main())
