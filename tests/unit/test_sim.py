"""The simulator: vLLM scheduler invariants on tiny workloads, trace loaders, perf-model fit, the CLI's JSON."""

import argparse
import json
from pathlib import Path

import pytest
from rich.console import Console

from cluster.cli.simulate import add_simulate_parser, run_simulate
from cluster.routing.policies import POLICIES
from cluster.sim.engine import Replica, SimRequest, run_alone
from cluster.sim.metrics import summarize
from cluster.sim.perfmodel import FitError, StepModel, fit_table, step_model_for
from cluster.sim.simulator import make_setup, simulate
from cluster.sim.workload import load_trace
from cluster.traces import SLO

TRACES = Path(__file__).resolve().parents[2] / "benchmarks" / "traces"
MOONCAKE = TRACES / "mooncake_conversation_trace.jsonl"
AZURE = TRACES / "AzureLLMInferenceTrace_conv.csv"
SHAREGPT = TRACES / "sharegpt_8k_filtered_stats_llama2_tokenizer.csv"
ARXIV = TRACES / "arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv"
needs_traces = pytest.mark.skipif(not MOONCAKE.exists(), reason="benchmarks/traces not present")

_FIT = FitError(0, 0.0, 0.0, 1.0, 0.0, 0.0)


def _model(c0_ms: float = 10.0, per_token_ms: float = 0.0) -> StepModel:
    """A step model simple enough to check by hand: c0 per step (+ per prefill token)."""
    return StepModel(c0_decode=c0_ms, c0_prefill=c0_ms, c_prefill=per_token_ms, c_attn=0.0, c_decode=0.0, c_kv=0.0,
                     hardware="test", tp=1, quantization="none", fit=_FIT)


def _req(i: int, prompt: int, out: int, arrival: float = 0.0, shared: int = 0, tag: int = 0) -> SimRequest:
    """``shared`` leading full blocks common to every request; the rest unique to (tag, i)."""
    n = prompt // 16
    hashes = tuple(range(1, min(shared, n) + 1)) + tuple((tag + 1) * 10**9 + i * 10**6 + j for j in range(n - shared))
    return SimRequest(i, arrival, prompt, out, hashes[:n])


def _check_kv(rep: Replica, _now: float) -> None:
    held = sum(len(r.keys) for r in rep.running)
    assert rep.used_blocks() <= rep.num_blocks
    assert rep.used_blocks() == len(rep.ref)  # every used block is held; every held block is counted once
    assert sum(rep.ref.values()) == held
    assert not set(rep.ref) & set(rep.lru)


def test_hand_checked_ttft_and_tpot():
    rep = Replica(0, num_blocks=64, model=_model(10.0))
    a = _req(0, prompt=100, out=5)
    b = _req(1, prompt=40, out=1, arrival=0.015)  # arrives during a's first decode step
    end = run_alone(rep, [a, b])
    # a: prefill step 0..10 ms -> first token; decodes end at 20, 30 (b's prefill shares it), 40, 50 ms.
    assert a.first_t == pytest.approx(0.010)
    assert a.finish_t == pytest.approx(0.050)
    assert b.first_t == pytest.approx(0.030) and b.finish_t == pytest.approx(0.030)
    assert end == pytest.approx(0.050)
    res = summarize("x", [a, b], [rep], SLO(ttft_s=0.012, tpot_s=0.01), decision_us=[1.0], wall_s=0.0,
                    kv_peak_frac=0.0)
    assert res.ttft_p50_s == pytest.approx(0.010)  # lower median of (0.010, 0.015)
    assert res.tpot_p50_s == pytest.approx(0.010)  # (0.050 - 0.010) / 4; b has one token: no TPOT
    assert res.goodput_rps == pytest.approx(1 / 0.050)  # b's TTFT 15 ms misses the 12 ms SLO
    assert res.itl_p99_s == pytest.approx(0.010)
    assert res.completed == 2


def test_repeated_decode_steps_match_single_steps():
    """The fast path (k decode steps at once) gives the same times as stepping one by one."""
    model = StepModel(c0_decode=20.0, c0_prefill=5.0, c_prefill=0.1, c_attn=1e-5, c_decode=0.2, c_kv=1e-3,
                      hardware="t", tp=1, quantization="none", fit=_FIT)
    mk = lambda: [_req(i, 300 + 37 * i, 40 + 13 * i, arrival=0.05 * i) for i in range(6)]  # noqa: E731
    fast, slow = mk(), mk()
    run_alone(Replica(0, num_blocks=500, model=model), fast)
    rep = Replica(0, num_blocks=500, model=model)
    rep._fit_blocks = lambda sched, k: 1  # never repeat: one step per event
    run_alone(rep, slow)
    for f, s in zip(fast, slow):
        assert f.first_t == pytest.approx(s.first_t) and f.finish_t == pytest.approx(s.finish_t)


def test_kv_never_over_capacity_and_preemption_still_completes():
    rep = Replica(0, num_blocks=40, model=_model(5.0), max_num_batched_tokens=256)
    reqs = [_req(i, prompt=160, out=200, arrival=0.001 * i) for i in range(6)]  # 6 × 23 blocks > 40
    run_alone(rep, reqs, observe=_check_kv)
    assert rep.preemptions > 0
    assert all(r.finish_t > 0 and r.num_out == 200 for r in reqs)
    assert rep.used_blocks() == 0 and not rep.ref  # everything freed at the end


