"""A real kvpilot stack to fuzz: its own Ray, Serve, the ingress and one tiny CPU engine.

The model's outputs are clamped small (``limits.max_tokens: 8``, ``max_model_len: 256``) so
that cases that reach the engine cost a fraction of a second; everything else is as served.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "sk-kvpilot-fuzz-000000000000000000"
MAX_TOKENS = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fuzz_args(keys_file: Path) -> dict:
    return {
        "models": [{
            "name": "tiny", "source": str(ROOT / ".fixtures/tiny-none"), "dtype": "float16", "accelerator": "cpu",
            "cpu_kv_cache_space_gib": 0.25, "max_model_len": 256, "max_num_seqs": 32,
            "limits": {"max_tokens": MAX_TOKENS, "max_queued_requests": 256},
            # Adapter management is fuzzed too (the key is also an admin key), on a base with one adapter.
            "lora": {"adapters": {"sql": str(ROOT / ".fixtures/tiny-lora/sql")}, "max_loras": 1,
                     "max_lora_rank": 16, "preload": ["sql"]},
        }],
        "ingress": {"auth": "required", "api_keys_file": str(keys_file), "admin_api_keys_file": str(keys_file),
                    "requests_per_minute": 1_000_000, "tokens_per_minute": 100_000_000},
    }


@pytest.fixture(scope="package")
def fuzz_url(tmp_path_factory) -> str:
    import ray
    from ray import serve

    from deployments.app import build_app

    for fixture in ("tiny-none/config.json", "tiny-lora/sql/adapter_config.json"):
        if not (ROOT / ".fixtures" / fixture).is_file():
            pytest.fail(f".fixtures/{fixture} is missing: run `make setup` (it builds the tiny fixtures)")
    keys = tmp_path_factory.mktemp("fuzz") / "api-keys"
    keys.write_text(API_KEY + "\n")
    os.chdir(ROOT)
    # address="local": a Ray of its own, never someone else's `ray start` cluster on this machine.
    for attempt in range(3):  # on a loaded machine the GCS can miss its start-up deadline
        try:
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        started = time.monotonic()
        serve.run(build_app(fuzz_args(keys)), name="fuzz", route_prefix="/")
        print(f"fuzz stack ready in {time.monotonic() - started:.0f} s")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
