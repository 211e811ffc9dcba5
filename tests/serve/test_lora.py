"""LoRA adapters on the real stack: one app, two CPU replicas of the tiny AWQ base with three tiny adapters.

``sql`` is preloaded, ``chat`` configured and loaded on first use, ``poet`` loaded at run time
through the admin API. Outputs are checked against vLLM's offline ``LLM`` with the same engine
arguments and the same adapter (greedy), run in a subprocess.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time

import httpx
import pytest
from ray import serve

from cluster.config import ClusterConfig
from tests.serve.conftest import ROOT, deploy

pytestmark = pytest.mark.serve

APP = "lora"
BASE = "tiny-awq"
ADAPTERS = ROOT / ".fixtures" / "tiny-lora"
USER_KEY, ADMIN_KEY = "sk-kvpilot-lora-user-0000000001", "sk-kvpilot-lora-admin-000000001"
PROMPTS = ["The quick brown fox", "Memory on the accelerator is"]
MAX_TOKENS = 12


def _args(keys: dict[str, str]) -> dict:
    return {
        "models": [{
            "name": BASE, "source": str(ROOT / ".fixtures/tiny-awq"), "quantization": "awq", "dtype": "float16",
            "accelerator": "cpu", "cpu_kv_cache_space_gib": 0.25, "max_model_len": 512, "max_num_seqs": 8,
            "min_replicas": 2, "max_replicas": 2,
            "lora": {"adapters": {"sql": str(ADAPTERS / "sql"), "chat": str(ADAPTERS / "chat")},
                     "max_loras": 2, "max_cpu_loras": 3, "max_lora_rank": 16, "preload": ["sql"]},
        }],
        "ingress": {"auth": "required", "api_keys_file": keys["user"], "admin_api_keys_file": keys["admin"]},
    }


@pytest.fixture(scope="module")
def url(serve_instance, tmp_path_factory):
    if not (ADAPTERS / "sql" / "adapter_config.json").is_file():
        pytest.fail(".fixtures/tiny-lora is missing: run `make setup` (it builds the tiny adapters)")
    d = tmp_path_factory.mktemp("lora-keys")
    (d / "user").write_text(USER_KEY + "\n")
    (d / "admin").write_text(ADMIN_KEY + "\n")
    args = _args({"user": str(d / "user"), "admin": str(d / "admin")})
    deploy(args, APP)
    yield serve_instance
    serve.delete(APP)


@pytest.fixture(scope="module")
def offline() -> dict[str, list[str]]:
    """vLLM's offline LLM, same engine arguments, greedy: {adapter or "base": [completion per prompt]}."""
    model = ClusterConfig.from_args(_args({"user": "/dev/null", "admin": "/dev/null"}) | {"ingress": {}}).models[0]
    kwargs = {k: v for k, v in model.engine_args().items() if k not in ("served_model_name",)}
    script = f"""
import json
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest
llm = LLM(**{kwargs!r})
sp = SamplingParams(temperature=0, max_tokens={MAX_TOKENS})
out = {{"base": [o.outputs[0].text for o in llm.generate({PROMPTS!r}, sp, use_tqdm=False)]}}
for i, name in enumerate(["sql", "chat", "poet"], 1):
    req = LoRARequest(name, i, {str(ADAPTERS)!r} + "/" + name)
    out[name] = [o.outputs[0].text for o in llm.generate({PROMPTS!r}, sp, lora_request=req, use_tqdm=False)]
print("RESULT " + json.dumps(out))
"""
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


