"""``build_app``: the builder a Serve config points at (``import_path: deployments.app:build_app``).

YAML ``args`` → ``ClusterConfig`` → memory plan (a config that does not fit is
refused here, before any actor or engine starts) → one model deployment per
model and one OpenAI ingress.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application
from rich.console import Console

from cluster.config import ClusterConfig, ConfigError
from cluster.planning.planner import plan_model
from cluster.planning.report import render_plan
from cluster.serving.placement import deployment_options, ingress_options
from deployments.engine import ModelServer
from deployments.ingress import Ingress
from deployments.vllm_frontend import check_openai_config


class PlanRefused(ValueError):
    """The config is valid but a model does not fit its accelerators."""


def build_app(args: dict[str, Any]) -> Application:
    try:
        cfg = ClusterConfig.from_args(args)
    except ConfigError as e:
        raise ConfigError([f"kvpilot config: {line}" for line in e.errors]) from None
    errors = []
    for i, model in enumerate(cfg.models):  # what only vLLM knows: its parsers and template rules
        try:
            check_openai_config(model, f"models[{i}]")
        except ConfigError as e:
            errors += [f"kvpilot config: {line}" for line in e.errors]
    if errors:
        raise ConfigError(errors)
    console = Console(stderr=True, soft_wrap=True)
    plans = {m.name: plan_model(m) for m in cfg.models}
    refused = []
    for model in cfg.models:
        plan = plans[model.name]
        render_plan(plan, console)
        if not plan.fits:
            refused.append(f"{model.name}: short by {plan.shortfall_bytes / 2**30:.2f} GiB per GPU on {plan.gpu}"
                           + (f"; try {plan.suggestions[0]}" if plan.suggestions else ""))
    if refused:
        raise PlanRefused("kvpilot: refusing to start, the memory plan does not fit:\n  " + "\n  ".join(refused))
    handles = {
        m.name: serve.deployment(ModelServer)
        .options(**deployment_options(m, plans[m.name].kv_cache_tokens, plans[m.name].block_size))
        .bind(m, plans[m.name].per_gpu.kv_cache_bytes)
        for m in cfg.models
    }
    return Ingress.options(**ingress_options(cfg.models)).bind(handles, cfg.models, cfg.ingress)
