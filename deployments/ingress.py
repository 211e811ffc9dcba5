"""The OpenAI-compatible front door: FastAPI under Ray Serve.

The request's ``model`` picks the model deployment. Every refusal is an
OpenAI-style error object with a 4xx status; an engine failure mid-stream ends
the stream with an error event and ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.config import ModelConfig
from deployments.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    logprobs_of,
    messages_of,
    sampling_of,
)

logger = logging.getLogger("kvpilot.ingress")

HEALTH_PROBE_TIMEOUT_S = 2.0  # a replica that cannot answer a no-op this fast is not serving

api = FastAPI(title="kvpilot", description="OpenAI-compatible API over Ray Serve and vLLM")


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown paths and methods get OpenAI-style errors too, not FastAPI's {"detail": ...}."""
    return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", None, None)


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


def _validation_error(e: ValidationError) -> JSONResponse:
    first = e.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = f"Unrecognized request argument supplied: {param}"
    elif first["type"] == "missing":
        msg = f"Missing required parameter: {param}"
    elif "input" in first:
        msg = f"Invalid value for {param}: {first['input']!r}: {msg}"
    return error_response(400, msg, param, first["type"])


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


class _Accumulator:
    """Per-choice text, token counts and logprobs, gathered from the replica's deltas."""

    def __init__(self, n: int):
        self.text = [""] * n
        self.tokens = [0] * n
        self.finish: list[str | None] = [None] * n
        self.logprobs: list[dict[str, list] | None] = [None] * n

    def add(self, d: dict[str, Any]) -> None:
        i = d["index"]
        self.text[i] += d["text"]
        self.tokens[i] += d["num_tokens"]
        self.finish[i] = d["finish_reason"] or self.finish[i]
        if d["logprobs"] is not None:
            acc = self.logprobs[i] or {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            for key in ("tokens", "token_logprobs", "top_logprobs"):
                acc[key].extend(d["logprobs"][key])
            self.logprobs[i] = acc

    @property
    def completion_tokens(self) -> int:
        return sum(self.tokens)


def _completion_logprobs(lp: dict[str, Any] | None, offset: int) -> dict[str, Any] | None:
    if lp is None:
        return None
    offsets = []
    for tok in lp["tokens"]:
        offsets.append(offset)
        offset += len(tok)
    return {**lp, "text_offset": offsets}


def _chat_logprobs(lp: dict[str, Any] | None) -> dict[str, Any] | None:
    if lp is None:
        return None
    content = []
    for tok, tlp, tops in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        content.append({
            "token": tok, "logprob": tlp, "bytes": list(tok.encode()),
            "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in tops.items()],
        })
    return {"content": content}


class _Refused(Exception):
    def __init__(self, response: JSONResponse):
        self.response = response


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


@serve.deployment(name="ingress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress(api)
class Ingress:
    """Routes OpenAI requests to the model deployment their ``model`` names."""

    def __init__(self, handles: dict[str, Any], models: list[ModelConfig]):
        from transformers import AutoTokenizer

        self._handles = {name: h.options(stream=True) for name, h in handles.items()}
        self._calls = handles  # unary calls: readiness probes
        self._max_model_len = {m.name: m.effective_max_model_len() for m in models}
        # Tokenize here, once: the router needs the prompt's blocks and the context limit is
        # enforced before any replica sees the request.
        self._tokenizers = {m.name: AutoTokenizer.from_pretrained(m.source) for m in models}
        self._created = int(time.time())

    @api.get("/health")
    async def health(self) -> JSONResponse:
        """200 once every model has a replica that answers; 503 while any is still starting."""
        states = {}
        for name, handle in self._calls.items():
            call = handle.ready.remote()
            try:
                await asyncio.wait_for(asyncio.shield(call), timeout=HEALTH_PROBE_TIMEOUT_S)
                states[name] = "ready"
            except (asyncio.TimeoutError, Exception):
                call.cancel()
                states[name] = "unavailable"
        ok = all(v == "ready" for v in states.values())
        return JSONResponse({"status": "ok" if ok else "starting", "models": states}, status_code=200 if ok else 503)

    @api.get("/v1/models")
    async def list_models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": self._created, "owned_by": "kvpilot",
                 "max_model_len": self._max_model_len[name]}
                for name in self._handles
            ],
        }

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._serve(request, CompletionRequest, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, ChatCompletionRequest, chat=True)

    async def _serve(self, request: Request, schema: type, chat: bool) -> Response:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return error_response(400, f"We could not parse the JSON body of your request: {e}", None, "invalid_json")
        if not isinstance(body, dict):
            return error_response(400, "The request body must be a JSON object", None, "invalid_json")
        try:
            req = schema.model_validate(body)
        except ValidationError as e:
            return _validation_error(e)
        handle = self._handles.get(req.model)
        if handle is None:
            return error_response(404, f"The model `{req.model}` does not exist.", "model", "model_not_found")
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        try:
            prompt_ids, max_tokens = self._tokenize(req, chat)
        except _Refused as e:
            return e.response
        gen_req = GenerationRequest(request_id, prompt_ids, max_tokens, logprobs_of(req), sampling_of(req))
        stream = handle.generate.remote(gen_req)
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            first = {"choices": []}
        except Exception as e:  # the replica failed before the engine answered
            logger.exception("request %s failed at its replica", request_id)
            return error_response(503, f"model {req.model} is unavailable: {type(e).__name__}", None,
                                  "model_unavailable", "server_error")
        prompt_tokens = len(prompt_ids)
        meta = {"id": request_id, "created": int(time.time()), "model": req.model}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            events = self._stream(first, stream, meta, req.n, prompt_tokens, chat, include_usage)
            return StreamingResponse(events, media_type="text/event-stream")
        acc = _Accumulator(req.n)
        cached = first.get("cached_tokens", 0)
        for d in first["choices"]:
            acc.add(d)
        try:
            async for event in stream:
                for d in event["choices"]:
                    acc.add(d)
        except Exception as e:
            logger.exception("request %s failed mid-generation", request_id)
            return error_response(500, f"generation failed: {type(e).__name__}: {e}", None, "engine_error", "server_error")
        usage = _usage(prompt_tokens, acc.completion_tokens, cached)
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": acc.text[i]},
                        "logprobs": _chat_logprobs(acc.logprobs[i]), "finish_reason": acc.finish[i]}
                       for i in range(req.n)]
            return JSONResponse({**meta, "object": "chat.completion", "choices": choices, "usage": usage})
        choices = [{"index": i, "text": acc.text[i], "logprobs": _completion_logprobs(acc.logprobs[i], 0),
                    "finish_reason": acc.finish[i]} for i in range(req.n)]
        return JSONResponse({**meta, "object": "text_completion", "choices": choices, "usage": usage})

    def _tokenize(self, req: CompletionRequest | ChatCompletionRequest, chat: bool) -> tuple[list[int], int]:
        """Prompt token ids and the output budget; refuses what the model's context cannot hold."""
        tok = self._tokenizers[req.model]
        if chat:
            if not getattr(tok, "chat_template", None):
                raise _Refused(error_response(400, f"model {req.model} has no chat template", "messages",
                                              "no_chat_template"))
            text = tok.apply_chat_template(messages_of(req), tokenize=False, add_generation_prompt=True)
            ids = tok.encode(text, add_special_tokens=False)
            asked, param = req.output_limit(), "max_tokens"
        elif isinstance(req.prompt, str):
            ids = tok.encode(req.prompt)
            asked, param = req.max_tokens, "max_tokens"
        else:
            vocab = len(tok)
            bad = [t for t in req.prompt if not 0 <= t < vocab]
            if bad:
                raise _Refused(error_response(400, f"token id {bad[0]} is outside the vocabulary (size {vocab})",
                                              "prompt", "invalid_token"))
            ids, asked, param = list(req.prompt), req.max_tokens, "max_tokens"
        limit = self._max_model_len[req.model]
        room = limit - len(ids)
        if room <= 0 or (asked is not None and asked > room):
            more = f" + max_tokens {asked}" if asked is not None else ""
            raise _Refused(error_response(
                400, f"this model's maximum context length is {limit} tokens; the prompt has {len(ids)} tokens{more}",
                param if room > 0 else ("messages" if chat else "prompt"), "context_length_exceeded"))
        return ids, asked if asked is not None else room

    async def _stream(self, first: dict[str, Any], stream: Any, meta: dict[str, Any], n: int, prompt_tokens: int,
                      chat: bool, include_usage: bool) -> AsyncIterator[bytes]:
        obj = "chat.completion.chunk" if chat else "text_completion"
        completion_tokens = 0
        cached = first.get("cached_tokens", 0)
        offsets = [0] * n
        finished = False

        async def events() -> AsyncIterator[dict[str, Any]]:
            yield first
            async for event in stream:
                yield event

        try:
            if chat:  # OpenAI opens each choice with the assistant role
                yield _sse({**meta, "object": obj, "choices": [
                    {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                    for i in range(n)]})
            async for event in events():
                choices = []
                for d in event["choices"]:
                    completion_tokens += d["num_tokens"]
                    if chat:
                        choices.append({"index": d["index"], "delta": {"content": d["text"]},
                                        "logprobs": _chat_logprobs(d["logprobs"]), "finish_reason": d["finish_reason"]})
                    else:
                        choices.append({"index": d["index"], "text": d["text"],
                                        "logprobs": _completion_logprobs(d["logprobs"], offsets[d["index"]]),
                                        "finish_reason": d["finish_reason"]})
                    offsets[d["index"]] += len(d["text"])
                if choices:
                    yield _sse({**meta, "object": obj, "choices": choices})
            finished = True
            if include_usage:
                yield _sse({**meta, "object": obj, "choices": [],
                            "usage": _usage(prompt_tokens, completion_tokens, cached)})
            yield _sse("[DONE]")
        except Exception as e:
            finished = True
            logger.exception("stream %s failed mid-generation", meta["id"])
            yield _sse({"error": {"message": f"generation failed: {type(e).__name__}: {e}", "type": "server_error",
                                  "param": None, "code": "engine_error"}})
            yield _sse("[DONE]")
        finally:
            if not finished:  # the client went away: cancel the replica's stream, which aborts the engine request
                stream.cancel()