def _complete(url: str, model: str, prompt: str, key: str = USER_KEY) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", headers={"Authorization": f"Bearer {key}"}, timeout=120,
                      json={"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0})


def _texts(url: str, model: str) -> list[str]:
    out = []
    for p in PROMPTS:
        r = _complete(url, model, p)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == model
        out.append(r.json()["choices"][0]["text"])
    return out


def test_models_lists_adapters_with_their_parent(url):
    r = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {USER_KEY}"})
    cards = {m["id"]: m for m in r.json()["data"]}
    assert cards[BASE]["parent"] is None
    assert {cards["sql"]["parent"], cards["chat"]["parent"]} == {BASE}
    assert "poet" not in cards


def test_adapter_output_differs_from_base_and_equals_offline_vllm(url, offline):
    base = _texts(url, BASE)
    assert base == offline["base"]
    for name in ("sql", "chat"):  # preloaded, and loaded on first use
        got = _texts(url, name)
        print(f"{name}: stack {got!r} offline {offline[name]!r} base {base!r}")
        assert got == offline[name]
        assert got != base


def test_unknown_adapter_is_openais_404(url):
    r = _complete(url, "no-such-adapter", PROMPTS[0])
    assert r.status_code == 404
    assert r.json() == {"error": {"message": "The model `no-such-adapter` does not exist.",
                                  "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}


def test_load_and_unload_at_run_time_admin_only(url, offline):
    body = {"lora_name": "poet", "lora_path": str(ADAPTERS / "poet")}
    r = httpx.post(f"{url}/v1/load_lora_adapter", headers={"Authorization": f"Bearer {USER_KEY}"}, json=body)
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_key_required"
    assert _complete(url, "poet", PROMPTS[0]).status_code == 404  # the refused load changed nothing
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    r = httpx.post(f"{url}/v1/load_lora_adapter", headers=admin, json=body, timeout=120)
    assert r.status_code == 200, r.text
    for _ in range(3):  # both replicas serve it: the one that loaded it and any other, which registers it
        assert _texts(url, "poet") == offline["poet"]
    cards = {m["id"]: m for m in httpx.get(f"{url}/v1/models", headers=admin).json()["data"]}
    assert cards["poet"]["parent"] == BASE
    r = httpx.post(f"{url}/v1/load_lora_adapter", headers=admin, timeout=60,
                   json={"lora_name": "wide", "lora_path": str(ROOT / ".fixtures" / "tiny-none")})
    assert r.status_code == 400 and "adapter_config.json" in r.json()["error"]["message"]  # a model, not an adapter
    r = httpx.post(f"{url}/v1/unload_lora_adapter", headers=admin, json={"lora_name": "poet"}, timeout=60)
    assert r.status_code == 200, r.text
    assert _complete(url, "poet", PROMPTS[0]).status_code == 404
    r = httpx.post(f"{url}/v1/unload_lora_adapter", headers=admin, json={"lora_name": "poet"})
    assert r.status_code == 404


def _adapter_requests(adapter: str) -> dict[str, float]:
    """kvpilot_lora_requests_total per replica for one adapter, as Ray's metrics endpoint serves it now."""
    port = os.environ["KVPILOT_TEST_METRICS_PORT"]
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("ray_kvpilot_lora_requests_total{") and f'adapter="{adapter}"' in line:
            replica = re.search(r'replica="([^"]+)"', line).group(1)
            counts[replica] = counts.get(replica, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def _counted(adapter: str, total: int, timeout_s: float = 60) -> dict[str, float]:
    """Wait until Ray exports ``total`` requests of ``adapter`` (it exports every few seconds)."""
    deadline = time.monotonic() + timeout_s
    while sum((counts := _adapter_requests(adapter)).values()) < total and time.monotonic() < deadline:
        time.sleep(1)
    assert sum(counts.values()) == total, (counts, total)
    return counts


def test_an_adapter_stays_on_its_replica_until_that_replica_is_saturated(url):
    """Loaded at run time, ``stick`` is held by one replica: one request at a time all go there;
    a burst of long generations, more than its engine's 8 slots, spreads to the other replica."""
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    r = httpx.post(f"{url}/v1/load_lora_adapter", headers=admin, timeout=120,
                   json={"lora_name": "stick", "lora_path": str(ADAPTERS / "poet")})
    assert r.status_code == 200, r.text
    time.sleep(3)  # the holder reports its adapters with its routing stats (every second)
    for _ in range(8):
        assert _complete(url, "stick", PROMPTS[0]).status_code == 200
    alone = _counted("stick", 8)
    assert len(alone) == 1, f"one request at a time went to more than one replica: {alone}"
    holder = next(iter(alone))

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=300, headers={"Authorization": f"Bearer {USER_KEY}"}) as http:
            rs = await asyncio.gather(*(http.post(f"{url}/v1/completions", json={
                "model": "stick", "prompt": f"{PROMPTS[1]} {i}", "max_tokens": 200, "ignore_eos": True})
                for i in range(24)))
        return [r.status_code for r in rs]

    assert asyncio.run(burst()) == [200] * 24
    after = _counted("stick", 8 + 24)
    print(f"stick: one at a time {alone}; after a burst of 24 {after}")
    assert after[holder] - alone[holder] >= 8, after  # the holder filled its batch first
    assert len(after) == 2, f"the burst stayed on the saturated holder: {after}"
