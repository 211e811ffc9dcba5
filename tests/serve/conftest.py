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
def serve_instance():
    """Real Ray (6 logical CPUs on 2 cores) and Ray Serve with its HTTP proxy on a free loopback port."""
    import ray
    from ray import serve

    _require_fixtures()
    os.chdir(ROOT)  # the configs name their fixtures relative to the checkout
    # The TP=2 replica reserves 2 CPUs, each other replica 1: more logical CPUs than cores.
    # Ray serves every process's metrics (kvpilot's included) on this port, for Prometheus.
    metrics_port = _free_port()
    os.environ["KVPILOT_TEST_METRICS_PORT"] = str(metrics_port)
    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False, _metrics_export_port=metrics_port)
    for attempt in range(5):  # a free port can be taken between the probe and the proxy's bind
        port = _free_port()
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            break
        except Exception:
            serve.shutdown()
            if attempt == 4:
                raise
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def deploy(args: dict, name: str, route_prefix: str = "/") -> None:
    """Deploy kvpilot's application from config args, as `serve run` does."""
    from ray import serve

    from deployments.app import build_app

    started = time.monotonic()
    serve.run(build_app(args), name=name, route_prefix=route_prefix)
    print(f"{name} ready in {time.monotonic() - started:.0f} s")


@pytest.fixture(scope="module")
def base_url(serve_instance: str):
    """kvpilot's two-model CPU config (configs/local-cpu-multi.yaml) under `build_app`."""
    from ray import serve

    from cluster.config import read_serve_args

    args, _ = read_serve_args(ROOT / "configs/local-cpu-multi.yaml")
    deploy(args, APP)
    yield serve_instance
    serve.delete(APP)


@pytest.fixture
def client(base_url: str):
    import openai

    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def replica_stats(model: str) -> dict:
    from ray import serve

    from cluster.serving.placement import deployment_name

    return serve.get_deployment_handle(deployment_name(model), app_name=APP).stats.remote().result()
