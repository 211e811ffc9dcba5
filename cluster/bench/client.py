"""One streamed request to an OpenAI-compatible server, timed chunk by chunk.

``POST {base}/v1/completions`` (or ``/v1/chat/completions``) with ``stream: true``,
``stream_options.include_usage`` (token counts come from the final usage chunk) and vLLM's
``ignore_eos`` (outputs have the requested length). Server-sent events are read line by
line with aiohttp; the arrival time of every chunk that carries a choice is kept.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from cluster.bench.metrics import RequestRecord
from cluster.bench.workload import RequestSpec

ERROR_MESSAGE_CHARS = 300


def request_body(spec: RequestSpec, model: str, chat: bool, ignore_eos: bool = True,
                 temperature: float = 0.0) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": spec.output_len,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        body["ignore_eos"] = True
    if chat:
        if not isinstance(spec.prompt, str):
            raise ValueError("chat requests need text prompts: use --prompt-format text")
        body["messages"] = [{"role": "user", "content": spec.prompt}]
    else:
        body["prompt"] = spec.prompt
    return body


async def sse_data(chunks: AsyncIterator[bytes]) -> AsyncIterator[str]:
    """The ``data:`` payloads of a server-sent event stream, from its raw bytes.

    Events end at a newline only: generated text in a JSON payload can hold characters that
    ``str.splitlines`` (and so httpx's ``aiter_lines``) also take for line ends (U+0085, U+2028,
    U+2029), which would cut one event in two.
    """
    pending = b""
    async for chunk in chunks:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line.startswith(b"data:"):
                yield line[5:].strip().decode()
    if pending.startswith(b"data:"):
        yield pending[5:].strip().decode()  # a stream cut mid-event: the caller sees the partial payload


async def stream_outcome(chunks: AsyncIterator[bytes], on_event: Any = None) -> str:
    """How a streamed completion ended, from its bytes: ``completed``; ``failed_mid_stream`` (tokens,
    then an error event and ``[DONE]``); ``failed_before_streaming`` (an error event before any
    token); ``failed_unclean`` (no ``[DONE]``). ``on_event`` is called at each event."""
    done = error = False
    tokens = 0
    async for data in sse_data(chunks):
        if on_event is not None:
            on_event()
        if data == "[DONE]":
            done = True
        elif "error" in json.loads(data):
            error = True
        else:
            tokens += 1
    if not done:
        return "failed_unclean"
    if error:
        return "failed_mid_stream" if tokens else "failed_before_streaming"
    return "completed"


def _has_token(choice: dict[str, Any], chat: bool) -> bool:
    """Whether a chunk's choice carries output (chat servers open with a role-only delta)."""
    if not chat:
        return True
    delta = choice.get("delta") or {}
    return bool(delta.get("content")) or choice.get("finish_reason") is not None or (
        "content" in delta and "role" not in delta)


async def send_request(session: aiohttp.ClientSession, url: str, body: dict[str, Any], spec: RequestSpec,
                       run_start: float, chat: bool = False) -> RequestRecord:
    """Send one request and time it; never raises for a failed request (the record says why)."""
    start = time.perf_counter()
    rec = RequestRecord(spec.index, start - run_start, spec.input_len, spec.output_len)
    finished = False
    try:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                rec.error = f"http_{resp.status}"
                rec.error_message = (await resp.text())[:ERROR_MESSAGE_CHARS]
                rec.latency_s = time.perf_counter() - start
                return rec
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                now = time.perf_counter()
                if data == b"[DONE]":
                    finished = True
                    break
                event = json.loads(data)
                if "error" in event:
                    rec.error = "stream_error"
                    rec.error_message = json.dumps(event["error"])[:ERROR_MESSAGE_CHARS]
                    continue  # a well-behaved server still ends with [DONE]
                choices = event.get("choices")
                if choices and any(_has_token(c, chat) for c in choices):
                    rec.chunk_times_s.append(now - start)
                usage = event.get("usage")
                if usage:
                    rec.usage_reported = True
                    rec.prompt_tokens = usage.get("prompt_tokens")
                    rec.output_tokens = usage.get("completion_tokens")
                    rec.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    except asyncio.CancelledError:
        raise
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as e:
        rec.error = type(e).__name__
        rec.error_message = str(e)[:ERROR_MESSAGE_CHARS]
    end = time.perf_counter()
    rec.latency_s = end - start
    if rec.error is None:
        if not finished:
            rec.error, rec.error_message = "incomplete_stream", "the stream ended without data: [DONE]"
        elif not rec.chunk_times_s:
            rec.error, rec.error_message = "no_output", "the stream carried no output chunk"
    if rec.error is None:
        rec.ok = True
        rec.ttft_s = rec.chunk_times_s[0]
        if rec.output_tokens is None:
            rec.output_tokens = len(rec.chunk_times_s)
    return rec


def list_models(base_url: str, timeout_s: float = 10.0, api_key: str | None = None) -> list[dict[str, Any]]:
    """The server's ``GET /v1/models`` entries (vLLM and kvpilot include ``max_model_len``)."""
    req = urllib.request.Request(f"{base_url.rstrip('/')}/v1/models",
                                 headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        return json.load(r)["data"]
