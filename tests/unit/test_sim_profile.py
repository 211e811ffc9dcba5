"""A measured profile in the simulator: the fit recovers a known engine and serving delay, the
simulator adds the delay to what a client sees and nothing else, and the CLI takes the file."""

import argparse
import json
from dataclasses import replace
from pathlib import Path

import pytest
from rich.console import Console

from cluster.cli.simulate import add_simulate_parser, run_simulate
from cluster.config import ClusterConfig
from cluster.sim.host import HostShare
from cluster.sim.profile import DecodeSample, PrefillSample, fit_profile, load_profile
from cluster.sim.simulator import profiled_setup, simulate
from cluster.sim.workload import TraceRequest, Workload

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "local-cpu-multi.yaml"

# A known engine: prefill step 3 ms + 0.02 ms/token; decode step 1.5 ms + 0.04 ms/sequence + 1e-5 ms/context token.
DELAY_MS = 30.0


def _prefill_ms(p: int) -> float:
    return 3.0 + 0.02 * p


def _decode_ms(b: int, ctx: int) -> float:
    return 1.5 + 0.04 * b + 1e-5 * b * ctx


def _measured():
    prefill = [PrefillSample(p, DELAY_MS + _prefill_ms(p)) for p in (17, 65, 129, 257, 513)]
    cached = PrefillSample(513, DELAY_MS + _decode_ms(1, 544))  # one token through the model
    decode = [DecodeSample(b, ctx, _decode_ms(b, ctx)) for ctx in (64, 544) for b in (1, 2, 4, 8, 16)]
    return prefill, cached, decode


def _profile():
    prefill, cached, decode = _measured()
    return fit_profile("tiny-fp16", "http://127.0.0.1:1", "2026-12-01T00:00:00+00:00", prefill, cached, decode)


def test_the_fit_recovers_the_serving_delay_and_the_engine():
    prof = _profile()
    assert prof.serving_delay_s == pytest.approx(DELAY_MS / 1e3, abs=1e-9)
    for p in (17, 300, 513):
        assert prof.step.step_ms(p, p * p / 2, 0, 0) == pytest.approx(_prefill_ms(p), rel=0.02)
    for b, ctx in ((1, 64), (8, 544), (16, 300)):
        assert prof.step.step_ms(0, 0.0, b, b * ctx) == pytest.approx(_decode_ms(b, ctx), rel=0.02)
    assert prof.step.fit.mape < 0.01


def test_a_profile_without_a_lone_decode_is_refused():
    prefill, cached, decode = _measured()
    with pytest.raises(ValueError, match="batch 1"):
        fit_profile("m", "u", "t", prefill, cached, [d for d in decode if d.batch > 1])


def _cfg():
    return ClusterConfig.from_serve_yaml(CONFIG).model("tiny-fp16")


def test_the_delay_is_added_to_ttft_and_latency_and_nothing_else():
    """Sparse arrivals (no queueing): every request's TTFT and end-to-end latency grow by exactly the
    delay; its TPOT does not change."""
    prof = _profile()
    reqs = [TraceRequest(i * 5.0, 200, 20, i) for i in range(6)]
    runs = {}
    for delay in (0.0, prof.serving_delay_s):
        setup = profiled_setup(_cfg(), replace(prof, serving_delay_s=delay), replicas=2)
        _, sims, _ = simulate(Workload("sparse", reqs, "test"), "kvpilot", setup)
        runs[delay] = {s.index: s for s in sims}
    base, delayed = runs[0.0], runs[prof.serving_delay_s]
    for i, s in delayed.items():
        b = base[i]
        assert s.arrival == b.arrival  # the client's send time
        assert s.first_t - s.arrival == pytest.approx(b.first_t - b.arrival + DELAY_MS / 1e3)
        assert s.finish_t - s.first_t == pytest.approx(b.finish_t - b.first_t)


def test_profiled_setup_takes_the_configs_limits():
    setup = profiled_setup(_cfg(), _profile(), replicas=3)
    cfg = _cfg()
    assert (setup.replicas, setup.max_num_seqs, setup.max_model_len) == (3, cfg.max_num_seqs,
                                                                          cfg.effective_max_model_len())
    assert setup.to_dict()["serving_delay_s"] == pytest.approx(0.03)


