"""fit_rows: StepModel from measured engine steps (benchmarks/sim_fidelity.py's calibration)."""

import pytest

from cluster.sim.perfmodel import MeasuredStep, fit_rows


def _rows(c0d=6.0, c0p=20.0, cp=0.03, ca=1e-6, cd=0.4, ckv=2e-4):
    rows = [MeasuredStep(p, p * p / 2, 0, 0, c0p + cp * p + ca * p * p / 2) for p in (16, 64, 256, 512, 1000)]
    for ctx in (80, 560):
        rows += [MeasuredStep(0, 0.0, b, b * ctx, c0d + cd * b + ckv * b * ctx) for b in (1, 4, 16, 32)]
    return rows


def test_fit_rows_recovers_the_coefficients():
    m = fit_rows(_rows())
    assert (m.c0_decode, m.c0_prefill) == (pytest.approx(6.0), pytest.approx(20.0))
    assert (m.c_prefill, m.c_attn) == (pytest.approx(0.03), pytest.approx(1e-6, rel=1e-3))
    assert (m.c_decode, m.c_kv) == (pytest.approx(0.4), pytest.approx(2e-4))
    assert m.fit.rows == 13 and m.fit.mape < 1e-9 and m.fit.r2 == pytest.approx(1.0)
    assert m.hardware == "cpu" and m.tp == 1
    assert m.step_ms(100, 5000, 0, 0) == pytest.approx(20 + 3 + 0.005)


def test_fit_rows_keeps_costs_non_negative_and_reports_error():
    rows = _rows(ckv=0.0)
    rows.append(MeasuredStep(0, 0.0, 8, 8 * 80, 5.0))  # a fast outlier would pull c_kv below zero
    m = fit_rows(rows)
    assert min(m.c0_decode, m.c0_prefill, m.c_prefill, m.c_attn, m.c_decode, m.c_kv) >= 0
    assert m.fit.max_ape > 0.1 and m.fit.mape_decode > m.fit.mape_prefill


def test_fit_rows_needs_rows():
    with pytest.raises(ValueError):
        fit_rows([])
