"""kvpilot's Ray Serve autoscaling policy: glue from ``AutoscalingContext`` to ``cluster.autoscaling.policy.decide``.

Plugged in per model through ``autoscaling_config.policy`` (see
``cluster.serving.placement.deployment_options``); Serve builds one instance per
deployment in its controller with ``policy_kwargs`` and calls it every
``metrics_interval_s`` with the replicas' ``record_autoscaling_stats`` values.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from cluster import metrics
from cluster.autoscaling.policy import Decision, ReplicaSignals, ScalerState, ScalingInput, decide
from cluster.config import AutoscalingConfig
from cluster.serving.calibration import ITL_FLOOR_KEY, KV_CAPACITY_KEY, SourceLog
from deployments.telemetry import Recorder, log_where_serve_logs

logger = logging.getLogger("kvpilot.autoscaling")


class KVPilotAutoscaler:
    def __init__(self, model: str, config: dict[str, Any], kv_capacity_tokens: int, min_replicas: int,
                 max_replicas: int):
        log_where_serve_logs()
        self._model = model
        self._cfg = AutoscalingConfig.model_validate(config)
        self._capacity = kv_capacity_tokens
        self._bounds = (min_replicas, max_replicas)
        self._rec = Recorder(model=model)
        self.last_decision: Decision | None = None  # what the latest call decided, with its reason
        self._sources = SourceLog()

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        reported = ctx.aggregated_metrics or {}

        def value(name: str, rid: Any) -> float | None:
            v = reported.get(name, {}).get(rid)
            return None if v is None else float(v)

        replicas = tuple(
            ReplicaSignals(
                kv_cache_usage=value("kv_cache_usage", rid) or 0.0,
                num_running=value("num_running", rid) or 0.0,
                num_waiting=value("num_waiting", rid) or 0.0,
                token_rate=value("token_rate", rid) or 0.0,
                gpu_memory_used_ratio=value("gpu_memory_used_ratio", rid),
                generation_rate=value("generation_rate", rid),
                itl_floor_s=value(ITL_FLOOR_KEY, rid),
                kv_capacity_tokens=value(KV_CAPACITY_KEY, rid),
            )
            for rid in ctx.running_replicas
        )
        saved = (ctx.policy_state or {}).get("kvpilot")
        state = ScalerState() if saved is None else ScalerState.from_dict(saved)
        # Serve's bounds, adjusted for its target_capacity: the count the decision is held to is the one applied.
        lo = getattr(ctx, "capacity_adjusted_min_replicas", None)
        hi = getattr(ctx, "capacity_adjusted_max_replicas", None)
        inp = ScalingInput(
            now_s=ctx.current_time if ctx.current_time is not None else time.time(),
            current_replicas=ctx.current_num_replicas,
            replicas=replicas,
            queued_requests=float(ctx.total_queued_requests or 0.0),
            kv_capacity_tokens=self._capacity,
            min_replicas=self._bounds[0] if lo is None else lo,
            max_replicas=self._bounds[1] if hi is None else hi,
            target_replicas=getattr(ctx, "target_num_replicas", None),
        )
        decision, state = decide(inp, self._cfg, state)
        self._record(decision, ctx.current_num_replicas)
        return decision.desired, {"kvpilot": dataclasses.asdict(state)}

    def _record(self, decision: Decision, current: int) -> None:
        """Metrics every call; a log line when the decision changes kind or count (the reason's numbers move every call)."""
        self._rec.set(metrics.AUTOSCALER_CURRENT, current)
        self._rec.set(metrics.AUTOSCALER_DESIRED, decision.desired)
        self._rec.set(metrics.AUTOSCALER_KV_DEMAND, decision.kv_demand_ratio)
        self._rec.inc(metrics.AUTOSCALER_DECISIONS, 1, reason=decision.kind)
        floor, floor_source = decision.signals.get("itl_floor_s"), decision.sources.get("itl_floor_s", "learned")
        if floor is not None:
            self._rec.set(metrics.AUTOSCALER_ITL_FLOOR, floor, source=floor_source)
        for fact, source in decision.sources.items():
            if self._sources.changed(fact, source):
                shown = "" if fact != "itl_floor_s" or floor is None else f" {floor * 1e3:,.1f} ms"
                logger.info("autoscaler %s: %s%s from %s", self._model, fact, shown, source)
        last = self.last_decision
        if last is None or (last.kind, last.desired) != (decision.kind, decision.desired) or decision.desired != current:
            logger.info("autoscaler %s: %d -> %d replicas: %s", self._model, current, decision.desired, decision.reason)
        self.last_decision = decision
