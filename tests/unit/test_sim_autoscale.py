"""Autoscaling in the simulator: start-up, draining, GPU-hours, bounds, the peers, the CLI's JSON."""

import argparse
import json
from pathlib import Path

import pytest
from rich.console import Console

from cluster.autoscaling.policy import ReplicaSignals, ScalerState, ScalingInput, decide
from cluster.cli.simulate import add_simulate_parser, run_simulate
from cluster.config import AutoscalingConfig
from cluster.sim.autoscale import AUTOSCALERS, Autoscaler, Observation, default_startup_s, simulate_autoscale
from cluster.sim.simulator import make_setup
from cluster.sim.workload import TraceRequest, Workload

AZURE = Path(__file__).resolve().parents[2] / "benchmarks" / "traces" / "AzureLLMInferenceTrace_conv.csv"
SETUP = make_setup(8)


def _steady(rate: float, start: float, end: float, prompt: int = 1000, out: int = 200, first: int = 0):
    n = int((end - start) * rate)
    return [TraceRequest(start + k / rate, prompt, out, first + k) for k in range(n)]


def _workload(*phases) -> Workload:
    reqs = []
    for rate, start, end in phases:
        reqs += _steady(rate, start, end, first=len(reqs))
    return Workload("synthetic", reqs, "test")


class Scripted(Autoscaler):
    """Desired count by time: [(from_s, desired), ...]."""

    name = "scripted"

    def __init__(self, plan):
        super().__init__()
        self.plan = plan

    def __call__(self, obs: Observation):
        want = obs.target
        for t, d in self.plan:
            if obs.now >= t:
                want = d
        return want, "script"


def test_gpu_hours_count_startup_and_draining():
    # One replica serves; a second is asked for at 10 s, serves from 60 s (50 s start-up), is removed at 100 s
    # while it still holds requests (long outputs), and is billed until they finish.
    w = Workload("synthetic", [TraceRequest(k * 0.5, 500, 600, k) for k in range(200)], "test")
    r = simulate_autoscale(w, Scripted([(10, 2), (100, 1)]), SETUP, min_replicas=1, max_replicas=2, startup_s=50.0)
    tl = r.timeline
    asked = next(row for row in tl if row[1] == 2)
    routable = next(row for row in tl if row[2] == 2)
    assert asked[0] == 10 and routable[0] == 60  # billed from the ask, routable only after start-up
    stopped = next(row for row in tl if row[0] > 60 and row[1] == 1)
    assert stopped[0] > 100  # drained: finished its requests after it stopped taking new ones
    assert r.gpu_hours == pytest.approx((r.end_s + stopped[0] - 10) * 2 / 3600)
    assert r.serving.completed == 200 and r.scale_ups == 1 and r.scale_downs == 1


def test_replicas_stay_within_min_and_max():
    w = _workload((3, 0, 60))
    r = simulate_autoscale(w, Scripted([(0, 100), (20, 0), (40, 7)]), SETUP, min_replicas=2, max_replicas=5,
                           initial_replicas=3, startup_s=5.0)
    assert all(2 <= row[3] <= 5 for row in r.timeline)
    assert r.replicas_max == 5 and r.replicas_min >= 2
    assert r.serving.completed == len(w.requests)


def test_a_removed_starting_replica_is_cancelled_before_a_serving_one():
    w = _workload((2, 0, 30))
    r = simulate_autoscale(w, Scripted([(0, 3), (5, 2)]), SETUP, min_replicas=2, max_replicas=3, startup_s=60.0)
    assert max(row[2] for row in r.timeline) == 2  # the starting one never became routable
    assert r.gpu_hours == pytest.approx((2 * r.end_s + 5) * 2 / 3600)


def test_load_step_kvpilot_adds_replicas_and_ray_default_waits_its_delay():
    # 1 req/s, then a step to 16 req/s at 60 s: two replicas cannot carry it.
    w = _workload((1, 0, 60), (16, 60, 240))

    def first_up(name, **params):
        r = simulate_autoscale(w, name, SETUP, min_replicas=2, max_replicas=8, startup_s=30.0, params=params)
        return next(row[0] for row in r.timeline if row[3] > 2), r

    t_kv, kv = first_up("kvpilot")
    t_ray, ray = first_up("ray_default", target_ongoing_requests=32)
    assert 60 <= t_kv < t_ray  # kvpilot reacts to pressure within seconds; Ray averages 30 s, then waits 30 s
    assert t_ray >= 60 + 30
    assert kv.replicas_max > 2


