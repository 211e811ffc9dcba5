"""The configs we ship plan as fitting on the GPUs they declare, and docs/configuration.md documents every field."""

from pathlib import Path

import pytest

from cluster.config import ClusterConfig, ModelConfig
from cluster.planning.planner import plan_model

ROOT = Path(__file__).resolve().parents[2]
GPU_CONFIGS = ["llama70b-awq.yaml", "mistral7b-gptq.yaml", "llama3-8b-fp8.yaml"]


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_gpu_configs_fit_their_declared_gpu(name):
    for model in ClusterConfig.from_serve_yaml(ROOT / "configs" / name).models:
        assert model.accelerator != "cpu"
        plan = plan_model(model)
        assert plan.fits, f"{name}: {model.name} does not fit {model.accelerator}"
        assert plan.max_concurrency >= 1


def test_gpu_configs_cover_awq_tp2_gptq_and_fp8_kv():
    models = [m for n in GPU_CONFIGS for m in ClusterConfig.from_serve_yaml(ROOT / "configs" / n).models]
    assert any(m.quantization == "awq" and m.tensor_parallel_size == 2 for m in models)
    assert any(m.quantization == "gptq" and m.tensor_parallel_size == 1 for m in models)
    assert any(m.quantization == "fp8" and m.kv_cache_dtype == "fp8" and m.accelerator == "H100-80GB" for m in models)


def test_configuration_reference_documents_every_config_field():
    reference = (ROOT / "docs" / "configuration.md").read_text()
    missing = [f for f in ModelConfig.model_fields if f"`{f}`" not in reference]
    assert not missing, f"docs/configuration.md's table lacks {missing}"
