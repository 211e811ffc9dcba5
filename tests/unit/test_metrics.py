"""Metric definitions: every one is accepted by the Ray metric type that records it."""

from __future__ import annotations

import re
from pathlib import Path

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


def test_the_docs_metrics_table_lists_every_metric_with_its_type_and_labels():
    """docs/autoscaling.md's table is what a user reads to write a query: it must match the definitions."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "autoscaling.md").read_text()
    rows = {m[0]: (m[1], m[2]) for m in re.findall(r"^\| `ray_(\w+)` \| (\w+) \| ([\w, ]+) \|", doc, re.M)}
    wrong = [f"{m.name}: {rows.get(m.name)} in the doc, ({m.kind!r}, {', '.join(m.labels)!r}) defined"
             for m in metrics.ALL if rows.get(m.name) != (m.kind, ", ".join(m.labels))]
    unknown = sorted(set(rows) - {m.name for m in metrics.ALL})
    assert not wrong and not unknown, "\n".join(wrong + [f"{n}: in the doc, not defined" for n in unknown])
