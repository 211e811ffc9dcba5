"""LoRA adapters in the config: each refusal names the adapter, its source and the reason; buffers in the plan."""

from pathlib import Path

import pytest

from cluster.config import ClusterConfig, ConfigError
from cluster.fixtures.tinymodel import TINY_DIMS, TINY_LORAS, write_tiny_lora, write_tiny_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-none", "none")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("loras")
    for name, (rank, alpha, targets) in TINY_LORAS.items():
        write_tiny_lora(out / name, name, rank, alpha, targets)
    return out


def _model(base: Path, lora: dict, **kw) -> dict:
    return {"name": "tiny", "source": str(base), "accelerator": "cpu", "max_model_len": 512, "lora": lora, **kw}


def _errors(*models: dict) -> list[str]:
    with pytest.raises(ConfigError) as e:
        ClusterConfig.from_args({"models": list(models)})
    return e.value.errors


def test_adapters_engine_args_and_bases(base, adapters):
    cfg = ClusterConfig.from_args({"models": [_model(base, {
        "adapters": {"sql": str(adapters / "sql"), "poet": str(adapters / "poet")},
        "max_loras": 2, "max_cpu_loras": 3, "max_lora_rank": 16, "preload": ["sql"]})]})
    m = cfg.models[0]
    args = m.engine_args()
    assert (args["enable_lora"], args["max_loras"], args["max_lora_rank"], args["max_cpu_loras"]) == (True, 2, 16, 3)
    assert cfg.adapter_bases() == {"sql": "tiny", "poet": "tiny"}
    assert m.adapter_paths() == {"sql": str((adapters / "sql").resolve()), "poet": str((adapters / "poet").resolve())}


def test_no_lora_no_lora_engine_args(base):
    args = ClusterConfig.from_args({"models": [{**_model(base, {}), "lora": None}]}).models[0].engine_args()
    assert "enable_lora" not in args


def test_rank_above_max_lora_rank_names_adapter(base, adapters):
    (err,) = _errors(_model(base, {"adapters": {"poet": str(adapters / "poet")}, "max_lora_rank": 8}))
    assert err.startswith(f"args.models[0].lora.adapters.poet: '{adapters / 'poet'}' has rank 16, above max_lora_rank 8")
    assert "raise max_lora_rank to 16" in err


def test_adapter_for_another_base_refused_by_shape(base, tmp_path):
    other = {**TINY_DIMS, "hidden_size": 512}
    write_tiny_lora(tmp_path / "wide", "wide", 8, 16, ("q_proj",), dims=other)
    (err,) = _errors(_model(base, {"adapters": {"wide": str(tmp_path / "wide")}}))
    assert err.startswith("args.models[0].lora.adapters.wide: ")
    assert "input width 512 is not the 256 of" in err and "trained on another base model" in err


def test_adapter_with_more_layers_refused(base, tmp_path):
    write_tiny_lora(tmp_path / "deep", "deep", 8, 16, ("v_proj",), dims={**TINY_DIMS, "num_hidden_layers": 3})
    (err,) = _errors(_model(base, {"adapters": {"deep": str(tmp_path / "deep")}}))
    assert "lora.adapters.deep" in err and "layer 2" in err and "has 2 layers" in err


def test_unknown_target_module_refused(base, adapters, tmp_path):
    import json
    import shutil

    shutil.copytree(adapters / "sql", tmp_path / "gpt2ish")
    cfg_file = tmp_path / "gpt2ish" / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "target_modules": ["c_attn"]}))
    (err,) = _errors(_model(base, {"adapters": {"gpt2ish": str(tmp_path / "gpt2ish")}}))
    assert "lora.adapters.gpt2ish" in err and "targets 'c_attn'" in err and "another architecture" in err


def test_missing_adapter_and_bad_preload_and_ranks(base, adapters, tmp_path):
    (err,) = _errors(_model(base, {"adapters": {"gone": str(tmp_path / "nope")}}))
    assert err.startswith("args.models[0].lora.adapters.gone: ") and "no such adapter directory" in err
    (err,) = _errors(_model(base, {"adapters": {"sql": str(adapters / "sql")}, "preload": ["chat"]}))
    assert err == "args.models[0].lora.preload: 'chat' is not an adapter; adapters: sql"
    (err,) = _errors(_model(base, {"adapters": {}, "max_lora_rank": 12}))
    assert err.startswith("args.models[0].lora.max_lora_rank: 12 is not a rank vLLM supports")
    (err,) = _errors(_model(base, {"adapters": {}, "max_loras": 4, "max_cpu_loras": 2}))
    assert err == "args.models[0].lora.max_cpu_loras: 2 is below max_loras 4"


def test_adapter_name_clashing_with_a_model_refused(base, adapters):
    (err,) = _errors(_model(base, {"adapters": {"other": str(adapters / "sql")}}),
                     {**_model(base, None), "name": "other"})
    assert "'other' names an adapter of tiny and another model or adapter" in err


def test_quantized_moe_base_refused(adapters):
    fixture = ROOT / ".fixtures" / "tiny-mixtral-none"
    if not (fixture / "config.json").is_file():
        pytest.fail(".fixtures/tiny-mixtral-none is missing: run `make setup`")
    (err,) = _errors(_model(fixture, {"adapters": {"sql": str(adapters / "sql")}}, quantization="fp8",
                            accelerator="H100-80GB"))
    assert err.startswith(f"args.models[0].lora: '{fixture}' cannot serve LoRA adapters: it is a mixture of experts "
                          "with fp8 experts")


