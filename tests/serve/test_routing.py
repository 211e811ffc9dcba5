"""The live router on the real stack: prefix-aware routing reuses vLLM's prefix cache."""

from __future__ import annotations

import random

import openai
import pytest
from ray import serve

from tests.serve.conftest import ROOT, deploy

pytestmark = pytest.mark.serve

BLOCK = 128  # vLLM's KV block on CPU
GROUPS, PER_GROUP = 8, 4
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


def _hit_rate(base_url: str, policy: str) -> float:
    """Shared-prefix workload: 8 documents of 3 KV blocks, each asked 4 questions, interleaved."""
    client = openai.OpenAI(base_url=f"{base_url}/{policy}/v1", api_key="unused", max_retries=0, timeout=120)
    rng = random.Random(0)
    docs = [[rng.randrange(10, 480) for _ in range(SHARED)] for _ in range(GROUPS)]
    cached = total = 0
    for round_ in range(PER_GROUP):
        for doc in docs:
            prompt = doc + [rng.randrange(10, 480) for _ in range(UNIQUE)]
            r = client.completions.create(model="tiny", prompt=prompt, max_tokens=4, extra_body={"ignore_eos": True})
            total += r.usage.prompt_tokens
            cached += r.usage.prompt_tokens_details.cached_tokens  # vLLM's own count of prefix-cache hits
    return cached / total


def test_kvpilot_router_reuses_prefix_cache_more_than_pow2(apps):
    kvpilot = _hit_rate(apps, "kvpilot")
    pow2 = _hit_rate(apps, "pow2")
    print(f"prefix-cache hit rate: kvpilot {kvpilot:.3f}, pow2 {pow2:.3f}")
    # Ideal: every repeat of a document hits its 3 blocks: 3/4 × 384/404 = 0.713.
    assert kvpilot > 0.65
    assert kvpilot > pow2