def _run_cli(args: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_simulate_parser(parser.add_subparsers(dest="command"))
    return run_simulate(parser.parse_args(["simulate", *args]), Console())


def test_simulate_cli_runs_a_profile(tmp_path: Path, capsys):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(_profile().to_dict()))
    trace = tmp_path / "lengths.csv"
    trace.write_text("num_prefill_tokens,num_decode_tokens\n" + "".join(f"{100 + i},{10 + i}\n" for i in range(40)))
    assert _run_cli(["--trace", str(trace), "--rate", "2", "--replicas", "2", "--policies", "kvpilot,round_robin",
                     "--profile", str(path), "--config", str(CONFIG), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["setup"]["model"] == "tiny-fp16" and out["setup"]["serving_delay_s"] == pytest.approx(0.03)
    assert out["perf_model"]["fitted_on"].startswith("a profile of tiny-fp16")
    for res in out["policies"].values():
        assert res["completed"] == 40 and res["ttft_p50_s"] >= 0.03


@pytest.mark.parametrize(("args", "message"), [
    (["--config", str(CONFIG)], "--config: .* applies only with --profile"),
    (["--profile", "PROFILE"], "needs --config"),
    (["--profile", "PROFILE", "--config", str(CONFIG), "--gpu", "A100-80GB"], "--gpu: A100-80GB does not apply"),
    (["--profile", "PROFILE", "--config", str(CONFIG), "--model", "nope"], "--model: 'nope' is not a model"),
])
def test_simulate_cli_refuses_what_does_not_fit_a_profile(tmp_path: Path, args, message):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(_profile().to_dict()))
    args = [str(path) if a == "PROFILE" else a for a in args]
    with pytest.raises(ValueError, match=message):
        _run_cli(["--trace", str(ROOT / "benchmarks/traces/AzureLLMInferenceTrace_conv.csv"), *args])


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d.pop("serving_delay_s"), "field 'serving_delay_s' is missing"),
    (lambda d: d.update(kind="bench-result"), "kind is 'bench-result'"),
    (lambda d: d.update(serving_delay_s=-1), "serving_delay_s -1.0 must be >= 0"),
    (lambda d: d.update(version=7), "version 7"),
])
def test_a_bad_profile_file_names_the_field(tmp_path: Path, edit, message):
    doc = _profile().to_dict()
    edit(doc)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=message):
        load_profile(path)


def test_a_profile_survives_its_file(tmp_path: Path):
    prof = _profile()
    path = tmp_path / "p.json"
    path.write_text(json.dumps(prof.to_dict()))
    assert load_profile(path) == prof


def test_a_fit_with_no_per_token_prefill_cost_still_routes():
    """Least squares may put a measured prefill into attention alone (c_prefill 0, as a CPU stack's
    noisy TTFTs did): the kvpilot policy's prefill speed then comes from a 512-token chunk."""
    prof = _profile()
    step = replace(prof.step, c_prefill=0.0, c0_prefill=0.0, c_attn=1.1e-4)
    assert step.prefill_tokens_per_s() == pytest.approx(512e3 / (1.1e-4 * 512 * 512 / 2))
    setup = profiled_setup(_cfg(), replace(prof, step=step), replicas=2)
    reqs = [TraceRequest(i * 0.05, 300, 10, i) for i in range(20)]
    res, _, _ = simulate(Workload("w", reqs, "test"), "kvpilot", setup)
    assert res.completed == 20


def test_autoscale_runs_on_a_profile_too(tmp_path: Path, capsys):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(_profile().to_dict()))
    trace = tmp_path / "lengths.csv"
    trace.write_text("num_prefill_tokens,num_decode_tokens\n" + "".join(f"{100 + i},{10 + i}\n" for i in range(80)))
    assert _run_cli(["--trace", str(trace), "--rate", "4", "--autoscale", "--autoscalers", "kvpilot",
                     "--min-replicas", "1", "--max-replicas", "3", "--initial-replicas", "1", "--profile", str(path),
                     "--config", str(CONFIG), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["setup"]["serving_delay_s"] == pytest.approx(0.03)
    (result,) = out["autoscalers"].values()
    assert result["completed"] == 80


def _tpots(setup, reqs) -> dict[int, float]:
    _, sims, _ = simulate(Workload("host", reqs, "test"), "kvpilot", setup)
    return {s.index: (s.finish_t - s.first_t) / (s.target - 1) for s in sims}


def test_engines_sharing_one_core_slow_each_other_and_a_lone_one_does_not():
    """Two replicas on one core (one engine stepping alone uses it all): two requests decoding at once take
    about twice as long per token as on accelerators of their own; requests that never overlap do not."""
    setup = profiled_setup(_cfg(), _profile(), replicas=2)
    shared = replace(setup, host=HostShare(cores=1.0, engine_cores=1.0, serving_cpu_s_per_token=0.0))
    together = [TraceRequest(0.0, 200, 400, 0), TraceRequest(0.0, 200, 400, 1)]
    alone, slowed = _tpots(setup, together), _tpots(shared, together)
    assert all(1.8 < slowed[i] / alone[i] < 2.05 for i in (0, 1)), (alone, slowed)
    sparse = [TraceRequest(i * 5.0, 200, 20, i) for i in range(4)]
    assert _tpots(shared, sparse) == pytest.approx(_tpots(setup, sparse))
    # The serving path's CPU per streamed token takes cores from the engines: one request slows down too.
    busy_path = replace(setup, host=HostShare(cores=1.0, engine_cores=1.0, serving_cpu_s_per_token=0.001))
    assert _tpots(busy_path, sparse[:1])[0] > 1.05 * _tpots(setup, sparse[:1])[0]


def test_a_bad_host_share_names_the_field():
    with pytest.raises(ValueError, match=r"HostShare\.cores: 0 must be > 0"):
        HostShare(cores=0, engine_cores=1.0, serving_cpu_s_per_token=0.0)
    with pytest.raises(ValueError, match=r"HostShare\.serving_cpu_s_per_token: -1 must be >= 0"):
        HostShare(cores=2, engine_cores=1.0, serving_cpu_s_per_token=-1)
