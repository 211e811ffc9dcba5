"""``kvpilot bench --profile OUT``: measure a live endpoint for the simulator, over HTTP only.

The measurements and how they become a step model and a per-request serving delay are in
``cluster.sim.profile``. Here they are taken, one shape at a time, through ``run_benchmark``
(streamed completions, token-id prompts, ``ignore_eos``), each shape from its own seed so no
prompt is in the prefix cache before it is meant to be:

1. prefill: ``reps`` lone requests (one at a time) of each prompt length, one output token;
2. cached: the longest prefill shape whose length is a power of two plus one, sent again at once
   (before longer prompts can evict it): the cache holds its whole power-of-two head, whatever the
   engine's block size up to that, and the engine computes one token;
3. decode: ``B`` × ``replicas`` concurrent streams of ``DECODE_OUTPUT`` tokens (the router
   spreads them, about ``B`` per replica) for each batch size and each of two prompt lengths;
   the median time per output token after the first. Batches whose sequences would not fit
   ``kv_tokens`` (one replica's KV cache) are skipped: the engine would queue or preempt them.

Run it on an idle deployment: what else the engines run lands in the measurements. Lone
requests measure one replica whichever the router picks; on a CPU host the replicas share
cores, so an idle one still slows a busy one. It takes 5–25 s on the tiny CPU model.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from datetime import datetime, timezone

from cluster.bench.metrics import RequestRecord
from cluster.bench.runner import BenchConfig, run_benchmark
from cluster.bench.workload import DEFAULT_TOKEN_ID_RANGE, Workload, build_workload
from cluster.sim.profile import DecodeSample, PrefillSample, ServingProfile, fit_profile

PREFILL_LENGTHS = (17, 65, 129, 257, 385, 513, 769, 1025, 2049)  # powers of two + 1 among them (the cached shape)
DECODE_PROMPTS = (32, 512)
DECODE_BATCHES = (1, 2, 4, 8, 16, 32)
DECODE_OUTPUT = 64
SEED_BASE = 60_000  # far from kvpilot bench's default seeds: a profile after a run finds nothing cached


def _is_power_of_two_plus_one(n: int) -> bool:
    m = n - 1
    return m > 0 and m & (m - 1) == 0


def run_profile(base_url: str, model: str, max_model_len: int, *, reps: int = 3, max_batch: int = 32,
                replicas: int = 1, kv_tokens: int | None = None,
                token_id_range: tuple[int, int] = DEFAULT_TOKEN_ID_RANGE, api_key: str | None = None,
                say: Callable[[str], None] = lambda _: None) -> ServingProfile:
    """Measure ``model`` at ``base_url`` and fit its profile; ``say`` gets one line per shape."""
    if reps < 1:
        raise ValueError(f"--profile-reps: {reps} must be >= 1")
    if max_batch < 1:
        raise ValueError(f"--profile-max-batch: {max_batch} must be >= 1")
    if replicas < 1:
        raise ValueError(f"--profile-replicas: {replicas} must be >= 1")
    seeds = iter(range(SEED_BASE, SEED_BASE + 10_000))

    def shape(n: int, prompt: int, output: int) -> Workload:
        return build_workload(num_requests=n, input_len=prompt, output_len=output, seed=next(seeds),
                              token_id_range=token_id_range)

    def measure(wl: Workload, concurrency: int) -> list[RequestRecord]:
        cfg = BenchConfig(base_url=base_url, model=model, mode="concurrency", concurrency=concurrency,
                          api_key=api_key, request_timeout_s=120.0)
        res = run_benchmark(cfg, wl)
        if res.summary["failed"]:
            raise RuntimeError(f"profile: {res.summary['failed']} of {len(wl.requests)} requests of "
                               f"{wl.requests[0].input_len} prompt tokens failed ({res.summary['errors']}); "
                               f"is {base_url} serving {model}?")
        return res.records

    def ttft_ms(records: list[RequestRecord]) -> float:
        return statistics.median(r.ttft_s * 1e3 for r in records)

    measured_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    measure(shape(2, 64, 8), 1)  # warm-up: the first requests of a shape pay allocation
    lengths = [p for p in PREFILL_LENGTHS if p + 1 <= max_model_len]
    cached_len = max((p for p in lengths if _is_power_of_two_plus_one(p)), default=None)
    if cached_len is None:
        raise ValueError(f"--profile: max_model_len {max_model_len} leaves no prompt length of 2^k + 1 "
                         f"among {PREFILL_LENGTHS} to measure a cached prompt")
    prefill, cached = [], None
    for p in lengths:
        wl = shape(reps, p, 1)
        prefill.append(PrefillSample(p, ttft_ms(measure(wl, 1))))
        say(f"prefill {p:5d} tokens: TTFT {prefill[-1].ttft_ms:.1f} ms")
        if p == cached_len:  # again at once, before longer prompts can evict it from a small cache
            cached = PrefillSample(p, ttft_ms(measure(wl, 1)))
            say(f"cached {p:5d} tokens (all but one): TTFT {cached.ttft_ms:.1f} ms")
    decode = []
    for length in DECODE_PROMPTS:
        if length + DECODE_OUTPUT > max_model_len:
            continue
        for b in DECODE_BATCHES:
            if b > max_batch or (kv_tokens is not None and b * (length + DECODE_OUTPUT) > kv_tokens):
                continue  # more than the engine runs at once: it would queue or preempt, not step
            # Per request (latency - TTFT) / (tokens - 1): a stream may carry several tokens in one
            # chunk when the client reads late, so single gaps are not steps, their sum is.
            n = b * replicas  # the router spreads concurrent streams: about b on each replica
            tpots = [r.tpot_s for r in measure(shape(n, length, DECODE_OUTPUT), n)]
            decode.append(DecodeSample(b, length + DECODE_OUTPUT // 2, statistics.median(tpots) * 1e3))
            say(f"decode batch {b:2d} at context {length + DECODE_OUTPUT // 2}: TPOT p50 {decode[-1].itl_ms:.2f} ms")
    return fit_profile(model, base_url, measured_at, prefill, cached, decode)
