"""Plans of the checkpoints people run today, from kvpilot's copies of their published config.json."""

from pathlib import Path

import pytest

from cluster.cli.kvpilot import main
from cluster.config import ClusterConfig, ModelConfig
from cluster.planning.hardware import GIB
from cluster.planning.modelspec import load_spec
from cluster.planning.planner import plan_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("config", "quant", "weights_gib", "kv_tokens"), [
    ("llama33-70b-awq-2x48gb.yaml", "awq", 18.55, 138_256),
    ("qwen3-30b-a3b-fp8.yaml", "fp8", 29.04, 464_432),
    ("gpt-oss-120b.yaml", "mxfp4", 60.78, 241_837),
])
def test_new_configs_plan_with_pinned_shapes(config, quant, weights_gib, kv_tokens):
    (model,) = ClusterConfig.from_serve_yaml(ROOT / "configs" / config).models
    plan = plan_model(model)
    assert plan.fits and plan.quantization == quant
    assert plan.per_gpu.weights_bytes / GIB == pytest.approx(weights_gib, abs=0.005)
    assert plan.kv_cache_tokens == kv_tokens


def test_moe_and_mla_shapes_from_the_issue():
    # Mixtral-8x7B AWQ: ~23 GiB with the experts counted (the old planner said 3.87).
    mixtral = plan_model(ModelConfig(name="m", source="TheBloke/Mixtral-8x7B-Instruct-v0.1-AWQ", accelerator="H100-80GB",
                                     max_model_len=4096))
    assert 22.5 < mixtral.per_gpu.weights_bytes / GIB < 24.5
    # DeepSeek-V2-Lite: ~29 GiB bf16; MLA latent KV 27 layers × (512 + 64) × 2 B, the same at TP=2.
    ds = load_spec("deepseek-ai/DeepSeek-V2-Lite")
    assert ds.is_mla and ds.is_moe and not ds.is_sparse_layer(0) and ds.is_sparse_layer(1)
    one = plan_model(ModelConfig(name="m", source="deepseek-ai/DeepSeek-V2-Lite", accelerator="H100-80GB", max_model_len=8192))
    two = plan_model(ModelConfig(name="m", source="deepseek-ai/DeepSeek-V2-Lite", accelerator="H100-80GB", max_model_len=8192,
                                 tensor_parallel_size=2))
    assert one.kv_bytes_per_token == two.kv_bytes_per_token == 31_104
    assert 28.5 < one.per_gpu.weights_bytes / GIB < 30.5
    # Llama-3.1-8B W4A16 (compressed-tensors): 4-bit, not 8.
    w4 = plan_model(ModelConfig(name="m", source="RedHatAI/Meta-Llama-3.1-8B-Instruct-quantized.w4a16",
                                accelerator="L4", max_model_len=8192))
    assert w4.quantization == "compressed-tensors" and 5.0 < w4.per_gpu.weights_bytes / GIB < 5.6


def test_explicit_quantization_contradicting_the_checkpoint_is_refused(capsys):
    rc = main(["plan", "--model", "Qwen/Qwen3-30B-A3B-FP8", "--quantization", "awq", "--gpu", "H100-80GB"])
    err = capsys.readouterr().err
    assert rc == 2 and "quantization: 'awq' does not match the checkpoint" in err and "fp8 blocks 128×128" in err


def test_unknown_architecture_is_refused_by_name(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "mamba", "architectures": ["MambaForCausalLM"]}')
    with pytest.raises(ValueError, match="model_type 'mamba' .* supported: llama"):
        ModelConfig(name="m", source=str(tmp_path), accelerator="cpu")


def test_fp4_on_hopper_falls_back_and_below_ampere_is_refused():
    from cluster.planning.hardware import get_accelerator, quantization_support

    assert quantization_support(get_accelerator("B200"), "nvfp4").note is None
    assert "Marlin" in quantization_support(get_accelerator("H100-80GB"), "nvfp4").note
    assert not quantization_support(get_accelerator("T4"), "nvfp4").supported
