"""Grafana dashboards, generated from the metric definitions in ``cluster.metrics``.

``kvpilot dashboards OUT_DIR`` writes them (the chart ships ``helm/kvpilot/dashboards/``);
a test checks the committed files equal what this module generates and that every
panel's query returns series from a real Prometheus scraping a loaded test stack.
Panels whose data exist only on GPUs say so in ``GPU_ONLY``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cluster import metrics
from cluster.metrics import exported_name as n

RATE = "$__rate_interval"
SEL = '{model=~"$model"}'


@dataclass(frozen=True)
class Panel:
    title: str
    exprs: tuple[tuple[str, str], ...]  # (PromQL, legend)
    unit: str = "short"
    gpu_only: bool = False


def _q(p: float, hist: metrics.Metric, by: str = "") -> str:
    group = f"le{', ' + by if by else ''}"
    return f"histogram_quantile({p}, sum by ({group}) (rate({n(hist, '_bucket')}{SEL}[{RATE}])))"


def _rate(m: metrics.Metric, by: str) -> str:
    return f"sum by ({by}) (rate({n(m)}{SEL}[{RATE}]))"


OVERVIEW = (
    Panel("Requests per second by status", (
        (f"sum by (code) (rate({n(metrics.INGRESS_REQUESTS)}{SEL}[{RATE}]))", "{{code}}"),), "reqps"),
    Panel("Errors per second by kind", ((_rate(metrics.INGRESS_ERRORS, "kind"), "{{kind}}"),), "reqps"),
    Panel("Tokens per second", (
        (_rate(metrics.ENGINE_PROMPT_TOKENS, "model"), "prompt {{model}}"),
        (_rate(metrics.ENGINE_GENERATION_TOKENS, "model"), "generated {{model}}"),
    ), "short"),
    Panel("Time to first token", (
        (_q(0.5, metrics.ENGINE_TTFT), "p50"), (_q(0.9, metrics.ENGINE_TTFT), "p90"), (_q(0.99, metrics.ENGINE_TTFT), "p99"),
    ), "s"),
    Panel("Inter-token latency", ((_q(0.5, metrics.ENGINE_ITL), "p50"), (_q(0.99, metrics.ENGINE_ITL), "p99")), "s"),
    Panel("End-to-end latency", ((_q(0.5, metrics.ENGINE_E2E), "p50"), (_q(0.99, metrics.ENGINE_E2E), "p99")), "s"),
    Panel("Finished requests by reason", ((_rate(metrics.ENGINE_REQUESTS_FINISHED, "reason"), "{{reason}}"),), "reqps"),
)

MODEL = (
    Panel("KV-cache usage per replica", ((f"{n(metrics.ENGINE_KV_CACHE_USAGE)}{SEL}", "{{replica}}"),), "percentunit"),
    Panel("Running and waiting requests per replica", (
        (f"{n(metrics.ENGINE_RUNNING)}{SEL}", "running {{replica}}"),
        (f"{n(metrics.ENGINE_WAITING)}{SEL}", "waiting {{replica}}"),
    )),
    Panel("Desired versus current replicas", (
        (f"{n(metrics.AUTOSCALER_DESIRED)}{SEL}", "desired {{model}}"),
        (f"{n(metrics.AUTOSCALER_CURRENT)}{SEL}", "current {{model}}"),
    )),
    Panel("Predicted KV demand over capacity", ((f"{n(metrics.AUTOSCALER_KV_DEMAND)}{SEL}", "{{model}}"),), "percentunit"),
    Panel("Autoscaling decisions by reason", ((_rate(metrics.AUTOSCALER_DECISIONS, "reason"), "{{reason}}"),), "ops"),
    Panel("Preemptions per second", ((_rate(metrics.ENGINE_PREEMPTIONS, "replica"), "{{replica}}"),), "ops"),
    Panel("GPU memory per GPU", (
        (f"{n(metrics.GPU_MEMORY_USED)}{SEL}", "used {{replica}} gpu {{gpu}}"),
        (f"{n(metrics.GPU_MEMORY_TOTAL)}{SEL}", "total {{replica}} gpu {{gpu}}"),
    ), "bytes", gpu_only=True),
    Panel("KV-cache bytes per GPU", ((f"{n(metrics.GPU_KV_CACHE_BYTES)}{SEL}", "{{replica}} gpu {{gpu}}"),), "bytes",
          gpu_only=True),
)

ROUTER = (
    Panel("Routing decisions per replica", ((_rate(metrics.ROUTER_DECISIONS, "replica"), "{{replica}}"),), "reqps"),
    Panel("Load spread across replicas (coefficient of variation of decisions)", ((
        f"stddev by (model) (sum by (model, replica) (rate({n(metrics.ROUTER_DECISIONS)}{SEL}[{RATE}]))) / "
        f"avg by (model) (sum by (model, replica) (rate({n(metrics.ROUTER_DECISIONS)}{SEL}[{RATE}])))", "{{model}}"),),
        "percentunit"),
    Panel("Engine prefix-cache hit rate", ((
        f"sum by (model) (rate({n(metrics.ENGINE_PREFIX_HITS)}{SEL}[{RATE}])) / "
        f"sum by (model) (rate({n(metrics.ENGINE_PREFIX_QUERIES)}{SEL}[{RATE}]))", "{{model}}"),), "percentunit"),
    Panel("Router's prefix match on the chosen replica", (
        (_q(0.5, metrics.ROUTER_PREFIX_MATCH), "p50"), (_q(0.9, metrics.ROUTER_PREFIX_MATCH), "p90")), "percentunit"),
    Panel("Tokens in flight per replica (router's account)", (
        (f"{n(metrics.ROUTER_TOKENS_IN_FLIGHT)}{SEL}", "{{replica}}"),)),
    Panel("Router decision time", ((_q(0.5, metrics.ROUTER_DECISION_SECONDS), "p50"),
                                   (_q(0.99, metrics.ROUTER_DECISION_SECONDS), "p99")), "s"),
)

LORA = (
    Panel("LoRA requests per second by adapter", ((_rate(metrics.LORA_REQUESTS, "adapter"), "{{adapter}}"),), "reqps"),
    Panel("LoRA tokens per second by adapter", (
        (_rate(metrics.LORA_PROMPT_TOKENS, "adapter"), "prompt {{adapter}}"),
        (_rate(metrics.LORA_GENERATION_TOKENS, "adapter"), "generated {{adapter}}"),
    )),
    Panel("Adapter loads and evictions per replica", (
        (_rate(metrics.LORA_LOADS, "replica"), "loads {{replica}}"),
        (_rate(metrics.LORA_EVICTIONS, "replica"), "evictions {{replica}}"),
    ), "ops"),
    Panel("Adapters resident per replica", ((f"{n(metrics.LORA_RESIDENT)}{SEL}", "{{replica}}"),)),
)

DASHBOARDS: dict[str, tuple[str, tuple[Panel, ...]]] = {
    "kvpilot-overview": ("kvpilot / Overview", OVERVIEW),
    "kvpilot-model": ("kvpilot / Model", MODEL),
    "kvpilot-router": ("kvpilot / Router", ROUTER),
    "kvpilot-lora": ("kvpilot / LoRA adapters", LORA),
}


def _panel_json(p: Panel, i: int) -> dict:
    return {
        "id": i + 1,
        "type": "timeseries",
        "title": p.title + (" (GPU only)" if p.gpu_only else ""),
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
        "fieldConfig": {"defaults": {"unit": p.unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
        "targets": [
            {"refId": chr(ord("A") + j), "expr": expr, "legendFormat": legend,
             "datasource": {"type": "prometheus", "uid": "${datasource}"}}
            for j, (expr, legend) in enumerate(p.exprs)
        ],
    }


def dashboard_json(uid: str) -> dict:
    title, panels = DASHBOARDS[uid]
    return {
        "uid": uid,
        "title": title,
        "tags": ["kvpilot"],
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "timezone": "",
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0, "refresh": 1, "regex": "", "options": []},
            {"name": "model", "label": "Model", "type": "query",
             "datasource": {"type": "prometheus", "uid": "${datasource}"},
             "query": {"query": f"label_values({n(metrics.ENGINE_RUNNING)}, model)", "refId": "model"},
             "definition": f"label_values({n(metrics.ENGINE_RUNNING)}, model)",
             "includeAll": True, "multi": True, "allValue": ".*", "current": {}, "hide": 0, "refresh": 2,
             "sort": 1, "options": []},
        ]},
        "panels": [_panel_json(p, i) for i, p in enumerate(panels)],
    }


def write_dashboards(out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for uid in DASHBOARDS:
        path = out / f"{uid}.json"
        path.write_text(json.dumps(dashboard_json(uid), indent=2) + "\n")
        paths.append(path)
    return paths
