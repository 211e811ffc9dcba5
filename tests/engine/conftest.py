"""Tiny model fixtures and a subprocess runner for real vLLM CPU engines.

``fixture_dir(q)`` gives the directory of the tiny ``q`` model (``none``,
``awq`` or ``gptq``): ``$KVPILOT_FIXTURES_DIR/tiny-<q>`` when that exists,
otherwise one built once per session under pytest's tmp dir.

``run_engines(specs, env)`` runs one or more engines *sequentially* in a fresh
Python subprocess and returns their JSON results.  Engines run out of process
because the per-engine settings that matter here (``VLLM_CPU_OMP_THREADS_BIND``
for TP=2) are environment variables read at engine start, and a crashed
engine (e.g. a SIGFPE in a worker) must fail one test, not kill pytest.
Two ``LLM`` objects one after another (``del`` + ``gc.collect()``) do work in
one process, so several TP=1 engines share one subprocess to save the import
time.  The worker script keeps its engine code under
``if __name__ == "__main__":``: vLLM's CPU executor spawns its engine-core and
worker processes, which re-import the main module.  Never run engines in
parallel: the test machine has 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

QUANTS = ("none", "awq", "gptq")

# Runs inside the subprocess.  argv: spec file, result file.
# A spec is {name: {model, quantization, tp, kv_cache_dtype, prompts, chat,
#                   score_ids}}; score_ids is a list of token-id lists to score
# with prompt_logprobs=20, "self" (this engine's prompt + greedy output) or
# "from:<name>" (the texts an earlier engine in the same spec scored).
_WORKER = r'''
import gc, json, sys, time

def run_one(spec):
    from vllm import LLM, SamplingParams
    t0 = time.monotonic()
    llm = LLM(model=spec["model"], quantization=spec.get("quantization"), dtype="float16",
              max_model_len=512, enforce_eager=True, seed=0,
              tensor_parallel_size=spec.get("tp", 1),
              kv_cache_dtype=spec.get("kv_cache_dtype", "auto"))
    res = {"load_s": time.monotonic() - t0}
    gen = SamplingParams(temperature=0.0, max_tokens=spec.get("max_tokens", 16),
                         ignore_eos=True, logprobs=5)
    outs = llm.generate(spec["prompts"], gen)
    res["prompt_ids"] = [list(o.prompt_token_ids) for o in outs]
    res["gen_ids"] = [list(o.outputs[0].token_ids) for o in outs]
    res["gen_text"] = [o.outputs[0].text for o in outs]
    res["gen_logprobs"] = [
        [{str(k): v.logprob for k, v in step.items()} for step in o.outputs[0].logprobs]
        for o in outs]
    texts = spec.get("score_ids")
    if texts == "self":
        texts = [p + g for p, g in zip(res["prompt_ids"], res["gen_ids"])]
    if texts:
        sp = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=20)
        outs = llm.generate([{"prompt_token_ids": ids} for ids in texts], sp)
        res["score_ids"] = texts
        # per text, per position 1..: {token_id: logprob} (top-20 + the actual token)
        res["prompt_logprobs"] = [
            [{str(k): v.logprob for k, v in pos.items()} for pos in o.prompt_logprobs[1:]]
            for o in outs]
    if spec.get("chat"):
        msgs = [{"role": "user", "content": "Tell me about the sea."}]
        out = llm.chat(msgs, gen)[0]
        res["chat_prompt_ids"] = list(out.prompt_token_ids)
        res["chat_text"] = out.outputs[0].text
        res["chat_gen_ids"] = list(out.outputs[0].token_ids)
    res["total_s"] = time.monotonic() - t0
    del llm
    gc.collect()
    return res

def main():
    specs = json.load(open(sys.argv[1]))
    results = {}
    for name, spec in specs.items():
        ref = spec.get("score_ids")
        if isinstance(ref, str) and ref.startswith("from:"):
            spec["score_ids"] = results[ref[5:]]["score_ids"]
        results[name] = run_one(spec)
        with open(sys.argv[2], "w") as f:
            json.dump(results, f)

if __name__ == "__main__":
    main()
'''


@pytest.fixture(scope="session")
def fixture_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``fixture_dir(q) -> Path`` of the tiny model ``tiny-<q>``.

    Reuses ``$KVPILOT_FIXTURES_DIR/tiny-<q>`` if it holds a ``config.json``;
    otherwise builds it (once per session) with
    :func:`cluster.fixtures.tinymodel.write_tiny_model` under the session tmp dir.
    """
    built: dict[str, Path] = {}
    root: list[Path] = []

    def get(q: str) -> Path:
        if q not in QUANTS:
            raise ValueError(f"unknown fixture {q!r}; expected one of {QUANTS}")
        env = os.environ.get("KVPILOT_FIXTURES_DIR")
        if env and (Path(env) / f"tiny-{q}" / "config.json").is_file():
            return Path(env) / f"tiny-{q}"
        if q not in built:
            pytest.importorskip("torch")
            pytest.importorskip("safetensors")
            pytest.importorskip("tokenizers")
            from cluster.fixtures.tinymodel import write_tiny_model

            if not root:
                root.append(tmp_path_factory.mktemp("tiny-models"))
            built[q] = write_tiny_model(root[0] / f"tiny-{q}", q, seed=0)
        return built[q]

    return get


def run_engines(specs: dict, env: dict[str, str] | None = None, timeout: float = 900) -> dict:
    """Run the engines in ``specs`` one after another in a fresh subprocess.

    Returns ``{name: result}`` (see ``_WORKER`` above for the keys).  Fails
    the calling test with the log tail if the subprocess dies or times out.
    """
    pytest.importorskip("vllm")
    import tempfile

    with tempfile.TemporaryDirectory(prefix="kvpilot-engine-") as d:
        script, spec_f, out_f = Path(d) / "worker.py", Path(d) / "spec.json", Path(d) / "out.json"
        script.write_text(_WORKER)
        spec_f.write_text(json.dumps(specs))
        full_env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})}
        try:
            p = subprocess.run(
                [sys.executable, str(script), str(spec_f), str(out_f)],
                env=full_env, cwd=d, capture_output=True, text=True, timeout=timeout,
            )
        except subprocess.TimeoutExpired as e:
            out = e.stdout or ""
            tail = out.decode(errors="replace") if isinstance(out, bytes) else out
            pytest.fail(f"engine subprocess timed out after {timeout}s:\n{tail[-4000:]}")
        if p.returncode != 0:
            pytest.fail(f"engine subprocess failed (rc={p.returncode}):\n{(p.stdout + p.stderr)[-6000:]}")
        results = json.loads(out_f.read_text())
        # vLLM logs "CPU KV cache size: N tokens, ..." once per engine, in the order the engines ran.
        logged = [int(m.replace(",", "")) for m in re.findall(r"CPU KV cache size: ([\d,]+) tokens", p.stdout + p.stderr)]
        if len(logged) != len(results):
            pytest.fail(f"expected {len(results)} 'CPU KV cache size' log lines, found {logged}")
        for res, tokens in zip(results.values(), logged):
            res["logged_kv_tokens"] = tokens
        return results