def test_every_peer_runs_and_scales_up_under_a_step():
    w = _workload((1, 0, 40), (16, 40, 160))
    for name in AUTOSCALERS:
        r = simulate_autoscale(w, name, SETUP, min_replicas=2, max_replicas=8, startup_s=20.0)
        assert r.serving.completed == len(w.requests)
        assert r.replicas_max > 2, name


def test_default_startup_is_weights_over_bandwidth_plus_warmup():
    assert default_startup_s(SETUP) == 133  # 36.6 GB / 0.5 GB/s + 60 s


def test_kvpilot_keeps_starting_replicas():
    # 2 serve, 3 asked for: a steady answer keeps the third; pressure adds none while it starts.
    cfg = AutoscalingConfig(upscale_sustained_s=0)
    reps = (ReplicaSignals(0.3, 4, 0), ReplicaSignals(0.3, 4, 0))
    d, _ = decide(ScalingInput(0.0, 2, reps, 0.0, 100_000, 1, 8, target_replicas=3), cfg, ScalerState())
    assert d.desired == 3 and d.kind == "downscale_pending"  # not 2: the starting replica is kept
    hot = (ReplicaSignals(0.6, 4, 2), ReplicaSignals(0.6, 4, 2))  # requests waiting: pressure; KV fits 3
    d, _ = decide(ScalingInput(0.0, 2, hot, 0.0, 100_000, 1, 8, target_replicas=3), cfg, ScalerState())
    assert d.desired == 3 and d.kind == "pressure_starting"


def _parse(*args):
    parser = argparse.ArgumentParser()
    add_simulate_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["simulate", *args])


@pytest.mark.skipif(not AZURE.exists(), reason="benchmarks/traces not present")
def test_autoscale_json_schema(capsys):
    ns = _parse("--autoscale", "--trace", str(AZURE), "--max-requests", "200", "--time-scale", "2",
                "--startup-s", "30", "--json")
    assert run_simulate(ns, Console()) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["autoscalers"]) == set(AUTOSCALERS)
    for res in out["autoscalers"].values():
        for key in ("gpu_hours", "slo_attainment", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s",
                    "replicas_min", "replicas_mean", "replicas_max", "scale_events"):
            assert key in res
        assert res["completed"] == 200 and res["gpu_hours"] > 0
    assert out["autoscale"]["startup_s"] == 30 and out["plot"] is None


@pytest.mark.parametrize("args, flag", [
    (["--autoscalers", "nope"], "--autoscalers"),
    (["--min-replicas", "0"], "--min-replicas"),
    (["--max-replicas", "1", "--min-replicas", "2", "--initial-replicas", "2"], "--max-replicas"),
    (["--startup-s", "-1"], "--startup-s"),
    (["--set", "queue.nope=1", "--autoscalers", "queue"], "nope"),
])
def test_bad_autoscale_input_names_the_flag(args, flag, tmp_path):
    trace = tmp_path / "t.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,100,10\n")
    with pytest.raises(ValueError, match=flag):
        run_simulate(_parse("--autoscale", "--trace", str(trace), *args), Console())


class Recorder(Autoscaler):
    """Keeps the count; records what each tick's replicas reported."""

    name = "recorder"

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[float, tuple[ReplicaSignals, ...]]] = []

    def __call__(self, obs: Observation):
        self.seen.append((obs.now, obs.replicas))
        return obs.target, "keep"


def test_sim_replicas_measure_their_itl_floor_as_live_ones_do():
    # Never one sequence alone after the first seconds: ~40 decode together, yet the floor the replica reports
    # (its calibrator's, fed by the engine's decode steps) is one sequence's step time, not the loaded ITL.
    from cluster.sim.autoscale import make_autoscaler, single_stream_itl_s

    rec = Recorder()
    simulate_autoscale(_workload((4.0, 0, 120)), rec, SETUP, min_replicas=1, max_replicas=1, startup_s=0.0)
    floors = [r.itl_floor_s for _, reps in rec.seen for r in reps if r.itl_floor_s is not None]
    assert floors, "no replica reported a measured ITL floor"
    one = single_stream_itl_s(SETUP)
    assert floors[-1] == pytest.approx(one, rel=0.1)
    assert all(r.kv_capacity_tokens == SETUP.plan.num_blocks * SETUP.plan.block_size
               for _, reps in rec.seen for r in reps)
    # the kvpilot autoscaler is given no floor: it uses the replicas' measurement (defaults only)
    assert make_autoscaler("kvpilot", SETUP, 133.0).cfg.itl_floor_s is None
