"""Config schema: what a user writing serve YAML sees when they get it right and wrong."""

from pathlib import Path

import pytest
import yaml

from cluster.cli.kvpilot import main
from cluster.config import ClusterConfig, ConfigError, ModelConfig

ROOT = Path(__file__).resolve().parents[2]


def _serve_yaml(tmp_path: Path, models: list[dict]) -> Path:
    doc = {
        "applications": [
            {"name": "kvpilot", "route_prefix": "/", "import_path": "deployments.app:build_app", "args": {"models": models}}
        ]
    }
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


GOOD = {"name": "m", "source": "TheBloke/Llama-2-70B-AWQ", "quantization": "awq", "accelerator": "A10G",
        "tensor_parallel_size": 2, "max_model_len": 4096}


def _errors(tmp_path: Path, *models: dict) -> list[str]:
    with pytest.raises(ConfigError) as e:
        ClusterConfig.from_serve_yaml(_serve_yaml(tmp_path, list(models)))
    return e.value.errors


def test_shipped_config_loads():
    cfg = ClusterConfig.from_serve_yaml(ROOT / "configs/llama70b-awq.yaml")
    m = cfg.models[0]
    assert (m.quantization, m.tensor_parallel_size, m.accelerator) == ("awq", 2, "A10G")


def test_tp_that_does_not_divide_heads_names_path_value_and_model(tmp_path):
    errs = _errors(tmp_path, GOOD, {**GOOD, "name": "b", "source": "meta-llama/Llama-2-70b-hf",
                                   "quantization": "none", "tensor_parallel_size": 3})
    assert errs == [
        "applications[0].args.models[1].tensor_parallel_size: 3 does not divide the 64 attention heads "
        "of meta-llama/Llama-2-70b-hf"
    ]


def test_squeezellm_refused_with_alternatives(tmp_path):
    (err,) = _errors(tmp_path, {**GOOD, "quantization": "squeezellm"})
    assert err.startswith("applications[0].args.models[0].quantization: 'squeezellm'")
    assert "removed from vLLM" in err and "awq" in err and "gptq" in err


def test_unknown_field_suggests_the_right_one(tmp_path):
    (err,) = _errors(tmp_path, {**GOOD, "tensor_paralel_size": 2})
    assert "models[0].tensor_paralel_size" in err and "'tensor_parallel_size'" in err


def test_every_error_is_reported_not_just_the_first(tmp_path):
    errs = _errors(tmp_path, {**GOOD, "max_num_seqs": 0}, {**GOOD, "name": "b", "gpu_memory_utilization": 1.5})
    assert any("models[0].max_num_seqs: 0" in e for e in errs)
    assert any("models[1].gpu_memory_utilization: 1.5" in e for e in errs)


def test_wrong_type_names_value(tmp_path):
    (err,) = _errors(tmp_path, {**GOOD, "tensor_parallel_size": "two"})
    assert err.startswith("applications[0].args.models[0].tensor_parallel_size: 'two'")


@pytest.mark.parametrize(
    ("accel", "quant", "source"),
    [("V100-32GB", "awq", "TheBloke/Llama-2-7B-AWQ"), ("T4", "fp8", "meta-llama/Meta-Llama-3-8B")],
)
def test_quantization_the_gpu_cannot_run_is_refused(tmp_path, accel, quant, source):
    (err,) = _errors(tmp_path, {**GOOD, "source": source, "quantization": quant, "accelerator": accel,
                                "tensor_parallel_size": 1})
    assert f"models[0].quantization: '{quant}' cannot run on {accel}" in err
    assert "compute capability" in err


def test_fp8_on_ampere_is_downgraded_with_a_warning():
    m = ModelConfig(name="m", source="meta-llama/Meta-Llama-3-8B", quantization="fp8", accelerator="A100-80GB")
    (note,) = m.notes()
    assert "weight-only" in note and "Marlin" in note
    h100 = ModelConfig(name="m", source="meta-llama/Meta-Llama-3-8B", quantization="fp8", accelerator="H100-80GB")
    assert h100.notes() == []


