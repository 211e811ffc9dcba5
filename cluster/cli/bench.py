"""``kvpilot bench``: the sub-command's arguments and what it runs.

Wired into ``kvpilot`` by ``cluster.cli.kvpilot`` (``add_bench_parser(sub)``; ``run_bench(ns, console)``);
also runnable alone as ``python -m cluster.bench ...``.
"""

from __future__ import annotations

import argparse
import json
import urllib.error
from pathlib import Path
from typing import Any

from rich.console import Console

# The run's modules (aiohttp, numpy, matplotlib) are imported when a run starts, not when
# ``kvpilot`` builds its parser.
DEFAULT_TOKEN_ID_RANGE_TEXT = "16:480"  # cluster.bench.workload.DEFAULT_TOKEN_ID_RANGE
EXIT_OK, EXIT_FAILED_REQUESTS = 0, 1
WARMUP_SEED_OFFSET = 7919  # warm-up prompts come from another seed: they must not prime the prefix cache


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench", help="load-test an OpenAI-compatible endpoint: TTFT, ITL, TPOT, throughput, goodput",
        description="Send a workload to an OpenAI-compatible server (kvpilot, vLLM, Ray Serve LLM, ...) "
                    "with streaming, and report TTFT, ITL, TPOT, end-to-end latency, throughput and goodput.")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (without /v1)")
    p.add_argument("--model", help="model id to request (default: the first of GET /v1/models)")
    arrival = p.add_mutually_exclusive_group()
    arrival.add_argument("--rate", type=float, help="open loop: requests/s, Poisson (or Gamma, see --burstiness)")
    arrival.add_argument("--concurrency", type=int, help="closed loop: this many requests in flight at all times")
    p.add_argument("--trace", help="workload file: Azure CSV, a length-table CSV (ShareGPT, arXiv) or Mooncake "
                                   "JSONL; without --rate/--concurrency its own timestamps set the arrivals")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="Gamma shape of the gaps with --rate: 1.0 = Poisson, < 1 burstier (default 1.0)")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="trace timestamps are divided by this: 2 replays twice as fast (default 1.0)")
    p.add_argument("--max-concurrency", type=int, help="open loop: cap on requests in flight")
    p.add_argument("--num-requests", "-n", type=int, default=256, help="requests to send (default 256)")
    p.add_argument("--trace-offset", type=int, default=0, help="skip this many trace rows first")
    p.add_argument("--input-len", type=int, default=128, help="synthetic workload: prompt tokens (default 128)")
    p.add_argument("--output-len", type=int, default=128, help="synthetic workload: output tokens (default 128)")
    p.add_argument("--scale-lengths", type=float,
                   help="multiply trace prompt and output lengths by this (default: scale the trace to fit "
                        "max_model_len if it must)")
    p.add_argument("--max-model-len", type=int, help="clip requests to this (default: the server's max_model_len "
                                                     "from /v1/models)")
    p.add_argument("--hash-block-tokens", type=int,
                   help="Mooncake: tokens per hash id (default 512 × the length scale)")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--prompt-format", choices=["token-ids", "text"],
                   help="token-id prompts (exact lengths; default for completions) or text (chat)")
    p.add_argument("--token-id-range", help=f"LO:HI ids for token-id prompts (default {DEFAULT_TOKEN_ID_RANGE_TEXT})")
    p.add_argument("--tokenizer", help="take the token-id range from this tokenizer (a local dir or hub id)")
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="do not send ignore_eos (outputs may end early)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=0, help="requests sent (and not measured) before the run")
    p.add_argument("--slo-ttft", type=float, default=2.0, help="goodput SLO on TTFT, seconds (default 2)")
    p.add_argument("--slo-tpot", type=float, default=0.2, help="goodput SLO on TPOT, seconds (default 0.2)")
    p.add_argument("--percentiles", default="50,90,95,99", help="latency percentiles to report")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--api-key", help="sent as a bearer token")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of the tables")
    p.add_argument("--output", "-o", help="also write the JSON result to this file")
    p.add_argument("--save-requests", action="store_true", help="include per-request records in the JSON")
    p.add_argument("--plot-dir", help="write latency CDFs and a throughput timeline (PNG) here")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar on stderr")
    _add_profile_args(p)
    return p


