"""A burst at ``--factor`` x capacity: admitted requests finish, the rest get 503 + Retry-After at once.

A local stack (its own Ray; ``fault_stack.py``) serves the tiny fp16 model with one CPU replica
(``--max-num-seqs`` engine slots, ``limits.max_queued_requests`` = ``--max-queued`` in flight per
model: the capacity). ``--factor`` x ``--max-queued`` streamed completions are sent at once.
Reported: completed; refused cleanly (503, an OpenAI error object, ``Retry-After``) and how fast
(p50/max seconds to the refusal); failed otherwise (any other status, no ``[DONE]``, a broken
connection); hung (no end within ``--stream-timeout``, must be 0); seconds from the burst until
the model takes a request again (200) and until the whole burst has ended; and, after the stack
is stopped, its engine processes still alive (orphans, must be 0). Exit status 1 if anything
failed uncleanly, hung or was orphaned.

    .venv/bin/python benchmarks/fault_burst.py                   # 5 x 32 streams at once
    .venv/bin/python benchmarks/fault_burst.py --factor 10 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fault_stack import (EngineWatch, LocalStack, is_openai_error, add_fault_args, start_stack,  # noqa: E402
                         tiny_model, write_result)
from cluster.bench.client import sse_data  # noqa: E402

MODEL = "tiny"


@dataclass
class Outcome:
    result: str = "hung"  # completed | refused_clean | failed | hung
    seconds: float = 0.0  # to the refusal, or to the end of the stream


async def one(http: httpx.AsyncClient, url: str, i: int, out: Outcome, max_tokens: int, t0: float) -> None:
    body = {"model": MODEL, "prompt": f"Burst request {i} says", "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True}
    try:
        async with http.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                clean = is_openai_error((await r.aread()).decode())
                ok = r.status_code == 503 and clean and r.headers.get("retry-after", "").isdigit()
                out.result = "refused_clean" if ok else "failed"
                return
            done = error = False
            async for data in sse_data(r.aiter_bytes()):
                if data == "[DONE]":
                    done = True
                elif "error" in json.loads(data):
                    error = True
            out.result = "completed" if done and not error else "failed"
    except httpx.TimeoutException:
        out.result = "hung"
    except (httpx.HTTPError, ValueError):
        out.result = "failed"
    finally:
        out.seconds = time.monotonic() - t0


def one_round(stack: LocalStack, n: int, max_tokens: int, stream_timeout: float) -> dict:
    outcomes = [Outcome() for _ in range(n)]
    back_at: list[float] = []

    async def main() -> float:
        t0 = time.monotonic()
        timeout = httpx.Timeout(stream_timeout, connect=30.0)
        async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=n + 8)) as http:
            tasks = [asyncio.create_task(one(http, stack.url, i, outcomes[i], max_tokens, t0)) for i in range(n)]
            await asyncio.sleep(0.5)
            while not back_at:  # capacity is back when a new request is admitted and answered
                r = await http.post(f"{stack.url}/v1/completions", json={"model": MODEL, "prompt": "ping",
                                                                           "max_tokens": 1})
                if r.status_code == 200:
                    back_at.append(time.monotonic() - t0)
                else:
                    await asyncio.sleep(0.25)
            await asyncio.wait(tasks, timeout=stream_timeout + 30)
            return time.monotonic() - t0

    ended = asyncio.run(main())
    counts = {k: sum(o.result == k for o in outcomes) for k in ("completed", "refused_clean", "failed", "hung")}
    refused = [o.seconds for o in outcomes if o.result == "refused_clean"]
    return {"requests": n, "max_tokens": max_tokens, **counts,
            "refusal_p50_s": round(statistics.median(refused), 3) if refused else None,
            "refusal_max_s": round(max(refused), 3) if refused else None,
            "seconds_until_capacity_back": round(back_at[0], 1) if back_at else None,
            "seconds_until_burst_ended": round(ended, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--factor", type=float, default=5.0, help="burst size as a multiple of --max-queued")
    p.add_argument("--max-queued", type=int, default=32, help="limits.max_queued_requests: the admitted capacity")
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=1)
    add_fault_args(p, stream_timeout=300.0, num_cpus=4, recover=False)
    ns = p.parse_args(argv)

    model = tiny_model(MODEL, 1, max_num_seqs=ns.max_num_seqs, limits={"max_queued_requests": ns.max_queued})
    stack = LocalStack({"models": [model]}, num_cpus=ns.num_cpus)
    start_stack(stack)
    watch, rounds = EngineWatch(), []
    n = int(ns.factor * ns.max_queued)
    try:
        for i in range(ns.rounds):
            watch.see(stack.processes())
            r = one_round(stack, n, ns.max_tokens, ns.stream_timeout)
            rounds.append(r)
            print(f"round {i + 1}: {json.dumps(r)}", flush=True)
    finally:
        watch.see(stack.processes())
        stack.stop()
    left = watch.orphans(within_s=15)
    print(f"after the stop: engine processes seen {len(watch.seen)}, orphans {len(left)} {left}", flush=True)
    write_result(ns.out, "fault-burst", ns, rounds=rounds, orphans_after_stop=len(left))
    return 1 if left or any(r["failed"] or r["hung"] for r in rounds) else 0


if __name__ == "__main__":
    sys.exit(main())
