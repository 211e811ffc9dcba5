"""Planner arithmetic against published vLLM load figures and hand-computed cases."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from cluster.cli.kvpilot import main
from cluster.config import ModelConfig
from cluster.planning.hardware import GIB
from cluster.planning.modelspec import QuantSpec, load_spec
from cluster.planning.planner import kv_bytes_per_token, plan_model, weight_bytes_per_gpu

ROOT = Path(__file__).resolve().parents[2]


def test_llama3_8b_bf16_weights_match_vllm_log():
    # vLLM logs "Model loading took 14.96 GiB" for Llama-3-8B in bf16 (vllm-project/vllm#12330).
    got = weight_bytes_per_gpu(load_spec("meta-llama/Meta-Llama-3-8B"), "none", "bfloat16") / GIB
    assert got == pytest.approx(14.96, rel=0.02)


def test_mistral_7b_v03_gptq_weights_match_vllm_log():
    spec = replace(load_spec("mistralai/Mistral-7B-Instruct-v0.3"), quant=QuantSpec("gptq"))
    got = weight_bytes_per_gpu(spec, "gptq", "float16") / GIB
    assert got == pytest.approx(3.89, rel=0.02)


def test_awq_linear_bytes_by_hand():
    # One 256x512 linear, group 128: codes 256*512/2, fp16 scales 2*512*2, packed zeros 2*512/2.
    spec = replace(load_spec("meta-llama/Llama-2-7b-hf"), num_layers=1, hidden_size=256, num_heads=4, num_kv_heads=4,
                   head_dim=64, intermediate_size=512, vocab_size=64, quant=QuantSpec("awq"), rotary_dim=0)
    per_linear = lambda i, o: i * o // 2 + (i // 128) * o * 2 + (i // 128) * o // 2  # noqa: E731
    layer = per_linear(256, 768) + per_linear(256, 256) + per_linear(256, 1024) + per_linear(512, 256)
    norms = 2 * 256 * 2 + 256 * 2
    embed_and_head = 2 * 64 * 256 * 2
    attn_scales = 4 * 4  # vLLM's fp32 _q/_k/_v/_prob scale buffers of the attention layer
    assert weight_bytes_per_gpu(spec, "awq", "float16") == layer + norms + embed_and_head + attn_scales


def test_tensor_parallel_shards_weights_and_kv():
    spec = load_spec("TheBloke/Llama-2-70B-AWQ")
    one = weight_bytes_per_gpu(spec, "awq", "float16", tp=1)
    two = weight_bytes_per_gpu(spec, "awq", "float16", tp=2)
    assert two == pytest.approx(one / 2, rel=0.001)  # only norms are replicated
    # 80 layers × 2 × (8 KV heads / 2) × 128 × 2 bytes
    assert kv_bytes_per_token(spec, "auto", "float16", tp=2) == 80 * 2 * 4 * 128 * 2
    assert kv_bytes_per_token(spec, "fp8", "float16", tp=2) == 80 * 2 * 4 * 128
    # More ranks than KV heads: each rank keeps one whole head (replicated).
    assert kv_bytes_per_token(spec, "auto", "float16", tp=16) == 80 * 2 * 1 * 128 * 2


def test_cpu_kv_tokens_follow_vllm_block_arithmetic(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_hidden_layers": 2, "intermediate_size": 512, "vocab_size": 512,
        "max_position_embeddings": 2048, "torch_dtype": "float16"}))
    cfg = ModelConfig(name="t", source=str(model), accelerator="cpu", cpu_kv_cache_space_gib=1, max_model_len=1000)
    plan = plan_model(cfg)
    per_token = 2 * 2 * 2 * 64 * 2  # layers × K,V × KV heads × head_dim × fp16
    blocks = GIB // (128 * per_token)
    assert plan.num_blocks == blocks
    # vLLM: concurrency = blocks / ceil(1000/128); tokens = int(concurrency × max_model_len)
    assert plan.kv_cache_tokens == int(blocks / 8 * 1000)


def test_shipped_70b_config_fits_with_kv_left(capsys):
    assert main(["plan", str(ROOT / "configs/llama70b-awq.yaml"), "--json"]) == 0
    (m,) = json.loads(capsys.readouterr().out)["models"]
    assert m["fits"] and m["tensor_parallel_size"] == 2 and m["gpu"] == "A10G"
    assert set(m["per_gpu"]) == {"weights_bytes", "kv_cache_bytes", "activation_bytes", "overhead_bytes", "budget_bytes",
                                 "lora_bytes"}
    assert m["per_gpu"]["lora_bytes"] == 0  # no lora: section
    assert m["kv_cache_tokens"] >= 4 * 4096 and m["max_concurrency"] >= 4
    pg = m["per_gpu"]
    assert pg["weights_bytes"] + pg["kv_cache_bytes"] + pg["activation_bytes"] + pg["overhead_bytes"] \
        + pg["lora_bytes"] <= pg["budget_bytes"]


def test_70b_awq_on_one_24gb_gpu_is_refused_with_the_fix(capsys):
    rc = main(["plan", "--model", "TheBloke/Llama-2-70B-AWQ", "--quantization", "awq", "--tp", "1",
               "--gpu", "A10G", "--max-model-len", "4096", "--gpu-memory-utilization", "0.95"])
    out = capsys.readouterr().out
    assert rc == 3
    assert "does not fit" in out and "short by" in out
    assert "tensor_parallel_size: 2 fits" in out


def test_plan_on_another_gpu(capsys):
    assert main(["plan", str(ROOT / "configs/llama70b-awq.yaml"), "--gpu", "H100-80GB", "--json"]) == 0
    (m,) = json.loads(capsys.readouterr().out)["models"]
    assert m["gpu"] == "H100-80GB" and m["kv_cache_tokens"] > 200_000


def test_unquantized_model_that_does_not_fit_suggests_quantization(capsys):
    rc = main(["plan", "--model", "meta-llama/Meta-Llama-3-8B", "--gpu", "T4", "--max-model-len", "4096"])
    out = capsys.readouterr().out
    assert rc == 3 and "4-bit AWQ/GPTQ checkpoint" in out


def test_sizes_table(capsys):
    assert main(["sizes", "meta-llama/Meta-Llama-3-8B"]) == 0
    out = capsys.readouterr().out
    assert "8.03 B parameters" in out and "14.96 GiB" in out and "4-bit AWQ" in out