def test_w8a8_base_on_cpu_refused(adapters):
    fixture = ROOT / ".fixtures" / "tiny-w8a8"
    if not (fixture / "config.json").is_file():
        pytest.fail(".fixtures/tiny-w8a8 is missing: run `make setup`")
    (err,) = _errors(_model(fixture, {"adapters": {"sql": str(adapters / "sql")}}))
    assert err.startswith(f"args.models[0].lora: '{fixture}' cannot serve LoRA adapters: it is W8A8 int8")


def test_awq_and_gptq_bases_take_the_adapters(adapters):
    for q in ("awq", "gptq"):
        fixture = ROOT / ".fixtures" / f"tiny-{q}"
        if not (fixture / "config.json").is_file():
            pytest.fail(f".fixtures/tiny-{q} is missing: run `make setup`")
        lora = {"adapters": {n: str(adapters / n) for n in TINY_LORAS}, "max_cpu_loras": 4}
        m = ClusterConfig.from_args({"models": [_model(fixture, lora, quantization=q)]}).models[0]
        assert m.engine_args()["enable_lora"] is True


def test_placement_allows_runtime_lora_updates_only_with_lora(base, adapters):
    from cluster.serving.placement import deployment_options

    with_lora = ClusterConfig.from_args({"models": [_model(base, {"adapters": {"sql": str(adapters / "sql")}})]})
    without = ClusterConfig.from_args({"models": [{**_model(base, None)}]})
    env = deployment_options(with_lora.models[0])["ray_actor_options"]["runtime_env"]["env_vars"]
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "1"
    env = deployment_options(without.models[0])["ray_actor_options"]["runtime_env"]["env_vars"]
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in env


def test_frontend_args_preload_through_vllms_parser(base, adapters):
    from deployments.vllm_frontend import frontend_args

    m = ClusterConfig.from_args({"models": [_model(base, {
        "adapters": {"sql": str(adapters / "sql"), "chat": str(adapters / "chat")}, "preload": ["chat"]})]}).models[0]
    mods = frontend_args(m).lora_modules
    assert [(x.name, x.path, x.base_model_name) for x in mods] == [("chat", str((adapters / "chat").resolve()), "tiny")]


def test_admin_keys_are_accepted_keys_and_only_they_are_admin():
    from cluster.serving.security import ADMIN_API_KEYS_ENV, API_KEYS_ENV, load_keys

    user, admin = "u" * 24, "a" * 24
    store = load_keys(None, {API_KEYS_ENV: user, ADMIN_API_KEYS_ENV: admin})
    u, a = store.verify(user), store.verify(admin)
    assert u is not None and a is not None and len(store) == 2
    assert store.is_admin(a) and not store.is_admin(u) and not store.is_admin(None) and not store.is_admin("zz")
    assert not load_keys(None, {API_KEYS_ENV: user}).is_admin(u)  # no admin keys configured: nobody is


def test_planner_counts_lora_slots_per_gpu_and_their_kv_tokens(base, adapters):
    from cluster.config import ModelConfig
    from cluster.planning.planner import plan_model

    def plan(tp: int, lora: dict | None):
        return plan_model(ModelConfig.model_validate({**_model(base, lora), "accelerator": "L4",
                                                      "tensor_parallel_size": tp, "dtype": "float16"}))

    lora = {"adapters": {"sql": str(adapters / "sql")}, "max_loras": 4, "max_lora_rank": 16, "max_cpu_loras": 8}
    # Per layer, A's input + B's output of q, k, v, gate, up (column-parallel) and o, down (row-parallel):
    # TP 1: (256+256) + 2 × (256+128) + 2 × (256+512) + (256+256) + (512+256) = 4096
    # TP 2: B split on the column-parallel, A on the row-parallel: 2944
    for tp, per_layer in ((1, 4096), (2, 2944)):
        with_lora, without = plan(tp, lora), plan(tp, None)
        assert with_lora.per_gpu.lora_bytes == 4 * 16 * per_layer * 2 * 2  # slots × rank × widths × layers × fp16
        assert without.per_gpu.lora_bytes == 0
        lost = without.kv_cache_tokens - with_lora.kv_cache_tokens
        assert abs(lost - with_lora.per_gpu.lora_bytes / with_lora.kv_bytes_per_token) <= with_lora.block_size
        line = next(a for a in with_lora.assumptions if a.startswith("LoRA:"))
        assert f"{with_lora.per_gpu.lora_bytes // with_lora.kv_bytes_per_token:,} KV tokens" in line
        assert "host cache of 8 adapters" in line


@pytest.mark.parametrize("source", ["~no-such-user-kvpilot/adapter", "", "/", "not a hub id", "a/b/c"])
def test_an_adapter_source_that_is_no_adapter_is_a_hub_error(source):
    """The admin load route answers these with 400 (HubError); anything else would be a 500 (a fuzz case)."""
    from cluster.planning.hub import HubError, resolve_adapter

    with pytest.raises(HubError):
        resolve_adapter(source)


def test_only_lora_on_the_cpu_engine_refuses_prompt_logprobs(base, adapters):
    lora = {"adapters": {"sql": str(adapters / "sql")}}
    on_cpu = ClusterConfig.from_args({"models": [_model(base, lora)]}).models[0]
    plain = ClusterConfig.from_args({"models": [{**_model(base, {}), "lora": None}]}).models[0]
    on_gpu = ClusterConfig.from_args({"models": [{**_model(base, lora), "accelerator": "A10G"}]}).models[0]
    assert (on_cpu.serves_prompt_logprobs, plain.serves_prompt_logprobs, on_gpu.serves_prompt_logprobs) == (
        False, True, True)
