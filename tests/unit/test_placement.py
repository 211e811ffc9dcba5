"""Deployment options derived from the config: what Ray will reserve for each replica."""

import pytest

from cluster.config import ModelConfig
from cluster.serving.placement import deployment_options


def _gpu(**kw) -> ModelConfig:
    base = dict(name="llama", source="TheBloke/Llama-2-70B-AWQ", quantization="awq", accelerator="A10G",
                tensor_parallel_size=2, max_model_len=4096)
    return ModelConfig(**{**base, **kw})


def test_gpu_replica_gets_one_gpu_bundle_per_worker_and_shares_the_first():
    opts = deployment_options(_gpu(tensor_parallel_size=4, cpus_per_worker=2, placement_strategy="STRICT_PACK"))
    bundles = opts["placement_group_bundles"]
    assert [b["GPU"] for b in bundles] == [1, 1, 1, 1]
    assert [b["CPU"] for b in bundles] == [3, 2, 2, 2]  # the replica actor rides in bundle 0
    assert all(b["accelerator_type:A10G"] == 0.001 for b in bundles)
    assert opts["placement_group_strategy"] == "STRICT_PACK"
    assert opts["ray_actor_options"]["num_cpus"] == 1 and opts["ray_actor_options"]["num_gpus"] == 0
    assert opts["ray_actor_options"]["runtime_env"]["env_vars"]["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] == "0"


def test_pipeline_parallel_multiplies_bundles():
    opts = deployment_options(_gpu(source="meta-llama/Llama-2-70b-hf", quantization="none", accelerator="H100-80GB",
                                   tensor_parallel_size=4, pipeline_parallel_size=2))
    assert len(opts["placement_group_bundles"]) == 8
    assert opts["placement_group_strategy"] == "PACK"


def test_cpu_replica_reserves_a_core_per_worker_and_binds_them(tmp_path):
    (tmp_path / "config.json").write_text(
        '{"model_type": "llama", "hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,'
        ' "intermediate_size": 512, "vocab_size": 512}')
    m = ModelConfig(name="tiny", source=str(tmp_path), accelerator="cpu", tensor_parallel_size=2)
    opts = deployment_options(m)
    assert "placement_group_bundles" not in opts
    assert opts["ray_actor_options"]["num_cpus"] == 2
    assert opts["ray_actor_options"]["runtime_env"]["env_vars"]["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"


def test_replica_bounds_become_fixed_count_or_autoscaling():
    assert deployment_options(_gpu(min_replicas=2, max_replicas=2))["num_replicas"] == 2
    auto = deployment_options(_gpu(min_replicas=1, max_replicas=3))["autoscaling_config"]
    assert (auto["min_replicas"], auto["max_replicas"]) == (1, 3)


def test_hub_style_names_make_valid_deployment_names():
    assert deployment_options(_gpu(name="meta/llama-70b"))["name"] == "model-meta--llama-70b"


def test_strict_pack_refused_on_cpu(tmp_path):
    (tmp_path / "config.json").write_text(
        '{"model_type": "llama", "hidden_size": 256, "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 512, "vocab_size": 512}')
    with pytest.raises(ValueError, match="placement_strategy"):
        ModelConfig(name="t", source=str(tmp_path), accelerator="cpu", placement_strategy="STRICT_PACK")