def test_quantization_must_match_checkpoint(tmp_path):
    (err,) = _errors(tmp_path, {**GOOD, "quantization": "gptq"})
    assert "models[0].quantization: 'gptq' does not match the checkpoint, which is awq-quantized" in err
    (err,) = _errors(tmp_path, {**GOOD, "source": "meta-llama/Llama-2-70b-hf"})
    assert "needs a pre-quantized checkpoint" in err


def test_duplicate_model_names_refused(tmp_path):
    (err,) = _errors(tmp_path, GOOD, GOOD)
    assert err == "applications[0].args.models: 'm' is the name of two models; names must be unique"


def test_cpu_only_and_gpu_only_fields_are_not_silently_ignored(tmp_path):
    (err,) = _errors(tmp_path, {**GOOD, "cpu_kv_cache_space_gib": 2})
    assert "cpu_kv_cache_space_gib: 2.0 applies only to accelerator cpu" in err


def test_unknown_hub_id_says_what_to_do(tmp_path):
    (err,) = _errors(tmp_path, {**GOOD, "source": "someone/unknown-model", "quantization": "none"})
    assert "models[0].source: 'someone/unknown-model' cannot be read" in err and "local model directory" in err


def test_engine_kwargs_may_not_shadow_fields(tmp_path):
    (err,) = _errors(tmp_path, {**GOOD, "engine_kwargs": {"max_model_len": 10}})
    assert "engine_kwargs" in err and "'max_model_len' is a field of its own" in err


def test_max_model_len_beyond_training_context(tmp_path):
    (err,) = _errors(tmp_path, {**GOOD, "max_model_len": 100_000})
    assert "models[0].max_model_len: 100000 exceeds the 4096 positions" in err


def test_missing_application(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("applications:\n- name: other\n  import_path: foo:bar\n")
    with pytest.raises(ConfigError, match="no application with import_path deployments.app:build_app"):
        ClusterConfig.from_serve_yaml(path)


def test_validate_cli_prints_all_errors_and_exits_nonzero(tmp_path, capsys):
    path = _serve_yaml(tmp_path, [{**GOOD, "max_num_seqs": -1}, {**GOOD, "name": "b", "quantization": "squeezellm"}])
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "models[0].max_num_seqs: -1" in err and "models[1].quantization: 'squeezellm'" in err


def test_validate_cli_accepts_good_config(capsys):
    assert main(["validate", str(ROOT / "configs/llama70b-awq.yaml")]) == 0
    assert "valid (1 model)" in capsys.readouterr().out


def _w8a8(**kw) -> ModelConfig:
    fixture = ROOT / ".fixtures" / "tiny-w8a8"
    if not (fixture / "config.json").is_file():
        pytest.fail(".fixtures/tiny-w8a8 is missing: run `make setup`")
    return ClusterConfig.from_args({"models": [{"name": "w", "source": str(fixture), "accelerator": "cpu",
                                                **kw}]}).models[0]


def test_w8a8_on_a_cpu_with_amx_runs_in_bfloat16():
    # The fixture's checkpoint is float16; vLLM 0.32's AMX int8 kernel aborts in float16 (test_planner_truth.py).
    assert _w8a8().engine_args(host_has_amx=True)["dtype"] == "bfloat16"
    assert _w8a8().engine_args(host_has_amx=False)["dtype"] == "auto"  # oneDNN takes float16
    assert _w8a8(dtype="bfloat16").engine_args(host_has_amx=True)["dtype"] == "bfloat16"
    with pytest.raises(ValueError, match=r"dtype: 'float16' \(model 'w'\) cannot run W8A8 INT8 on this CPU"):
        _w8a8(dtype="float16").engine_args(host_has_amx=True)
    unquantized = ClusterConfig.from_args({"models": [{"name": "n", "source": str(ROOT / ".fixtures" / "tiny-none"),
                                                       "accelerator": "cpu"}]}).models[0]
    assert unquantized.engine_args(host_has_amx=True)["dtype"] == "auto"
