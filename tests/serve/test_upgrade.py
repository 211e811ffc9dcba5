"""In-place updates under load: a changed config deployed over a serving app drops no stream.

The same app is deployed three times, as `serve deploy` of an edited config would: first
``max_num_seqs`` 4, then 8 (new model replicas and a new ingress replace the old ones, which
drain), then with a second model added. Streaming clients run the whole time.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from ray import serve

from tests.serve.conftest import ROOT, deploy
from tests.serve.test_hardening import _Outcome, _one_stream

pytestmark = pytest.mark.serve

APP = "upgrade"
CLIENTS, MAX_TOKENS = 6, 120


def _model(name: str, max_num_seqs: int) -> dict:
    return {"name": name, "source": str(ROOT / ".fixtures/tiny-none"), "dtype": "float16", "accelerator": "cpu",
            "cpu_kv_cache_space_gib": 0.25, "max_model_len": 1024, "max_num_seqs": max_num_seqs,
            "min_replicas": 1, "max_replicas": 1}


@pytest.fixture(scope="module")
def app(serve_instance):
    deploy({"models": [_model("tiny", 4)]}, APP, f"/{APP}")
    yield f"{serve_instance}/{APP}"
    serve.delete(APP)


def _n_request(base: str, n: int) -> int:
    r = httpx.post(f"{base}/v1/completions", timeout=120,
                   json={"model": "tiny", "prompt": "Hello", "max_tokens": 2, "n": n, "temperature": 1.0})
    return r.status_code


def test_config_updates_under_load_drop_no_stream(app):
    assert _n_request(app, 6) == 400  # n above max_num_seqs 4 is refused before the engine
    outcomes: list[_Outcome] = []

    async def client(http: httpx.AsyncClient, stop: asyncio.Event, k: int) -> None:
        while not stop.is_set():
            out = _Outcome()
            outcomes.append(out)
            await _one_stream(http, app, k, out, MAX_TOKENS)

    async def main() -> list[float]:
        stop = asyncio.Event()
        took = []
        async with httpx.AsyncClient(timeout=httpx.Timeout(300.0)) as http:
            clients = [asyncio.create_task(client(http, stop, k)) for k in range(CLIENTS)]
            await asyncio.sleep(3)
            for models in ([_model("tiny", 8)], [_model("tiny", 8), _model("tiny2", 4)]):
                started = time.monotonic()
                await asyncio.to_thread(deploy, {"models": models}, APP, f"/{APP}")
                took.append(time.monotonic() - started)
                await asyncio.sleep(3)
            stop.set()
            await asyncio.wait(clients, timeout=300)
        return took

    took = asyncio.run(main())
    results = [o.result for o in outcomes]
    counts = {k: results.count(k) for k in sorted(set(results))}
    print(f"{len(outcomes)} streams across two updates ({took[0]:.0f} s, {took[1]:.0f} s): {counts}")
    assert counts == {"completed": len(outcomes)}, counts
    assert _n_request(app, 6) == 200  # the new max_num_seqs is the one in force
    r = httpx.post(f"{app}/v1/completions", json={"model": "tiny2", "prompt": "Hi", "max_tokens": 2}, timeout=120)
    assert r.status_code == 200, r.text
