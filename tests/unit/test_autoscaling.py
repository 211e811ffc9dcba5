"""The autoscaling policy (pure): when it scales, and why."""

import pytest

from cluster.autoscaling.policy import ReplicaSignals, ScalerState, ScalingInput, decide
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


def _load(now, cur, running, gen_rate, waiting=0.0, usage=0.1, target=None, lo=1, hi=8):
    reps = tuple(ReplicaSignals(usage, running, waiting, gen_rate * 2, generation_rate=gen_rate) for _ in range(cur))
    return ScalingInput(now, cur, reps, 0.0, CAP, lo, hi, target_replicas=target)


COMPUTE = CFG.model_copy(update={"itl_floor_s": 0.02, "target_compute_usage": 0.7, "trend_window_s": 60})


def test_slow_decoding_without_kv_pressure_scales_up_on_compute():
    # KV 10 %, nothing waiting, but 100 sequences per replica at 400 tokens/s: 250 ms per token, floor 20 ms.
    d, _ = _run([_load(t, 2, 100, 400) for t in range(0, 61, 2)], cfg=COMPUTE)
    assert d.kind == "compute_demand" and d.desired == 3  # usage 92 % × 2 / 70 % → 3
    assert "inter-token latency 250 ms" in d.reason


def test_compute_need_waits_for_a_half_full_window():
    d, _ = _run([_load(t, 2, 100, 400) for t in range(0, 20, 2)], cfg=COMPUTE)
    assert d.desired == 2


def test_sustained_queueing_without_kv_pressure_scales_up():
    cfg = CFG.model_copy(update={"high_waiting_per_replica": 0.5})
    d, _ = _run([_inp(t, 2, [0.2, 0.2], waiting=2.0) for t in range(0, 21, 2)], cfg=cfg)
    assert d.kind == "sustained_pressure" and d.desired == 3 and "waiting per replica" in d.reason


def test_a_transient_waiting_request_does_not_block_scale_down():
    # Low load on 3 replicas; every 30 s one request waits for an engine step on each replica.
    state, kinds = ScalerState(), []
    for t in range(0, 341, 2):
        d, state = decide(_inp(t, 3, [0.1, 0.1, 0.1], waiting=1.0 if t % 30 == 0 else 0.0), CFG, state)
        kinds.append((d.kind, d.desired))
    assert ("downscale", 2) in kinds


def test_light_decoding_allows_removing_a_replica_only_when_n_minus_1_fits():
    # 30 ms per token over a 20 ms floor: usage 33 % on 3 replicas → fits 2 at 70 % (50 %), not 1 (100 %).
    d, st = _run([_load(t, 3, 30, 1000) for t in range(0, 332, 2)], cfg=COMPUTE)
    assert d.kind == "downscale" and d.desired == 2
    # On 2 replicas each holds 1.5× the sequences: 45 ms per token, usage 56 % × 2 / 70 % → 2: stays.
    d, _ = _run([_load(t, 2, 45, 1000) for t in range(332, 1000, 2)], state=st, cfg=COMPUTE)
    assert d.desired == 2 and d.kind == "steady"


def test_a_downscale_is_not_undone_by_a_window_that_spans_it():
    # The same traffic (2,580 generated tokens/s in all) on 3 replicas at 35 ms per token, then on 2 at 60 ms:
    # 1.28 replicas' worth of compute in use on 3, 1.33 on 2; both fit 2 at 70 %. A window half on each count
    # averages 2.5 replicas with the mixed ITL (47 ms, usage 58 %) and read 3 replicas needed.
    three = [_load(t, 3, 30, 860) for t in range(0, 332, 2)]
    d, st = _run(three, cfg=COMPUTE)
    assert d.kind == "downscale" and d.desired == 2
    state, decisions = st, []
    for t in range(332, 420, 2):
        d, state = decide(_load(t, 2, 77.4, 1290, target=2), COMPUTE, state)
        decisions.append((t, d.kind, d.desired))
    assert all(desired == 2 for _, _, desired in decisions), decisions


def test_a_queue_growing_at_full_kv_is_counted_as_it_stands_not_projected():
    # 3 replicas with their KV 95 % full; the queue grows by 2 requests/s for 60 s (2,500 tokens each). What is
    # queued needs KV when new replicas come up; its growth stops once they serve, so it is not projected.
    samples = [_inp(t, 3, [0.95] * 3, waiting=2.0 * t / 3, running=38.0, hi=24) for t in range(0, 61, 2)]
    d, _ = _run(samples)
    used, queued = 3 * 0.95 * CAP, 120 * 0.95 * CAP / 38
    assert d.kind == "kv_demand" and d.desired == -(-(used + queued) // (0.7 * CAP))  # 9; projected: 17
    assert "in use growing 0/s" in d.reason


def test_itl_floor_is_learned_when_not_configured():
    light = [_load(t, 2, 1, 50) for t in range(0, 61, 2)]  # 20 ms per token with one sequence
    heavy = [_load(t, 2, 100, 400) for t in range(62, 200, 2)]  # 250 ms
    d, st = _run(light + heavy)
    assert abs(st.itl_floor_s - 0.02) < 1e-9
    assert d.kind == "compute_demand" and d.desired == 3


def test_compute_usage_does_not_cancel_a_starting_replica():
    d, _ = _run([_load(t, 2, 100, 400, target=3) for t in range(0, 61, 2)], cfg=COMPUTE)
    assert d.desired >= 3


def test_bad_compute_settings_are_refused_with_path():
    with pytest.raises(ConfigError, match=r"models\[0\]\.autoscaling\.target_compute_usage: 1\.5"):
        ClusterConfig.from_args(_models(max_replicas=3, autoscaling={"target_compute_usage": 1.5}))
    with pytest.raises(ConfigError, match=r"models\[0\]\.autoscaling\.itl_floor_s: 0"):
        ClusterConfig.from_args(_models(max_replicas=3, autoscaling={"itl_floor_s": 0}))
    with pytest.raises(ConfigError, match=r"models\[0\]\.autoscaling\.high_waiting_per_replica: -1"):
        ClusterConfig.from_args(_models(max_replicas=3, autoscaling={"high_waiting_per_replica": -1}))


def test_measured_floor_is_used_over_the_learned_one():
    # Constant load: the learned floor would be the load's own ITL (usage 0); the replicas measured 20 ms.
    heavy = [ScalingInput(t, 2, tuple(ReplicaSignals(0.1, 100, 0.0, 800, generation_rate=400, itl_floor_s=f)
                                      for f in (0.02, 0.03)), 0.0, CAP, 1, 8) for t in range(0, 61, 2)]
    d, st = _run(heavy)
    assert d.sources["itl_floor_s"] == "measured" and d.signals["itl_floor_s"] == 0.03  # the median of two: upper
    assert d.kind == "compute_demand" and d.desired == 3 and "ms measured" in d.reason
    assert abs(st.itl_floor_s - 0.25) < 1e-9  # the learned one is still kept, for a replica set that stops reporting
    d, _ = _run([_load(t, 2, 100, 400) for t in range(62, 80, 2)], state=st)
    assert d.sources["itl_floor_s"] == "learned"
