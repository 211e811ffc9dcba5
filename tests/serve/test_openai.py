"""The OpenAI API on the real stack: what a client sees."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import openai
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


def _wait_for(predicate, timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


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


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/v1/completions", b"{not json", 400, None),
        ("/v1/completions", b"[1, 2]", 400, None),
        ("/v1/completions", {"model": FP16}, 400, "prompt"),
        ("/v1/completions", {"model": FP16, "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
        ("/v1/completions", {"model": FP16, "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
        ("/v1/completions", {"model": FP16, "prompt": "x", "temperature": 1e9}, 400, "temperature"),
        ("/v1/completions", {"model": FP16, "prompt": "x", "n": 100000}, 400, "n"),
        ("/v1/completions", {"model": FP16, "prompt": "x", "frobnicate": 1}, 400, "frobnicate"),
        ("/v1/completions", {"model": FP16, "prompt": ""}, 400, "prompt"),
        ("/v1/completions", {"model": FP16, "prompt": [10**9]}, 400, "prompt"),
        ("/v1/chat/completions", {"model": FP16, "messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"model": FP16, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
        ("/v1/chat/completions", {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
        ("/v1/completions", {"model": FP16, "prompt": "word " * 3000, "max_tokens": 10}, 400, "prompt"),
        ("/v1/completions", {"model": FP16, "prompt": "hello", "max_tokens": 5000}, 400, "max_tokens"),
    ],
)
def test_bad_input_gets_openai_error_json(base_url, path, body, status, param):
    r = _post(base_url, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    assert "Traceback" not in r.text


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
