"""``kvpilot bench`` without an engine: arithmetic, arrivals, prompt synthesis, and the
client against a tiny fake SSE server (testing the client's timing, not a server)."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
from aiohttp import web

from cluster.bench.arrivals import gamma_intervals, random_arrivals, trace_arrivals
from cluster.bench.metrics import RequestRecord, distribution, summarize, throughput_timeline
from cluster.bench.runner import BenchConfig, run_benchmark
from cluster.bench.workload import PromptSynth, build_workload
from cluster.cli.bench import add_bench_parser, build_from_args, run_bench
from cluster.traces import SLO, clip, detect_kind

TRACES = Path(__file__).resolve().parents[2] / "benchmarks" / "traces"


def _record(i: int, start: float, ttft: float, gaps: list[float], out: int | None = None, ok: bool = True,
            error: str | None = None) -> RequestRecord:
    times = list(np.cumsum([ttft, *gaps]))
    r = RequestRecord(i, start, input_len=10, output_len=out or len(times), ok=ok, error=error)
    if ok:
        r.ttft_s, r.chunk_times_s, r.latency_s = ttft, times, times[-1]
        r.output_tokens, r.prompt_tokens, r.usage_reported = out or len(times), 10, True
    else:
        r.latency_s = 0.01
    return r


# --- arithmetic ------------------------------------------------------------------


def test_percentiles_and_throughput_on_hand_made_records():
    records = [
        _record(0, 0.0, 0.1, [0.1, 0.1, 0.1]),  # 4 tokens, ends at 0.4
        _record(1, 0.0, 0.3, [0.2, 0.2, 0.2]),  # ends at 0.9
        _record(2, 0.5, 0.5, [0.5, 0.5, 0.5]),  # ends at 2.5
        _record(3, 1.0, 0.0, [], ok=False, error="http_503"),
    ]
    s = summarize(records, SLO(ttft_s=0.4, tpot_s=0.25))
    assert s["completed"] == 3 and s["failed"] == 1 and s["errors"] == {"http_503": 1}
    assert s["duration_s"] == pytest.approx(2.5)
    assert s["output_tokens"] == 12 and s["prompt_tokens"] == 30
    assert s["output_throughput"] == pytest.approx(12 / 2.5)
    assert s["total_token_throughput"] == pytest.approx(42 / 2.5)
    assert s["request_throughput"] == pytest.approx(3 / 2.5)
    # TTFT 100, 300, 500 ms: median 300, p90 by linear interpolation 460
    assert s["ttft_ms"]["p50"] == pytest.approx(300)
    assert s["ttft_ms"]["p90"] == pytest.approx(460)
    assert s["ttft_ms"]["mean"] == pytest.approx(300)
    # TPOT = (latency - ttft) / (tokens - 1): 100, 200, 500 ms
    assert s["tpot_ms"]["p50"] == pytest.approx(200)
    # ITL pools every gap: three of 100, three of 200, three of 500
    assert s["itl_ms"]["p50"] == pytest.approx(200)
    assert s["itl_ms"]["max"] == pytest.approx(500)
    assert s["e2e_ms"]["max"] == pytest.approx(2000)
    # goodput: request 0 (100/100) and 1 (300/200) meet TTFT 400 ms and TPOT 250 ms; 2 does not
    assert s["goodput"] == pytest.approx(2 / 2.5)
    assert s["slo_attainment"] == pytest.approx(2 / 4)
    assert s["tokens_per_chunk"] == pytest.approx(1.0)


def test_tpot_of_one_token_output_is_undefined_and_passes_the_slo():
    r = _record(0, 0.0, 0.2, [])
    assert r.tpot_s is None
    assert r.meets(SLO(ttft_s=0.3, tpot_s=0.001))
    assert not r.meets(SLO(ttft_s=0.1, tpot_s=1.0))
    assert distribution([])["p50"] is None


def test_timeline_spreads_tokens_over_chunks():
    records = [_record(0, 0.0, 0.5, [0.5, 0.5, 0.5], out=8)]  # 2 tokens per chunk at 0.5, 1.0, 1.5, 2.0
    tl = throughput_timeline(records, bin_s=1.0)
    assert sum(v * tl["bin_s"] for v in tl["output_tok_s"]) == pytest.approx(8)
    assert tl["output_tok_s"] == pytest.approx([2.0, 6.0])  # 0.5 | 1.0, 1.5, 2.0 (clamped into the last bin)


# --- arrivals --------------------------------------------------------------------


@pytest.mark.parametrize("burstiness", [1.0, 0.25, 4.0])
def test_gamma_gaps_have_the_rate_and_the_coefficient_of_variation(burstiness: float):
    gaps = gamma_intervals(rate=8.0, n=40_000, burstiness=burstiness, seed=1)
    assert gaps.mean() == pytest.approx(1 / 8.0, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / np.sqrt(burstiness), rel=0.05)


def test_random_arrivals_are_sorted_seeded_and_at_the_rate():
    a = random_arrivals(rate=5.0, n=5000, seed=3)
    assert a == sorted(a) and a == random_arrivals(rate=5.0, n=5000, seed=3)
    assert len(a) / a[-1] == pytest.approx(5.0, rel=0.05)
    with pytest.raises(ValueError, match="rate"):
        random_arrivals(rate=0, n=3)


def test_trace_arrivals_start_at_zero_and_scale():
    assert trace_arrivals([10.0, 11.0, 14.0], time_scale=2.0) == [0.0, 0.5, 2.0]


# --- workloads -------------------------------------------------------------------


def _mooncake(tmp_path: Path) -> Path:
    rows = [
        {"timestamp": 0, "input_length": 20, "output_length": 4, "hash_ids": [1, 2, 3]},
        {"timestamp": 500, "input_length": 22, "output_length": 4, "hash_ids": [1, 2, 4]},
        {"timestamp": 1500, "input_length": 16, "output_length": 4, "hash_ids": [5, 1]},
        {"timestamp": 2000, "input_length": 24, "output_length": 4, "hash_ids": [1, 2, 3]},
    ]
    p = tmp_path / "mc.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_mooncake_prompts_share_exactly_the_prefixes_the_hash_ids_share(tmp_path: Path):
    w = build_workload(trace=_mooncake(tmp_path), num_requests=10, block_tokens=8, scale_lengths=1.0)
    a, b, c, d = (r.prompt for r in w.requests)
    assert [len(p) for p in (a, b, c, d)] == [20, 22, 16, 24]
    assert a[:16] == b[:16]  # hash ids 1, 2 shared
    assert a[16:20] != b[16:20]  # 3 vs 4
    assert c[8:16] == a[:8]  # hash id 1 is the same block wherever it appears
    assert c[:8] != a[:8]
    assert d[:20] == a  # same ids: the longer prompt extends the shorter
    assert w.requests[1].arrival_s == pytest.approx(0.5)
    again = build_workload(trace=_mooncake(tmp_path), num_requests=10, block_tokens=8, scale_lengths=1.0)
    assert [r.prompt for r in again.requests] == [a, b, c, d]  # deterministic


def test_mooncake_text_prompts_share_prefixes_too(tmp_path: Path):
    w = build_workload(trace=_mooncake(tmp_path), num_requests=2, block_tokens=8, scale_lengths=1.0,
                       prompt_format="text")
    a, b = (r.prompt.split() for r in w.requests)
    assert a[:16] == b[:16] and a[16:] != b[16:20]


def test_scaling_follows_max_model_len_and_says_so(tmp_path: Path):
    w = build_workload(trace=_mooncake(tmp_path), num_requests=4, max_model_len=14)
    assert w.scale.factor < 1.0 and "auto" in w.scale.reason
    assert all(r.input_len + r.output_len <= 14 for r in w.requests)
    assert w.scale.block_tokens == max(1, round(512 * w.scale.factor))
    assert "lengths ×" in w.scale.describe()
    assert clip(100, 50, 64) == (32, 32, True)
    assert clip(10, 5, 64) == (10, 5, False)


def test_unique_prompts_differ_and_stay_in_the_token_range():
    synth = PromptSynth(token_id_range=(16, 40))
    p, q = synth.prompt(0, 64), synth.prompt(1, 64)
    assert p != q and all(16 <= t < 40 for t in p + q)


@pytest.mark.skipif(not TRACES.is_dir(), reason="shared traces not present")
def test_the_shared_traces_load():
    assert detect_kind(TRACES / "AzureLLMInferenceTrace_conv.csv") == "azure"
    assert detect_kind(TRACES / "sharegpt_8k_filtered_stats_llama2_tokenizer.csv") == "length-table"
    az = build_workload(trace=TRACES / "AzureLLMInferenceTrace_conv.csv", num_requests=20, max_model_len=2048)
    assert az.has_timestamps and az.requests[0].arrival_s == 0.0
    assert all(r.input_len + r.output_len <= 2048 for r in az.requests)
    sg = build_workload(trace=TRACES / "sharegpt_8k_filtered_stats_llama2_tokenizer.csv", num_requests=5)
    assert not sg.has_timestamps


# --- the client against a fake SSE server ----------------------------------------

TTFT_S, ITL_S = 0.15, 0.04


def _fake_app() -> web.Application:
    """An OpenAI-style streaming server with known timing: first token after TTFT_S, then one per ITL_S."""

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake", "max_model_len": 256}]})

    async def completions(req: web.Request) -> web.StreamResponse:
        body = await req.json()
        if body["model"] != "fake":
            return web.json_response({"error": {"message": "no such model"}}, status=404)
        assert body["stream"] and body["ignore_eos"] and body["stream_options"]["include_usage"]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(req)
        prompt = body["prompt"]
        if prompt == [99]:  # an engine failure mid-stream
            await resp.write(b'data: {"error": {"message": "boom"}}\n\ndata: [DONE]\n\n')
            return resp
        await asyncio.sleep(TTFT_S)
        n = body["max_tokens"]
        for i in range(n):
            if i:
                await asyncio.sleep(ITL_S)
            chunk = {"object": "text_completion", "choices": [{"index": 0, "text": f" t{i}", "finish_reason": None}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        usage = {"prompt_tokens": len(prompt), "completion_tokens": n, "total_tokens": len(prompt) + n,
                 "prompt_tokens_details": {"cached_tokens": 0}}
        await resp.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode())
        return resp

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    return app


@pytest.fixture(scope="module")
def fake_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(_fake_app())
    started = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        started.set()
        loop.run_forever()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    assert started.wait(10)
    yield f"http://127.0.0.1:{port}"
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    t.join(10)


def test_client_measures_ttft_itl_and_tokens(fake_server: str):
    w = build_workload(num_requests=6, input_len=12, output_len=5)
    cfg = BenchConfig(base_url=fake_server, model="fake", mode="concurrency", concurrency=3)
    res = run_benchmark(cfg, w)
    s = res.summary
    assert s["completed"] == 6 and s["failed"] == 0
    assert s["output_tokens"] == 30 and s["prompt_tokens"] == 72 and s["output_len_mismatches"] == 0
    # The server sleeps TTFT_S, then ITL_S between tokens: the client can never see less. (No upper
    # bounds: how late a loaded machine delivers is not the client's behaviour.)
    # A loaded client may read two chunks in one go, so single gaps can be short; the totals cannot.
    for r in res.records:
        assert r.ttft_s >= TTFT_S
        assert len(r.chunk_times_s) == 5 and r.chunk_times_s[0] == r.ttft_s
        assert len(r.itl_s) == 4 and r.itl_s == pytest.approx(
            [b - a for a, b in zip(r.chunk_times_s, r.chunk_times_s[1:])])
        assert r.tpot_s == pytest.approx((r.latency_s - r.ttft_s) / 4)
        assert r.latency_s >= TTFT_S + 4 * ITL_S * 0.9
    assert s["ttft_ms"]["p50"] >= TTFT_S * 1000
    # closed loop of 3: two waves of (TTFT + 4 ITL) each
    assert s["duration_s"] >= 2 * (TTFT_S + 4 * ITL_S)


def test_open_loop_sends_on_schedule(fake_server: str):
    w = build_workload(num_requests=5, input_len=4, output_len=2)
    cfg = BenchConfig(base_url=fake_server, model="fake", mode="rate", rate=20.0, seed=5)
    res = run_benchmark(cfg, w)
    expected = random_arrivals(20.0, 5, seed=5)
    for r, at in zip(res.records, expected):
        assert r.start_s >= at - 0.005  # never early (late only by scheduling delay, not asserted)


def test_errors_are_counted_by_kind(fake_server: str):
    w = build_workload(num_requests=3, input_len=4, output_len=2)
    cfg = BenchConfig(base_url=fake_server, model="missing", mode="concurrency", concurrency=2)
    assert run_benchmark(cfg, w).summary["errors"] == {"http_404": 3}
    w.requests[0] = type(w.requests[0])(0, [99], 1, 2)
    cfg = BenchConfig(base_url=fake_server, model="fake", mode="concurrency", concurrency=2)
    s = run_benchmark(cfg, w).summary
    assert s["errors"] == {"stream_error": 1} and s["completed"] == 2
    dead = BenchConfig(base_url="http://127.0.0.1:9", model="fake", mode="concurrency", concurrency=1)
    (kind,) = run_benchmark(dead, build_workload(num_requests=1, input_len=2, output_len=2)).summary["errors"]
    assert kind == "ClientConnectorError"


def test_cli_writes_json_and_plots(fake_server: str, tmp_path: Path, capsys):
    import argparse

    from rich.console import Console

    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers(dest="command"))
    ns = parser.parse_args(["bench", "--url", fake_server, "--concurrency", "4", "-n", "8", "--input-len", "300",
                            "--output-len", "3", "--warmup", "2", "--json", "--save-requests",
                            "--output", str(tmp_path / "r.json"), "--plot-dir", str(tmp_path / "plots"),
                            "--no-progress"])
    assert run_bench(ns, Console()) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((tmp_path / "r.json").read_text())
    assert printed["summary"] == saved["summary"] and len(saved["requests"]) == 8
    assert saved["config"]["model"] == "fake"  # taken from /v1/models
    assert saved["workload"]["max_model_len"] == 256 and saved["workload"]["clipped"] == 8  # 300 + 3 > 256
    assert all(r["input_len"] == 253 for r in saved["requests"])
    assert (tmp_path / "plots" / "latency_cdf.png").stat().st_size > 0
    assert (tmp_path / "plots" / "throughput.png").stat().st_size > 0


def test_cli_refuses_a_run_without_an_arrival_mode(fake_server: str):
    import argparse

    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers(dest="command"))
    with pytest.raises(ValueError, match="--rate"):
        build_from_args(parser.parse_args(["bench", "--url", fake_server]))
    with pytest.raises(ValueError, match="does not serve"):
        build_from_args(parser.parse_args(["bench", "--url", fake_server, "--model", "x", "--rate", "1"]))


def test_rich_table_renders(fake_server: str):
    from rich.console import Console

    from cluster.bench.report import render

    cfg = BenchConfig(base_url=fake_server, model="fake", mode="concurrency", concurrency=2)
    res = run_benchmark(cfg, build_workload(num_requests=2, input_len=4, output_len=3))
    console = Console(record=True, width=140)
    render(res.to_dict(), console)
    text = console.export_text()
    assert "output throughput" in text and "TTFT" in text and "goodput" in text


def test_cli_replays_a_trace_on_its_own_clock(fake_server: str, tmp_path: Path):
    import argparse

    from rich.console import Console

    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers(dest="command"))
    ns = parser.parse_args(["bench", "--url", fake_server, "--trace", str(_mooncake(tmp_path)), "--time-scale", "10",
                            "--hash-block-tokens", "8", "--output", str(tmp_path / "t.json"), "--save-requests",
                            "--no-progress"])
    assert run_bench(ns, Console(file=io.StringIO())) == 0
    saved = json.loads((tmp_path / "t.json").read_text())
    assert saved["config"]["mode"] == "trace"
    starts = [r["start_s"] for r in saved["requests"]]
    # trace timestamps 0, 0.5, 1.5, 2 s replayed ten times faster
    for start, at in zip(starts, [0.0, 0.05, 0.15, 0.2]):
        assert start >= at - 0.005  # never early
    assert saved["workload"]["name"] == "mooncake" and saved["workload"]["block_tokens"] == 8


def test_sse_events_split_at_newlines_only():
    """Generated text may hold U+0085 or U+2028, which str.splitlines (httpx's aiter_lines) breaks at."""
    from cluster.bench.client import sse_data

    event = json.dumps({"choices": [{"text": "a\u2028b\x85c\u2029"}]}, ensure_ascii=False)
    raw = f"data: {event}\n\n: a comment\ndata: [DONE]\n\n".encode()

    async def chunks():
        for i in range(0, len(raw), 7):  # events cut across reads, as a socket delivers them
            yield raw[i:i + 7]

    async def collect():
        return [d async for d in sse_data(chunks())]

    got = asyncio.run(collect())
    assert got == [event, "[DONE]"]
    assert json.loads(got[0])["choices"][0]["text"] == "a\u2028b\x85c\u2029"


@pytest.mark.parametrize("events, outcome", [
    (['{"choices": [{"text": "a"}]}', "[DONE]"], "completed"),
    (['{"choices": [{"text": "a"}]}', '{"error": {"message": "engine died"}}', "[DONE]"], "failed_mid_stream"),
    (['{"error": {"message": "engine died"}}', "[DONE]"], "failed_before_streaming"),
    (['{"choices": [{"text": "a"}]}'], "failed_unclean"),  # the connection ended without [DONE]
])
def test_a_stream_outcome_is_read_from_its_events(events, outcome):
    from cluster.bench.client import stream_outcome

    raw = "".join(f"data: {e}\n\n" for e in events).encode()

    async def chunks():
        yield raw

    seen = []
    assert asyncio.run(stream_outcome(chunks(), lambda: seen.append(1))) == outcome
    assert len(seen) == len(events)


def test_profile_measures_each_shape_and_writes_a_file_the_simulator_reads(fake_server: str, tmp_path: Path,
                                                                            capsys):
    import argparse

    from rich.console import Console

    from cluster.sim.profile import load_profile

    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "profile.json"
    ns = parser.parse_args(["bench", "--url", fake_server, "--profile", str(out), "--profile-reps", "1",
                            "--profile-max-batch", "4", "--profile-kv-tokens", "200", "--no-progress"])
    assert run_bench(ns, Console()) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    prof = load_profile(out)
    assert prof.model == "fake" and prof.url == fake_server
    # max_model_len 256 (from /v1/models): prompts of 17, 65 and 129 tokens; 129 = 2^7 + 1 is sent again, cached
    assert [s.prompt_tokens for s in prof.prefill] == [17, 65, 129] and prof.cached.prompt_tokens == 129
    # 512 + 64 > 256; 4 streams of 32 + 64 tokens would not fit 200 KV tokens
    assert [(d.batch, d.context_tokens) for d in prof.decode] == [(1, 64), (2, 64)]
    # The fake server answers TTFT_S after a request whatever its prompt: nothing is faster than that.
    assert min(s.ttft_ms for s in [*prof.prefill, prof.cached]) >= TTFT_S * 1e3
    assert prof.serving_delay_s == pytest.approx(max(0.0, prof.cached.ttft_ms - prof.decode[0].itl_ms) / 1e3)


@pytest.mark.parametrize("flags", [["--rate", "2"], ["--concurrency", "4"], ["--output", "x.json"], ["--warmup", "3"]])
def test_profile_refuses_load_test_flags_by_name(fake_server: str, flags: list[str]):
    import argparse

    from rich.console import Console

    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers(dest="command"))
    ns = parser.parse_args(["bench", "--url", fake_server, "--profile", "p.json", *flags])
    with pytest.raises(ValueError, match=f"^{flags[0]}: {flags[1]}(\\.0)? is a load-test flag"):
        run_bench(ns, Console())