def _add_profile_args(p: argparse.ArgumentParser) -> None:
    """``--profile``: measure the endpoint for ``kvpilot simulate --profile`` instead of a load test."""
    prof = p.add_argument_group("profiling for the simulator (--profile)")
    prof.add_argument("--profile", metavar="OUT",
                      help="instead of a load test, measure the endpoint for kvpilot simulate --profile: lone-request "
                           "TTFT by prompt length, a cached prompt, time per output token by batch; write the "
                           "fitted step model and serving delay to OUT (JSON). 5-25 s on the tiny CPU model")
    prof.add_argument("--profile-reps", type=int, default=3, help="lone requests per prompt length (default 3)")
    prof.add_argument("--profile-max-batch", type=int, default=32,
                      help="largest batch of concurrent streams per replica (default 32; keep it <= the model's "
                           "max_num_seqs)")
    prof.add_argument("--profile-kv-tokens", type=int,
                      help="KV cache tokens of one replica (kvpilot plan prints them): decode batches that would "
                           "not fit are skipped")
    prof.add_argument("--profile-replicas", type=int, default=1,
                      help="replicas serving the model: decode batches send this many times the streams (default 1)")


def _percentiles(text: str) -> tuple[float, ...]:
    try:
        ps = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--percentiles must be numbers separated by commas, got {text!r}") from None
    if not ps or any(not 0 <= p <= 100 for p in ps):
        raise ValueError(f"--percentiles must be in [0, 100], got {text!r}")
    return ps


def _server_model(ns: argparse.Namespace) -> tuple[str, int | None]:
    """The model to request and its max_model_len, from the flags and GET /v1/models."""
    from cluster.bench.client import list_models

    try:
        models = list_models(ns.url, api_key=ns.api_key)
    except (urllib.error.URLError, OSError, ValueError, KeyError) as e:
        if ns.model:  # a server without /v1/models can still be benchmarked
            return ns.model, ns.max_model_len
        raise ValueError(f"cannot list the models of {ns.url}: {e}") from e
    by_id = {m.get("id"): m for m in models}
    if ns.model and ns.model not in by_id:
        raise ValueError(f"{ns.url} does not serve model {ns.model!r}; it serves {', '.join(map(str, by_id))}")
    model = ns.model or models[0]["id"]
    card = by_id[model]
    # vLLM and kvpilot: max_model_len; Ray Serve LLM: metadata.max_request_context_length
    limit = card.get("max_model_len") or (card.get("metadata") or {}).get("max_request_context_length")
    return model, ns.max_model_len or limit


def build_from_args(ns: argparse.Namespace) -> tuple[Any, Any, list[Any]]:
    """Flags → (BenchConfig, Workload, warm-up RequestSpecs). Raises ValueError naming a bad flag."""
    from cluster.bench.runner import BenchConfig
    from cluster.traces import SLO
    from cluster.bench.workload import build_workload

    if ns.num_requests < 1:
        raise ValueError(f"--num-requests must be >= 1, got {ns.num_requests}")
    if ns.rate is not None:
        mode = "rate"
    elif ns.concurrency is not None:
        mode = "concurrency"
    elif ns.trace:
        mode = "trace"
    else:
        raise ValueError("give --rate R, --concurrency C, or --trace PATH (replayed on its own timestamps)")
    model, max_model_len = _server_model(ns)
    prompt_format = ns.prompt_format or ("text" if ns.endpoint == "chat" else "token-ids")
    shape = {"max_model_len": max_model_len, "prompt_format": prompt_format, "token_id_range": _token_id_range(ns)}
    workload = build_workload(trace=ns.trace, num_requests=ns.num_requests, offset=ns.trace_offset,
                              input_len=ns.input_len, output_len=ns.output_len, scale_lengths=ns.scale_lengths,
                              block_tokens=ns.hash_block_tokens, seed=ns.seed, **shape)
    warmup = []
    if ns.warmup > 0:
        reqs = workload.requests
        warm = build_workload(num_requests=ns.warmup, seed=ns.seed + WARMUP_SEED_OFFSET,
                              input_len=max(1, round(sum(r.input_len for r in reqs) / len(reqs))),
                              output_len=max(1, round(sum(r.output_len for r in reqs) / len(reqs))), **shape)
        warmup = warm.requests
    cfg = BenchConfig(
        base_url=ns.url, model=model, mode=mode, concurrency=ns.concurrency, rate=ns.rate,
        burstiness=ns.burstiness, time_scale=ns.time_scale, max_concurrency=ns.max_concurrency,
        endpoint=ns.endpoint, ignore_eos=ns.ignore_eos, temperature=ns.temperature,
        request_timeout_s=ns.request_timeout, seed=ns.seed, slo=SLO(ns.slo_ttft, ns.slo_tpot),
        percentiles=_percentiles(ns.percentiles), api_key=ns.api_key,
    )
    return cfg, workload, warmup