def test_chunked_prefill_respects_the_token_budget():
    rep = Replica(0, num_blocks=2000, model=_model(5.0), max_num_batched_tokens=512)
    seen = []

    def observe(r: Replica, _now: float) -> None:
        if r.busy:
            seen.append(sum(n for _, n in r._sched))
            assert seen[-1] <= 512

    reqs = [_req(i, prompt=1500, out=3, arrival=0.002 * i) for i in range(4)]
    run_alone(rep, reqs, observe=observe)
    assert max(seen) == 512  # prompts longer than the budget were cut into chunks
    assert all(r.num_out == 3 for r in reqs)


def test_prefix_cache_hits_on_the_same_replica_only():
    one = Replica(0, num_blocks=500, model=_model(5.0))
    a, b = _req(0, 800, 4, shared=40), _req(1, 800, 4, arrival=1.0, shared=40)
    run_alone(one, [a, b])
    assert a.cached_tokens == 0 and b.cached_tokens == 40 * 16  # b reuses a's 40 shared blocks

    x, y = Replica(0, num_blocks=500, model=_model(5.0)), Replica(1, num_blocks=500, model=_model(5.0))
    c, d = _req(0, 800, 4, shared=40, tag=1), _req(1, 800, 4, arrival=1.0, shared=40, tag=1)
    run_alone(x, [c])
    run_alone(y, [d])
    assert d.cached_tokens == 0  # another replica's cache does not help


def test_a_fully_cached_prompt_still_computes_its_last_token():
    rep = Replica(0, num_blocks=100, model=_model(5.0))
    a, b = _req(0, 320, 2, shared=20), _req(1, 320, 2, arrival=1.0, shared=20)
    run_alone(rep, [a, b])
    assert b.cached_tokens == 304  # 19 of 20 blocks: vLLM caps the hit at num_tokens - 1


@needs_traces
def test_trace_loaders_read_the_real_traces():
    m = load_trace(MOONCAKE, max_requests=5)
    assert [r.prompt_tokens for r in m.requests[:2]] == [6758, 7322]
    h0, h1 = m.requests[0].block_hashes(), m.requests[1].block_hashes()
    assert len(h0) == 6758 // 16 and h0[:32] == h1[:32] and h0[32] != h1[32]  # hash_ids [0, 1, ...] vs [0, 14, ...]
    a = load_trace(AZURE, max_requests=3, time_scale=2.0)
    assert [(r.prompt_tokens, r.output_tokens) for r in a.requests[:2]] == [(374, 44), (396, 109)]
    assert a.requests[1].arrival_s == pytest.approx((50.9951690 - 46.6805900) / 2, abs=1e-5)
    assert not set(a.requests[0].block_hashes()) & set(a.requests[1].block_hashes())
    for table in (SHAREGPT, ARXIV):
        w = load_trace(table, max_requests=50, rate=4.0, seed=1)
        assert len(w.requests) == 50 and w.requests[0].arrival_s == 0 and w.requests[-1].arrival_s > 0
    clipped = load_trace(MOONCAKE, max_requests=50, max_model_len=4096)
    assert clipped.clipped > 0 and all(r.prompt_tokens + r.output_tokens <= 4096 for r in clipped.requests)
    with pytest.raises(ValueError, match="--rate"):
        load_trace(SHAREGPT, max_requests=5)


@needs_traces
def test_perf_model_fits_the_table():
    fit = fit_table("H100-80GB", 2).fit
    assert fit.mape < 0.04 and fit.r2 > 0.999  # measured: MAPE 3.5%, R² 0.9999 on 205 rows
    awq = make_setup(1).step
    assert awq.c0_decode < fit_table("H100-80GB", 2).c0_decode  # 4-bit weights stream faster
    assert "awq" in " ".join(awq.assumptions)


@needs_traces
def test_simulate_json_reports_every_policy(capsys):
    parser = argparse.ArgumentParser()
    add_simulate_parser(parser.add_subparsers(dest="command"))
    ns = parser.parse_args(["simulate", "--trace", str(MOONCAKE), "--replicas", "4", "--max-requests", "60",
                            "--time-scale", "4", "--json"])
    assert run_simulate(ns, Console()) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["policies"]) == set(POLICIES)
    for res in out["policies"].values():
        for key in ("goodput_rps", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "tpot_p50_s", "prefix_hit_rate",
                    "completed", "itl_p99_s", "e2e_p90_s", "preemptions", "load_cv"):
            assert key in res
        assert res["completed"] == 60
    assert out["perf_model"]["fit"]["mape"] < 0.04 and out["trace"]["requests"] == 60


@needs_traces
def test_prefix_aware_routing_finds_more_cache_than_random():
    w = load_trace(MOONCAKE, max_requests=800)
    setup = make_setup(16)
    hits = {p: simulate(w, p, setup)[0].prefix_hit_rate for p in ("pow2", "prefix_affinity")}
    assert hits["prefix_affinity"] > 2 * hits["pow2"]  # measured: 17.1% against 6.3%
