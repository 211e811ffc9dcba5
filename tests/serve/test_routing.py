"""The live router on the real stack: prefix-aware routing reuses vLLM's prefix cache."""

from __future__ import annotations

import asyncio
import random
import statistics
import time

import openai
import pytest
from ray import serve

from tests.serve.conftest import ROOT, deploy

pytestmark = pytest.mark.serve

BLOCK = 128  # vLLM's KV block on CPU
GROUPS, PER_GROUP = 16, 4
SHARED, UNIQUE = 3 * BLOCK, 20


def _args(policy: str) -> dict:
    return {"models": [{
        "name": "tiny", "source": str(ROOT / ".fixtures/tiny-none"), "dtype": "float16", "accelerator": "cpu",
        "cpu_kv_cache_space_gib": 1, "max_model_len": 1024, "max_num_seqs": 16,
        "min_replicas": 2, "max_replicas": 2, "routing": {"policy": policy},
    }]}


@pytest.fixture(scope="module")
def apps(serve_instance):
    for policy in ("kvpilot", "pow2"):
        deploy(_args(policy), f"route-{policy}", f"/{policy}")
    yield serve_instance
    for policy in ("kvpilot", "pow2"):
        serve.delete(f"route-{policy}")


async def _hit_rate(base_url: str, policy: str) -> tuple[float, int, float]:
    """Shared-prefix workload under load: 16 documents of 3 KV blocks, each asked 4 questions.

    The first question of every document goes out at once (16 concurrent). Then, while 6 long
    generations on unrelated prompts keep the replicas busy, the other questions go out in three
    rounds, one question per document each round, all 16 of a round together: the router must
    weigh a cached prefix against a longer queue. Rounds keep the placements independent: a
    router blind to prefixes sends each round's question to its document's replica about half
    the time (each round in a new order: a balancer that alternates would otherwise send every
    document where it went first). Returns vLLM's own hit rate on the repeats, how many repeats
    computed their document again (fewer than its 3 blocks cached), and their median TTFT.
    """
    client = openai.AsyncOpenAI(base_url=f"{base_url}/{policy}/v1", api_key="unused", max_retries=0, timeout=300)
    rng = random.Random(0)
    docs = [[rng.randrange(10, 480) for _ in range(SHARED)] for _ in range(GROUPS)]

    async def ask(doc: list[int]) -> tuple[int, int, float]:
        prompt = doc + [rng.randrange(10, 480) for _ in range(UNIQUE)]
        started = time.monotonic()
        stream = await client.completions.create(model="tiny", prompt=prompt, max_tokens=4, stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True})
        ttft, usage = None, None
        async for chunk in stream:
            if ttft is None and chunk.choices:
                ttft = time.monotonic() - started
            usage = chunk.usage or usage
        return usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens, ttft  # vLLM's own counts

    async def background() -> None:
        prompt = [rng.randrange(10, 480) for _ in range(200)]
        await client.completions.create(model="tiny", prompt=prompt, max_tokens=300, extra_body={"ignore_eos": True})

    await asyncio.gather(*(ask(doc) for doc in docs))
    load = [asyncio.create_task(background()) for _ in range(6)]
    await asyncio.sleep(0.5)
    repeats = []
    for _ in range(PER_GROUP - 1):
        order = rng.sample(docs, len(docs))  # not the first round's order, which a load balancer would repeat
        repeats += await asyncio.gather(*(ask(doc) for doc in order))
    await asyncio.gather(*load)
    total = sum(p for p, _, _ in repeats)
    cached = sum(c for _, c, _ in repeats)
    recomputed = sum(c < SHARED for _, c, _ in repeats)
    return cached / total, recomputed, statistics.median(t for _, _, t in repeats)


def test_kvpilot_router_reuses_prefix_cache_more_than_pow2_under_load(apps):
    kvpilot, kvpilot_misses, kvpilot_ttft = asyncio.run(_hit_rate(apps, "kvpilot"))
    pow2, pow2_misses, pow2_ttft = asyncio.run(_hit_rate(apps, "pow2"))
    repeats = GROUPS * (PER_GROUP - 1)
    print(f"prefix-cache hit rate on repeats under load: kvpilot {kvpilot:.3f}, pow2 {pow2:.3f}; "
          f"repeats that computed their document again: kvpilot {kvpilot_misses}/{repeats}, "
          f"pow2 {pow2_misses}/{repeats}; TTFT p50 kvpilot {kvpilot_ttft * 1000:.0f} ms, pow2 {pow2_ttft * 1000:.0f} ms")
    # Ideal: every repeat finds its document's 3 blocks (384 of 404 tokens = 0.95 hit rate). A router
    # blind to prefixes misses about half of the first round (8 of 16), then about half of the
    # documents still held by one replica (4), then 2: about 14 of 48 (mean of 200,000 random draws,
    # none of which gave 5 or fewer). kvpilot may spill a few to the less loaded replica.
    assert kvpilot_misses <= GROUPS // 4, kvpilot_misses
    assert pow2_misses >= kvpilot_misses + 4, (kvpilot_misses, pow2_misses)
    assert kvpilot > pow2
