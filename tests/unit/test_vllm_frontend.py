"""How a replica hands vLLM's HTTP response to the ingress (deployments/vllm_frontend.py), over a plain ASGI app."""

from __future__ import annotations

import asyncio
import types

from deployments import vllm_frontend
from deployments.vllm_frontend import VllmHttpApp

CHUNKS = [f"data: {i}\n\n".encode() for i in range(12)]


async def _sse_app(scope, receive, send):  # noqa: ANN001
    assert (await receive())["body"] == b'{"stream": true}'
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    for chunk in CHUNKS:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await asyncio.sleep(0.005)  # an engine step
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def _items(busy: int) -> list:
    app = VllmHttpApp(_sse_app, types.SimpleNamespace(errored=False))
    app._streaming = busy  # other responses streaming from this replica

    async def run() -> list:
        return [item async for item in app.call("POST", "/v1/completions", b"", [], b'{"stream": true}')]

    return asyncio.run(run())


def test_first_bytes_alone_then_every_byte_in_order_and_a_usage_trailer():
    items = _items(busy=0)
    first, *middle, trailer = items
    assert first["status"] == 200 and first["more"] and first["body"] == CHUNKS[0]
    assert first["body"] + b"".join(middle) == b"".join(CHUNKS)
    assert trailer == {"usage": {"prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0}}


def test_a_busy_replica_sends_fewer_larger_items():
    idle, busy = _items(busy=0), _items(busy=vllm_frontend.COALESCE_MIN_STREAMS)
    assert b"".join(i for i in busy[1:-1]) == b"".join(CHUNKS[1:])
    assert busy[0]["body"] == CHUNKS[0]  # the first bytes never wait
    assert len(busy) < len(idle) - 3, (len(busy), len(idle))


def test_parsers_are_checked_against_vllm_and_the_tokenizer_before_anything_starts():
    import pytest

    from cluster.config import ConfigError, ModelConfig
    from deployments.vllm_frontend import check_openai_config
    from tests.serve.conftest import ROOT

    base = dict(name="t", source=str(ROOT / ".fixtures/tiny-none"), accelerator="cpu", dtype="float16",
                max_model_len=256)
    check_openai_config(ModelConfig(**base, openai={"tool_call_parser": "pythonic"}), "models[0]")
    with pytest.raises(ConfigError, match=r"models\[0\]\.openai\.tool_call_parser: 'no-such' is not a vLLM"):
        check_openai_config(ModelConfig(**base, openai={"tool_call_parser": "no-such"}), "models[0]")
    # llama3_json needs <|python_tag|>, which the tiny tokenizer lacks: vLLM would fail the replica after loading
    with pytest.raises(ConfigError, match=r"tool_call_parser: 'llama3_json' does not fit this model's tokenizer"):
        check_openai_config(ModelConfig(**base, openai={"tool_call_parser": "llama3_json"}), "models[0]")
