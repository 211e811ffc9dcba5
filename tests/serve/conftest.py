"""Real Ray, real Ray Serve, real vLLM CPU engines on the tiny fixtures (built by `make setup`)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
APP = "kvpilot"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _require_fixtures() -> None:
    missing = [q for q in ("none", "awq") if not (ROOT / ".fixtures" / f"tiny-{q}" / "config.json").is_file()]
    if missing:
        pytest.fail(f".fixtures/tiny-{missing[0]} is missing: run `make setup` (it builds the tiny model fixtures)")


@pytest.fixture(scope="package")
def cluster():
    """kvpilot's two-model CPU config (configs/local-cpu-multi.yaml) under `build_app`, as `serve run` does."""
    import ray
    from ray import serve

    from cluster.config import read_serve_args
    from deployments.app import build_app

    _require_fixtures()
    os.chdir(ROOT)  # the config names its fixtures relative to the checkout
    port = _free_port()
    # 4 logical CPUs on 2 cores: the TP=2 replica reserves 2, the fp16 replica 1.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args, _ = read_serve_args(ROOT / "configs/local-cpu-multi.yaml")
    started = time.monotonic()
    serve.run(build_app(args), name=APP, route_prefix="/")
    print(f"kvpilot ready in {time.monotonic() - started:.0f} s on port {port}")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="package")
def base_url(cluster: str) -> str:
    return cluster


@pytest.fixture
def client(base_url: str):
    import openai

    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def replica_stats(model: str) -> dict:
    from ray import serve

    from cluster.placement import deployment_name

    return serve.get_deployment_handle(deployment_name(model), app_name=APP).stats.remote().result()
