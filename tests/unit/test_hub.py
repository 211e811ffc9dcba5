"""Hub sources through the real huggingface_hub client against a loopback hub server.

Each case runs ``kvpilot`` in a subprocess with ``HF_ENDPOINT`` pointed at
``tests/hub_server.py`` and a fresh ``HF_HOME``, because the library reads those
variables when it is imported. Nothing reaches the network; nothing is mocked.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.fixtures.tinymodel import write_tiny_moe
from cluster.planning.hub import read_local_headers
from cluster.planning.modelspec import KNOWN_MODELS_DIR, spec_from_config_dict
from cluster.planning.weights import config_tensors
from tests.hub_server import HubServer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def repos(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hub")
    moe = write_tiny_moe(root / "tiny-moe", "qwen3moe", "awq")
    gated = root / "gated"
    shutil.copytree(moe, gated)
    (gated / ".gated").write_text("secret-token")
    return {
        "kvpilot-test/tiny-qwen3moe-awq": moe,
        "kvpilot-test/gated-moe": gated,
        "Qwen/Qwen3-30B-A3B-FP8": KNOWN_MODELS_DIR / "Qwen/Qwen3-30B-A3B-FP8",
    }


def _kvpilot(server: HubServer, home: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    full |= {"HF_ENDPOINT": server.url, "HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1", **env}
    return subprocess.run([sys.executable, "-m", "cluster.cli.kvpilot", *args], env=full, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_plan_of_a_hub_repo_reads_headers_by_ranged_get_and_pins_the_commit(repos, tmp_path):
    with HubServer(repos) as hub:
        p = _kvpilot(hub, tmp_path, "plan", "--model", "kvpilot-test/tiny-qwen3moe-awq", "--gpu", "cpu", "--json",
                     "--max-model-len", "512")
        assert p.returncode == 0, p.stderr
        (plan,) = json.loads(p.stdout)["models"]
        commit = hub.commits["kvpilot-test/tiny-qwen3moe-awq"]
        weights_get = [r for r in hub.requests if r[0] == "GET" and r[1].endswith(".safetensors")]
    assert any(commit in a for a in plan["assumptions"])
    assert any("safetensors headers of 1 file(s), ranged reads" in a for a in plan["assumptions"])
    assert plan["quantization"] == "awq"  # auto: from quantization_config
    # Only the header was read, never the weights.
    assert weights_get and all(rng == "bytes=0-100000" for _, _, rng in weights_get)
    local = ModelPlanLocal(repos["kvpilot-test/tiny-qwen3moe-awq"])
    assert plan["per_gpu"]["weights_bytes"] == local["per_gpu"]["weights_bytes"]
    assert plan["kv_cache_tokens"] == local["kv_cache_tokens"]


def ModelPlanLocal(path: Path) -> dict:  # noqa: N802 - reads like the plan it returns
    from cluster.config import ModelConfig
    from cluster.planning.planner import plan_model

    return plan_model(ModelConfig(name="m", source=str(path), accelerator="cpu", max_model_len=512)).to_dict()


def test_offline_plan_uses_the_cache_and_errors_name_the_repo(repos, tmp_path):
    with HubServer(repos) as hub:
        assert _kvpilot(hub, tmp_path, "plan", "--model", "Qwen/Qwen3-30B-A3B-FP8", "--gpu", "H100-80GB").returncode == 0
        missing = _kvpilot(hub, tmp_path, "plan", "--model", "nobody/no-such-model", "--gpu", "H100-80GB")
        gated = _kvpilot(hub, tmp_path, "plan", "--model", "kvpilot-test/gated-moe", "--gpu", "cpu")
        allowed = _kvpilot(hub, tmp_path / "h2", "plan", "--model", "kvpilot-test/gated-moe", "--gpu", "cpu",
                           "--max-model-len", "512", HF_TOKEN="secret-token")
        bad_rev = _kvpilot(hub, tmp_path, "plan", "--model", "Qwen/Qwen3-30B-A3B-FP8", "--revision", "v9", "--gpu", "H100-80GB")
    offline = _kvpilot(hub, tmp_path, "plan", "--model", "Qwen/Qwen3-30B-A3B-FP8", "--gpu", "H100-80GB", HF_HUB_OFFLINE="1")
    offline_uncached = _kvpilot(hub, tmp_path, "plan", "--model", "kvpilot-test/tiny-qwen3moe-awq", "--gpu", "cpu",
                                HF_HUB_OFFLINE="1")
    unreachable = _kvpilot(hub, tmp_path / "h3", "plan", "--model", "kvpilot-test/tiny-qwen3moe-awq", "--gpu", "cpu")
    assert missing.returncode == 2 and "nobody/no-such-model: no such repository" in missing.stderr
    assert gated.returncode == 2 and "kvpilot-test/gated-moe" in gated.stderr and "HF_TOKEN" in gated.stderr
    assert allowed.returncode == 0, allowed.stderr
    assert bad_rev.returncode == 2 and "revision 'v9' not found" in bad_rev.stderr
    assert offline.returncode == 0 and "at commit" in offline.stdout  # from the cache the online plan filled
    assert offline_uncached.returncode == 2 and "HF_HUB_OFFLINE is set" in offline_uncached.stderr
    assert unreachable.returncode == 2 and "cannot be reached" in unreachable.stderr


def test_config_arithmetic_reproduces_the_checkpoint_tensors(tmp_path):
    for style in ("mixtral", "qwen3moe"):
        for quant in ("none", "awq", "gptq"):
            d = write_tiny_moe(tmp_path / f"{style}-{quant}", style, quant)
            spec = spec_from_config_dict(str(d), json.loads((d / "config.json").read_text()))
            assert _stacked(config_tensors(spec)) == _stacked(read_local_headers(d)), (style, quant)


def _stacked(tensors) -> dict[tuple[str, str], int]:
    """Elements per (name with the expert index dropped, dtype): checkpoints store experts one by one."""
    import math
    import re

    out: dict[tuple[str, str], int] = {}
    for name, t in tensors.items():
        key = (re.sub(r"experts\.\d+\.", "experts.", name), t.dtype)
        out[key] = out.get(key, 0) + math.prod(t.shape)
    return out
