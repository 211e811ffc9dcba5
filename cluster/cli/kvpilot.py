"""The ``kvpilot`` command: plan, validate, sizes, tiny-model."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from cluster.config import ClusterConfig, ConfigError
from cluster.planning.hardware import CATALOG, QUANTIZATIONS
from cluster.planning.modelspec import load_spec
from cluster.planning.planner import parameter_count, plan_model, size_table
from cluster.planning.report import gib, render_plan

EXIT_OK, EXIT_INVALID, EXIT_DOES_NOT_FIT = 0, 2, 3


def _cmd_plan(ns: argparse.Namespace, console: Console) -> int:
    if ns.config:
        cfg = ClusterConfig.from_serve_yaml(ns.config)
        models = cfg.models
    else:
        if not (ns.model and ns.gpu):
            raise SystemExit("kvpilot plan: give CONFIG.yaml, or --model and --gpu")
        fields = {
            "name": ns.model.rstrip("/").split("/")[-1],
            "source": ns.model,
            "quantization": ns.quantization,
            "accelerator": ns.gpu,
            "tensor_parallel_size": ns.tp,
            "pipeline_parallel_size": ns.pp,
            "kv_cache_dtype": ns.kv_cache_dtype,
        }
        if ns.revision:
            fields["revision"] = ns.revision
        if ns.max_model_len:
            fields["max_model_len"] = ns.max_model_len
        if ns.gpu_memory_utilization is not None:
            fields["gpu_memory_utilization"] = ns.gpu_memory_utilization
        try:
            models = [ClusterConfig.from_args({"models": [fields]}, "").models[0]]
        except ConfigError as e:  # name the field as the flags do, not as a YAML path
            raise ConfigError([line.removeprefix(".models[0].") for line in e.errors]) from e
    plans = [plan_model(m, ns.gpu if ns.config else None) for m in models]
    if ns.json:
        print(json.dumps({"models": [p.to_dict() for p in plans]}, indent=2))
    else:
        for p in plans:
            render_plan(p, console)
    return EXIT_OK if all(p.fits for p in plans) else EXIT_DOES_NOT_FIT


def _cmd_validate(ns: argparse.Namespace, console: Console) -> int:
    cfg = ClusterConfig.from_serve_yaml(ns.config)
    for m in cfg.models:
        for n in m.notes():
            console.print(f"[yellow]warning:[/yellow] {m.name}: {n}", highlight=False)
    console.print(f"{ns.config}: valid ({len(cfg.models)} model{'s' if len(cfg.models) > 1 else ''})", highlight=False)
    return EXIT_OK


def _cmd_sizes(ns: argparse.Namespace, console: Console) -> int:
    spec = load_spec(ns.model)
    params = parameter_count(spec)
    t = Table(title=f"{ns.model}: {params / 1e9:.2f} B parameters ({spec.describe()})", title_justify="left")
    t.add_column("format")
    t.add_column("weights", justify="right")
    t.add_column("bytes / parameter", justify="right")
    for label, nbytes in size_table(spec):
        t.add_row(label, gib(nbytes), f"{nbytes / params:.4f}")
    console.print(t)
    console.print("  embeddings and lm_head stay 16-bit in the quantized rows; vocabulary padded to 64", highlight=False)
    return EXIT_OK


def _cmd_tiny_model(ns: argparse.Namespace, console: Console) -> int:
    from cluster.fixtures.tinymodel import write_tiny_model

    from cluster.fixtures.tinymodel import write_fixture

    if ns.fixture:
        path = write_fixture(ns.out, ns.fixture, seed=ns.seed)
        console.print(f"wrote tiny fixture {ns.fixture} to {path}", highlight=False)
        return EXIT_OK
    path = write_tiny_model(ns.out, ns.quantization, seed=ns.seed)
    console.print(f"wrote tiny {ns.quantization} Llama to {path}", highlight=False)
    return EXIT_OK


def _cmd_wait_ready(ns: argparse.Namespace, console: Console) -> int:
    """Poll an endpoint until every model is listed, then print how to call it."""
    import time
    import urllib.error
    import urllib.request

    url = ns.url.rstrip("/")
    deadline = time.monotonic() + ns.timeout
    with console.status(f"waiting for {url} to serve its models (engines load in about a minute on 2 cores)"):
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=10) as r:
                    r.read()  # 200 only once every model has a live replica
                with urllib.request.urlopen(f"{url}/v1/models", timeout=5) as r:
                    models = [m["id"] for m in json.load(r)["data"]]
                break
            except (urllib.error.URLError, OSError, ValueError, KeyError):
                if ns.while_pid and not _alive(ns.while_pid):
                    return EXIT_INVALID  # the server exited; it has said why
                if time.monotonic() > deadline:
                    console.print(f"[red]error:[/red] {url} did not come up within {ns.timeout:.0f} s")
                    return EXIT_INVALID
                time.sleep(1)
    model = models[0]
    console.print(f"\n[green]kvpilot is serving {', '.join(models)} at {url}/v1[/green]\n", highlight=False)
    console.print("curl:", highlight=False)
    console.print(
        f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
        f'    -d \'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}], "max_tokens": 32}}\'',
        highlight=False, markup=False,
    )
    console.print("\nopenai (Python):", highlight=False)
    console.print(
        "  from openai import OpenAI\n"
        f'  client = OpenAI(base_url="{url}/v1", api_key="unused")\n'
        f'  r = client.chat.completions.create(model="{model}", max_tokens=32,\n'
        '                                     messages=[{"role": "user", "content": "Hello!"}])\n'
        "  print(r.choices[0].message.content)\n",
        highlight=False, markup=False,
    )
    return EXIT_OK


def _cmd_dashboards(ns: argparse.Namespace, console: Console) -> int:
    from cluster.chart.dashboards import write_dashboards

    for path in write_dashboards(ns.out):
        console.print(f"wrote {path}", highlight=False)
    return EXIT_OK


def _cmd_simulate(ns: argparse.Namespace, console: Console) -> int:
    from cluster.cli.simulate import run_simulate

    return run_simulate(ns, console)


def _cmd_bench(ns: argparse.Namespace, console: Console) -> int:
    from cluster.cli.bench import run_bench

    return run_bench(ns, console)


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvpilot", description="Plan and serve quantized LLMs on a Ray cluster.")
    sub = p.add_subparsers(dest="command", required=True)

    plan = sub.add_parser("plan", help="memory plan: does each model fit its GPUs, and how much KV cache is left")
    plan.add_argument("config", nargs="?", help="a Serve config YAML with kvpilot's application")
    plan.add_argument("--gpu", choices=list(CATALOG), help="plan on this accelerator instead of the configured one")
    plan.add_argument("--model", help="ad hoc: a hub id or a local model directory")
    plan.add_argument("--quantization", default="auto", help=f"ad hoc: one of {', '.join(QUANTIZATIONS)}")
    plan.add_argument("--revision", help="ad hoc: hub branch, tag or commit of --model")
    plan.add_argument("--tp", type=int, default=1, help="ad hoc: tensor-parallel size")
    plan.add_argument("--pp", type=int, default=1, help="ad hoc: pipeline-parallel size")
    plan.add_argument("--kv-cache-dtype", default="auto")
    plan.add_argument("--max-model-len", type=int)
    plan.add_argument("--gpu-memory-utilization", type=float)
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")

    val = sub.add_parser("validate", help="check a Serve config; print every error")
    val.add_argument("config")

    sizes = sub.add_parser("sizes", help="weight memory of a model under each quantization format")
    sizes.add_argument("model", help="a hub id from the built-in table or a local model directory")

    tiny = sub.add_parser("tiny-model", help="write a tiny random Llama (fp16, AWQ or GPTQ) for tests and demos")
    tiny.add_argument("out")
    tiny.add_argument("--quantization", choices=["none", "awq", "gptq"], default="none")
    tiny.add_argument("--fixture", help="a named fixture instead: none, awq, gptq, mixtral-none, qwen3moe-none, w8a8, "
                      "lora (PEFT adapters for the tiny Llama, in OUT/NAME) "
                      "(MoE: STYLE-QUANT with STYLE mixtral or qwen3moe)")
    tiny.add_argument("--seed", type=int, default=0)

    from cluster.cli.bench import add_bench_parser
    from cluster.cli.simulate import add_simulate_parser

    add_simulate_parser(sub)
    add_bench_parser(sub)

    dash = sub.add_parser("dashboards", help="write the Grafana dashboards (JSON) generated from the metric names")
    dash.add_argument("out", nargs="?", default="helm/kvpilot/dashboards")

    ready = sub.add_parser("wait-ready", help="wait until an endpoint serves its models, then print how to call it")
    ready.add_argument("url", nargs="?", default="http://127.0.0.1:8000")
    ready.add_argument("--timeout", type=float, default=600.0, help="seconds to wait")
    ready.add_argument("--while-pid", type=int, help="stop waiting when this process (the server) exits")
    return p


_COMMANDS = {
    "plan": _cmd_plan,
    "validate": _cmd_validate,
    "sizes": _cmd_sizes,
    "tiny-model": _cmd_tiny_model,
    "wait-ready": _cmd_wait_ready,
    "dashboards": _cmd_dashboards,
    "simulate": _cmd_simulate,
    "bench": _cmd_bench,
}


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    console = Console(soft_wrap=True)
    err = Console(stderr=True, soft_wrap=True)
    try:
        return _COMMANDS[ns.command](ns, console)
    except ConfigError as e:
        for line in e.errors:
            err.print(f"[red]error:[/red] {line}", highlight=False)
        return EXIT_INVALID
    except ValueError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        return EXIT_INVALID


if __name__ == "__main__":
    sys.exit(main())
