"""Ray metric objects for kvpilot's metric definitions (``cluster.metrics``).

Each process that records metrics builds a ``Recorder`` once (in its
constructor) and passes it where it is needed; nothing here is a module global.
"""

from __future__ import annotations

import logging
import logging.handlers
from typing import Any

from cluster.metrics import Metric


def log_where_serve_logs() -> None:
    """kvpilot's loggers (``kvpilot.*``) write where this process's Serve logger does: the replica's or the
    controller's log file, at Serve's level (INFO by default). Without it their INFO lines went nowhere.
    Called by each Serve component's constructor; a no-op outside one (no Serve log file to write to)."""
    serve, ours = logging.getLogger("ray.serve"), logging.getLogger("kvpilot")
    if any(isinstance(h, (logging.handlers.MemoryHandler, logging.FileHandler)) for h in serve.handlers):
        ours.handlers = list(serve.handlers)
        ours.setLevel(serve.getEffectiveLevel())
        ours.propagate = False  # as Serve's own logger: once in the component's log, not again on stderr


class Recorder:
    """Lazily creates one ``ray.util.metrics`` object per definition, with fixed default tags."""

    def __init__(self, **default_tags: str):
        self._defaults = default_tags
        self._made: dict[str, Any] = {}

    def _get(self, m: Metric) -> Any:
        obj = self._made.get(m.name)
        if obj is None:
            from ray.util import metrics as rm

            if m.kind == "counter":
                obj = rm.Counter(m.name, description=m.description, tag_keys=m.labels)
            elif m.kind == "gauge":
                obj = rm.Gauge(m.name, description=m.description, tag_keys=m.labels)
            else:
                obj = rm.Histogram(m.name, description=m.description, boundaries=list(m.buckets or ()),
                                   tag_keys=m.labels)
            obj.set_default_tags({k: v for k, v in self._defaults.items() if k in m.labels})
            self._made[m.name] = obj
        return obj

    def inc(self, m: Metric, value: float = 1.0, **tags: str) -> None:
        if value > 0:
            self._get(m).inc(value, tags=tags or None)

    def set(self, m: Metric, value: float, **tags: str) -> None:
        self._get(m).set(value, tags=tags or None)

    def observe(self, m: Metric, value: float, **tags: str) -> None:
        self._get(m).observe(value, tags=tags or None)
