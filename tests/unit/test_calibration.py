"""The replica's own measurements (cluster/serving/calibration.py): ITL floor, prefill speed, sources."""

import random

import pytest

from cluster.serving.calibration import Calibration, EngineCalibrator, SourceLog, choose, quantile


def test_quantile_interpolates():
    assert quantile([3.0, 1.0, 2.0], 0.0) == 1.0
    assert quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert quantile([1.0, 2.0], 0.25) == 1.25


def test_nothing_measured_is_none():
    cal = EngineCalibrator()
    assert cal.snapshot() == Calibration()
    assert Calibration().as_stats() == {}


def test_floor_is_a_low_quantile_of_batch_one_decode_steps():
    rng, cal = random.Random(1), EngineCalibrator()
    for _ in range(200):  # 20 ms steps with upward noise (scheduling, GC), now and then a slow one
        cal.observe_step([0.020 + rng.expovariate(1 / 0.002)], first_tokens=0, prompt_tokens=0)
    assert 0.020 <= cal.itl_floor_s() < 0.021


def test_steps_with_a_prefill_are_not_decode_samples():
    cal = EngineCalibrator(min_samples=1)
    cal.observe_step([0.5], first_tokens=1, prompt_tokens=4000)
    assert cal.itl_floor_s() is None


def test_floor_is_extrapolated_to_batch_one_from_busier_steps():
    # Never idle: steps of 8 and 16 sequences, 20 ms + 1 ms per sequence.
    cal = EngineCalibrator()
    for _ in range(20):
        for b in (7, 8, 15, 16):
            cal.observe_decode(b, 0.020 + 0.001 * b)
    assert cal.itl_floor_s() == pytest.approx(0.021, abs=1e-4)


def test_a_single_busy_bucket_is_no_floor_but_a_small_batch_is_an_upper_bound():
    cal = EngineCalibrator()
    for _ in range(20):
        cal.observe_decode(32, 0.06)
    assert cal.itl_floor_s() is None
    for _ in range(20):
        cal.observe_decode(3, 0.023)
    assert cal.itl_floor_s() == pytest.approx(0.023 - (0.06 - 0.023) / 29 * 2, rel=1e-6)


def test_prefill_speed_is_a_high_quantile_of_long_prefills():
    cal = EngineCalibrator()
    for i in range(40):  # 10k tok/s alone; half of them shared their steps with decodes (2/3 the speed)
        n = 1000 + 50 * i
        cal.observe_prefill(n, n / 10_000 * (1.5 if i % 2 else 1.0))
        cal.observe_prefill(16, 0.01)  # too short to say anything: ignored
    assert cal.prefill_tokens_per_s() == pytest.approx(10_000, rel=1e-9)
    cal.kv_capacity_tokens = 353_424
    assert cal.snapshot().as_stats() == {"prefill_tokens_per_s": 10_000.0, "kv_capacity_tokens": 353_424.0}


def test_windows_follow_the_engine():
    cal = EngineCalibrator(window=16)
    for _ in range(16):
        cal.observe_decode(1, 0.05)
    for _ in range(16):
        cal.observe_decode(1, 0.02)
    assert cal.itl_floor_s() == pytest.approx(0.02)


def test_choose_and_sources():
    assert choose(5.0, 7.0, 9.0) == (5.0, "override")
    assert choose(None, 7.0, 9.0) == (7.0, "measured")
    assert choose(None, None, 9.0) == (9.0, "plan")
    assert choose(None, 0.0, 9.0) == (9.0, "plan")
    log = SourceLog()
    assert log.changed("a", "plan") and not log.changed("a", "plan") and log.changed("a", "measured")
    log.forget("a")
    assert log.changed("a", "measured")


def test_the_start_up_measurement_gives_both_estimates_without_shared_prefixes():
    from cluster.serving.calibration import warmup_requests

    cal = EngineCalibrator()
    plan = warmup_requests(4096, 32000, cal)
    prefills, decode = plan[:-1], plan[-1]
    assert len(prefills) == cal.min_samples and all(n == 1 and len(ids) == 512 for ids, n in prefills)
    assert len({tuple(ids[:16]) for ids, _ in prefills}) == cal.min_samples  # no prompt block in common
    assert len(decode[0]) == 1 and decode[1] >= cal.min_samples + 1  # enough all-decode steps at batch 1
    assert all(100 <= t < 32000 for ids, _ in plan for t in ids)
    # fed as the engine's steps would be (a lone prefill, then lone decode steps), both facts are known
    for ids, _ in prefills:
        cal.observe_step([], 1, len(ids))
        cal.observe_prefill(len(ids), len(ids) / 50_000)
    for _ in range(decode[1] - 1):
        cal.observe_step([0.02], 0, 0)
    facts = cal.snapshot()
    assert facts.itl_floor_s == pytest.approx(0.02) and facts.prefill_tokens_per_s == pytest.approx(50_000)


def test_a_short_context_or_tiny_vocabulary_still_gets_a_plan_that_fits():
    from cluster.serving.calibration import warmup_requests

    cal = EngineCalibrator()
    assert warmup_requests(100, 32000, cal) == [([108], 16)]  # no room for a 128-token prefill: decode only
    short = warmup_requests(200, 50, cal)
    assert all(len(ids) + n <= 200 and max(ids) < 50 for ids, n in short) and len(short) == cal.min_samples + 1
    assert warmup_requests(1, 32000, cal) == []
