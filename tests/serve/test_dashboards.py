"""Every dashboard panel's query returns data from a real Prometheus scraping the loaded test stack."""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import httpx
import openai
import pytest
from ray import serve

from cluster.chart.dashboards import DASHBOARDS, dashboard_json
from tests.serve.conftest import ROOT, _free_port, deploy

pytestmark = pytest.mark.serve

APP = "dash"
LORAS = ("sql", "chat", "poet")  # the tiny adapters `make setup` writes
CHART_DASHBOARDS = ROOT / "helm/kvpilot/dashboards"


def test_committed_dashboards_are_the_generated_ones():
    for uid in DASHBOARDS:
        committed = json.loads((CHART_DASHBOARDS / f"{uid}.json").read_text())
        assert committed == dashboard_json(uid), f"run `kvpilot dashboards` to regenerate {uid}.json"


@pytest.fixture(scope="module")
def prometheus(serve_instance, tmp_path_factory):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (make setup installs Debian's package where apt-get works)")
    work = tmp_path_factory.mktemp("prometheus")
    config = work / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: ray\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{os.environ['KVPILOT_TEST_METRICS_PORT']}']}}]\n"
    )
    port = _free_port()
    proc = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={work / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=(work / "prometheus.log").open("w"),
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def loaded_stack(serve_instance, prometheus):
    """One model with autoscaling bounds (so the autoscaler exports) under a mixed load for ~30 s.

    A quarter of the requests each name one of three LoRA adapters; the engine caches two
    (``max_cpu_loras``), so the rotation loads and evicts adapters for the LoRA panels. A last
    burst of long generations asks for more KV than the engine has (~10k tokens): preemptions.
    Every series comes from this stack, not from what an earlier module left in Ray's exporter.
    """
    adapters = ROOT / ".fixtures/tiny-lora"
    deploy({"models": [{
        "name": "tiny", "source": str(ROOT / ".fixtures/tiny-none"), "dtype": "float16", "accelerator": "cpu",
        "cpu_kv_cache_space_gib": 0.01, "max_model_len": 1024, "max_num_seqs": 16, "min_replicas": 1,
        "max_replicas": 2, "autoscaling": {"metrics_interval_s": 1, "downscale_delay_s": 600},
        "lora": {"adapters": {name: str(adapters / name) for name in LORAS}, "max_loras": 1, "max_cpu_loras": 2,
                 "max_lora_rank": 16},
    }]}, APP, f"/{APP}")
    url = f"{serve_instance}/{APP}/v1"

    async def load():
        client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300)
        shared = list(range(20, 20 + 256))  # two CPU KV blocks shared by every prompt

        async def one(i: int):
            model = "tiny" if i % 4 == 0 else LORAS[i % 4 - 1]
            await client.completions.create(model=model, prompt=shared + [300 + i % 100] * 20, max_tokens=32,
                                            extra_body={"ignore_eos": True})

        deadline = time.monotonic() + 30
        i = 0
        while time.monotonic() < deadline:
            await asyncio.gather(*(one(i + k) for k in range(8)))
            i += 8
        await asyncio.gather(*(client.completions.create(  # 16 x 900 tokens on ~10k of KV
            model="tiny", prompt=[7 + k] * 300, max_tokens=600, extra_body={"ignore_eos": True}) for k in range(16)))

    asyncio.run(load())
    httpx.post(f"{url}/completions", json={"model": "nope", "prompt": "x"})  # an error for the error panels
    yield prometheus
    serve.delete(APP)


def _substitute(expr: str) -> str:
    return expr.replace("$__rate_interval", "2m").replace("$model", ".*")


def _query(prom: str, expr: str) -> list:
    url = f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]["result"]


def _finite(result: list) -> bool:
    return any(math.isfinite(float(series["value"][1])) for series in result)


def _panels():
    for uid in DASHBOARDS:
        for panel in dashboard_json(uid)["panels"]:
            yield uid, panel


@pytest.mark.parametrize(("uid", "panel"), list(_panels()), ids=lambda v: v if isinstance(v, str) else v["title"])
def test_every_panel_query_returns_series(loaded_stack, uid, panel):
    if "(GPU only)" in panel["title"]:
        for target in panel["targets"]:
            assert _query(loaded_stack, _substitute(target["expr"])) == [], "no GPU here, so no series expected"
        return  # NVML series exist only on GPU machines: absent here, as they should be
    deadline = time.monotonic() + 60  # Ray exports every few seconds; Prometheus scrapes every second
    for target in panel["targets"]:
        expr = _substitute(target["expr"])
        while not _finite(result := _query(loaded_stack, expr)) and time.monotonic() < deadline:
            time.sleep(2)
        assert result, f"{uid} / {panel['title']}: no series for {expr}"
        # a panel of NaN (a quantile of nothing, a ratio of zeros) draws nothing: a series is not enough
        assert _finite(result), f"{uid} / {panel['title']}: no finite value in {result[:3]} for {expr}"