def write_plots(result: Any, plot_dir: str | Path, label: str = "") -> list[Path]:
    from cluster.bench.report import plot_cdfs, plot_timeline

    d = Path(plot_dir)
    d.mkdir(parents=True, exist_ok=True)
    name = label or result.config.model
    return [plot_cdfs({name: result.records}, d / "latency_cdf.png", title=name),
            plot_timeline({name: result.timeline()}, d / "throughput.png", title=name)]


def _token_id_range(ns: argparse.Namespace) -> tuple[int, int]:
    from cluster.bench.workload import DEFAULT_TOKEN_ID_RANGE, parse_token_id_range, token_id_range_from_tokenizer

    if ns.tokenizer:
        return token_id_range_from_tokenizer(ns.tokenizer)
    if ns.token_id_range:
        return parse_token_id_range(ns.token_id_range)
    return DEFAULT_TOKEN_ID_RANGE


def run_profile_command(ns: argparse.Namespace, console: Console) -> int:
    """``kvpilot bench --profile OUT``: measure, fit, write, and say what was found."""
    from cluster.bench.profile import run_profile

    load_test = {"--rate": ns.rate, "--concurrency": ns.concurrency, "--trace": ns.trace, "--output": ns.output,
                 "--plot-dir": ns.plot_dir, "--warmup": ns.warmup or None, "--save-requests": ns.save_requests or None}
    given = [flag for flag, value in load_test.items() if value is not None]
    if given:
        raise ValueError(f"{given[0]}: {load_test[given[0]]} is a load-test flag; --profile {ns.profile} sends its "
                         "own shapes and writes its result there")
    model, max_model_len = _server_model(ns)
    if not max_model_len:
        raise ValueError(f"--max-model-len: {ns.url} does not say its max_model_len; give it")
    err = Console(stderr=True, soft_wrap=True)
    err.print(f"profiling {model} at {ns.url} (max_model_len {max_model_len})", highlight=False, soft_wrap=True)
    profile = run_profile(ns.url, model, max_model_len, reps=ns.profile_reps, max_batch=ns.profile_max_batch,
                          replicas=ns.profile_replicas, kv_tokens=ns.profile_kv_tokens,
                          token_id_range=_token_id_range(ns), api_key=ns.api_key,
                          say=lambda line: err.print(f"  {line}", highlight=False))
    out = Path(ns.profile)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(profile.to_dict(), indent=2))
    if ns.json:
        print(json.dumps(profile.to_dict(), indent=2))
        return EXIT_OK
    f = profile.step.fit
    console.print(profile.describe(), highlight=False, soft_wrap=True)
    console.print(f"fit on {f.rows} rows: MAPE {f.mape:.1%} (prefill {f.mape_prefill:.1%}, decode "
                  f"{f.mape_decode:.1%}), max {f.max_ape:.1%}", highlight=False, soft_wrap=True)
    console.print(f"wrote {out}; use it with kvpilot simulate --profile {out} --config <the deployment's config>",
                  highlight=False, soft_wrap=True)
    return EXIT_OK


def run_bench(ns: argparse.Namespace, console: Console) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if ns.profile:
        return run_profile_command(ns, console)

    from cluster.bench.metrics import RequestRecord
    from cluster.bench.report import render
    from cluster.bench.runner import run_benchmark

    cfg, workload, warmup = build_from_args(ns)
    err = Console(stderr=True, soft_wrap=True)
    if workload.scale.factor != 1.0 or workload.scale.clipped:
        err.print(f"[yellow]note:[/yellow] {workload.scale.describe()}", highlight=False)
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[failed]} failed"), TimeElapsedColumn(),
                        console=err, transient=True, disable=not ns.progress)
    with progress:
        if warmup:
            err.print(f"warming up with {len(warmup)} requests", highlight=False)
        task = progress.add_task(f"bench {cfg.model}", total=len(workload.requests), failed=0)
        failed = 0

        def on_done(rec: RequestRecord) -> None:
            nonlocal failed
            failed += not rec.ok
            progress.update(task, advance=1, failed=failed)

        result = run_benchmark(cfg, workload, warmup, on_done)
    data = result.to_dict(save_requests=ns.save_requests)
    if ns.output:
        Path(ns.output).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.output).write_text(json.dumps(data, indent=2))
    if ns.json:
        print(json.dumps(data, indent=2))
    else:
        render(data, console)
    if ns.plot_dir:
        for path in write_plots(result, ns.plot_dir):
            err.print(f"wrote {path}", highlight=False)
    return EXIT_OK if result.summary["failed"] == 0 else EXIT_FAILED_REQUESTS


def main(argv: list[str] | None = None) -> int:
    """``python -m cluster.bench ARGS`` = ``kvpilot bench ARGS``."""
    from cluster.cli.standalone import run_alone

    return run_alone("kvpilot", "bench", add_bench_parser, run_bench, argv)
