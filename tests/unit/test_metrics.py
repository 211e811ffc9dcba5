"""Metric definitions: every one is accepted by the Ray metric type that records it."""

from __future__ import annotations

import pytest

from cluster import metrics

DEFINED = [m for m in vars(metrics).values() if isinstance(m, metrics.Metric)]


@pytest.mark.parametrize("m", DEFINED, ids=lambda m: m.name)
def test_ray_accepts_every_definition(m: metrics.Metric) -> None:
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
        metrics.Metric("kvpilot_x_ratio", "histogram", "x", (), (0.0, 1.0))
    with pytest.raises(ValueError, match="strictly increasing"):
        metrics.Metric("kvpilot_x_seconds", "histogram", "x", (), (1.0, 1.0))
    with pytest.raises(ValueError, match="must be ASCII"):
        metrics.Metric("kvpilot_x_bytes", "gauge", "usage × bytes", ())
