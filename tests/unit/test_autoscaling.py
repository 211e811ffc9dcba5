"""The autoscaling policy (pure): when it scales, and why."""

import pytest

from cluster.autoscaling import ReplicaSignals, ScalerState, ScalingInput, decide
from cluster.config import AutoscalingConfig, ClusterConfig, ConfigError

CAP = 100_000  # KV tokens per replica
CFG = AutoscalingConfig(target_kv_usage=0.7, high_kv_usage=0.9, upscale_sustained_s=10, downscale_delay_s=300,
                        startup_s=120, idle_to_zero_s=600)


def _inp(now, cur, usages, waiting=0.0, queued=0.0, running=4.0, lo=1, hi=4, rate=100.0):
    reps = tuple(ReplicaSignals(u, running if u else 0.0, waiting, rate if u else 0.0) for u in usages)
    return ScalingInput(now, cur, reps, queued, CAP, lo, hi)


def _run(samples, state=ScalerState(), cfg=CFG):
    decision = None
    for inp in samples:
        decision, state = decide(inp, cfg, state)
    return decision, state


def test_scales_up_before_saturation_when_demand_grows():
    # KV usage climbs 0.30 → 0.60 in 60 s: still under target, but 120 s of start-up ahead it will not be.
    samples = [_inp(t, 1, [0.3 + 0.005 * t]) for t in range(0, 61, 10)]
    d, _ = _run(samples)
    assert d.desired >= 2 and d.kind == "kv_demand"
    assert "growing" in d.reason


def test_steady_load_under_target_keeps_replicas():
    d, _ = _run([_inp(t, 2, [0.5, 0.5]) for t in range(0, 61, 10)])
    assert d.desired == 2 and d.kind == "steady"


def test_sustained_pressure_adds_a_replica_only_after_the_sustain_window():
    # Flat, high usage with requests waiting in the engine.
    d, st = _run([_inp(0, 3, [0.95, 0.5, 0.5], waiting=0.0)], cfg=CFG.model_copy(update={"target_kv_usage": 0.8,
                                                                                             "high_kv_usage": 0.9}))
    assert d.desired == 3
    cfg = CFG.model_copy(update={"target_kv_usage": 0.8})
    d, _ = _run([_inp(t, 3, [0.95, 0.5, 0.5]) for t in range(0, 12, 2)], cfg=cfg)
    assert d.desired == 4 and d.kind == "sustained_pressure"


def test_scale_down_waits_for_the_delay_then_removes_one():
    low = [_inp(t, 3, [0.1, 0.1, 0.1]) for t in range(0, 290, 10)]
    d, st = _run(low)
    assert d.desired == 3 and d.kind == "downscale_pending"
    d, _ = _run([_inp(300, 3, [0.1, 0.1, 0.1])], state=st)
    assert d.desired == 2 and d.kind == "downscale"


def test_respects_max_replicas_and_says_so():
    d, _ = _run([_inp(0, 4, [1.0, 1.0, 1.0, 1.0], waiting=50)])
    assert d.desired == 4 and "held to [1, 4]" in d.reason


def test_scale_from_zero_when_a_request_waits():
    d, _ = _run([_inp(0, 0, [], queued=1, lo=0)])
    assert d.desired == 1 and d.kind == "scale_from_zero"
    d, _ = _run([_inp(0, 0, [], queued=0, lo=0)])
    assert d.desired == 0


def test_scale_to_zero_only_after_idle_and_only_when_allowed():
    idle = [_inp(t, 1, [0.0], running=0.0, lo=0) for t in range(0, 601, 60)]
    d, _ = _run(idle)
    assert d.desired == 0 and d.kind == "scale_to_zero"
    d, _ = _run([_inp(t, 1, [0.0], running=0.0, lo=1) for t in range(0, 601, 60)])
    assert d.desired == 1


def test_every_decision_has_a_reason():
    for inp in (_inp(0, 1, [0.2]), _inp(0, 1, [0.99], waiting=3), _inp(0, 0, [], queued=2, lo=0)):
        d, _ = decide(inp, CFG, ScalerState())
        assert d.reason and d.kind


def _models(**kw) -> dict:
    return {"models": [{"name": "m", "source": "meta-llama/Llama-2-7b-hf", "accelerator": "A10G", **kw}]}


def test_bad_autoscaling_values_are_refused_with_path():
    with pytest.raises(ConfigError, match=r"models\[0\]\.autoscaling\.high_kv_usage: 0.5 must exceed target_kv_usage"):
        ClusterConfig.from_args(_models(max_replicas=3, autoscaling={"target_kv_usage": 0.7, "high_kv_usage": 0.5}))
    with pytest.raises(ConfigError, match=r"models\[0\]\.autoscaling\.downscale_delay_s: -1"):
        ClusterConfig.from_args(_models(max_replicas=3, autoscaling={"downscale_delay_s": -1}))
    with pytest.raises(ConfigError, match=r"models\[0\]\.autoscaling: 'set' has no effect"):
        ClusterConfig.from_args(_models(autoscaling={"startup_s": 10}))
