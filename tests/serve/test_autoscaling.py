"""kvpilot's autoscaling policy driving the real CPU stack: from zero, up under KV pressure, back down."""

from __future__ import annotations

import asyncio
import time

import openai
import pytest
from ray import serve

from cluster.serving.placement import deployment_name
from tests.serve.conftest import ROOT, deploy

pytestmark = pytest.mark.serve

APP, MODEL = "autoscale", "tiny"


def _args() -> dict:
    return {"models": [{
        "name": MODEL, "source": str(ROOT / ".fixtures/tiny-none"), "dtype": "float16", "accelerator": "cpu",
        # ~10k KV tokens: a burst of long requests fills it.
        "cpu_kv_cache_space_gib": 0.01, "max_model_len": 1024, "max_num_seqs": 32,
        "min_replicas": 0, "max_replicas": 2,
        "autoscaling": {"target_kv_usage": 0.5, "high_kv_usage": 0.8, "upscale_sustained_s": 2,
                        "downscale_delay_s": 10, "startup_s": 5, "trend_window_s": 10,
                        # well after the downscale delay, so "back to one" is seen before "zero"
                        "idle_to_zero_s": 40,
                        "metrics_interval_s": 1},
    }]}


def _running_replicas() -> int:
    dep = serve.status().applications[APP].deployments[deployment_name(MODEL)]
    return dep.replica_states.get("RUNNING", 0)


def _wait_for(count: int, timeout_s: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if _running_replicas() == count:
            return time.monotonic() - started
        time.sleep(1)
    raise AssertionError(f"{count} replica(s) not reached in {timeout_s} s (now {_running_replicas()})")


@pytest.fixture(scope="module")
def url(serve_instance):
    deploy(_args(), APP, f"/{APP}")
    yield f"{serve_instance}/{APP}/v1"
    serve.delete(APP)


def test_scale_from_zero_up_on_kv_pressure_and_back_down(url):
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    assert _running_replicas() == 0

    # The first request at zero replicas waits for one to start and then succeeds (no 503).
    t0 = time.monotonic()
    r = client.completions.create(model=MODEL, prompt="hello", max_tokens=4, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 4
    print(f"cold start answered after {time.monotonic() - t0:.0f} s")

    # Waves of long requests keep the ~10k-token KV cache full: a second replica starts while
    # the pressure lasts (a replica takes ~45 s to start on this machine, longer than one wave).
    async def wave(aclient):
        return await asyncio.gather(*(
            aclient.completions.create(model=MODEL, prompt=[7 + i] * 300, max_tokens=600,
                                       extra_body={"ignore_eos": True})
            for i in range(24)))

    async def pressure_until_two_replicas(limit_s: float = 300):
        aclient = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
        started, waves, peak = time.monotonic(), 0, 1
        while peak < 2 and time.monotonic() - started < limit_s:
            task = asyncio.create_task(wave(aclient))
            while not task.done():
                peak = max(peak, _running_replicas())
                await asyncio.sleep(1)
            results = await task
            assert all(r.usage.completion_tokens == 600 for r in results)  # nothing lost while scaling
            waves += 1
        return peak, waves, time.monotonic() - started

    peak, waves, took = asyncio.run(pressure_until_two_replicas())
    assert peak == 2, f"no second replica after {waves} waves in {took:.0f} s of KV pressure"
    print(f"second replica running after {took:.0f} s ({waves} waves of 24 long requests)")
    # Idle: back to one after the downscale delay, then to zero.
    print(f"back to 1 replica after {_wait_for(1, 240):.0f} s, to 0 after {_wait_for(0, 240):.0f} s more")


def test_wait_at_zero_replicas_is_bounded(serve_instance):
    """With scale to zero, a request that gets no first token within limits.first_token_timeout_s
    (here 1 s, shorter than any engine start) gets a 503 with Retry-After, not an open-ended wait."""
    import httpx

    args = _args()
    args["models"][0]["limits"] = {"first_token_timeout_s": 1}
    deploy(args, "coldbound", "/coldbound")
    try:
        t0 = time.monotonic()
        r = httpx.post(f"{serve_instance}/coldbound/v1/completions", timeout=60,
                       json={"model": MODEL, "prompt": "hello", "max_tokens": 2})
        waited = time.monotonic() - t0
        assert r.status_code == 503, r.text
        err = r.json()["error"]
        assert err["code"] == "first_token_timeout" and "within 1 s" in err["message"], err
        assert int(r.headers["Retry-After"]) >= 1
        print(f"refused after {waited:.1f} s")
    finally:
        serve.delete("coldbound")
