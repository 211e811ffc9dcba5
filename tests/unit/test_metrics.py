"""Metric definitions: every one is accepted by the Ray metric type that records it."""

from __future__ import annotations

import pytest

import cluster.metrics as M

DEFINED = [m for m in vars(M).values() if isinstance(m, M.Metric)]


@pytest.mark.parametrize("m", DEFINED, ids=lambda m: m.name)
def test_ray_accepts_every_definition(m: M.Metric) -> None:
    # A definition Ray refuses fails the first time a value is recorded: in the router, that
    # failed the request being routed (a 503 to the user). Build each one here instead.
    from ray.util import metrics as rm

    if m.kind == "histogram":
        rm.Histogram(m.name, description=m.description, boundaries=list(m.buckets), tag_keys=m.labels)
    elif m.kind == "counter":
        assert m.name.endswith("_total"), m.name
        rm.Counter(m.name, description=m.description, tag_keys=m.labels)
    else:
        rm.Gauge(m.name, description=m.description, tag_keys=m.labels)


def test_a_histogram_ray_would_refuse_is_refused_at_definition() -> None:
    with pytest.raises(ValueError, match="kvpilot_x_ratio: buckets \\(0.0, 1.0\\) must be positive"):
        M.Metric("kvpilot_x_ratio", "histogram", "x", (), (0.0, 1.0))
    with pytest.raises(ValueError, match="strictly increasing"):
        M.Metric("kvpilot_x_seconds", "histogram", "x", (), (1.0, 1.0))
    with pytest.raises(ValueError, match="must be ASCII"):
        M.Metric("kvpilot_x_bytes", "gauge", "usage × bytes", ())
