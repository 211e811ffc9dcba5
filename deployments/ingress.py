"""The OpenAI-compatible front door: FastAPI under Ray Serve.

The request's ``model`` picks the model deployment. Every refusal is an
OpenAI-style error object with a 4xx status (503 when a model is overloaded or
unavailable); an engine failure mid-stream ends the stream with an error event
and ``data: [DONE]``.

Before a request reaches a replica, in this order: the API key (every ``/v1``
path, 401), the body size (413), the schema (400), the model (404), the key's
request rate (429 + ``Retry-After``), the prompt against the model's limits and
context (400), the model's bound on requests in flight (503 + ``Retry-After``),
the key's token rate (429). A replica that dies before a request's first token
(or, unstreamed, before its last) costs a resubmission to another replica, not
an error.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import logging
import math
import os
import time
import uuid
import weakref
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.exceptions import RayActorError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster import metrics as M
from cluster.config import IngressConfig, ModelConfig
from cluster.placement import SERVE_LOOP_ENV
from cluster.security import ANONYMOUS, KeyStore, RateLimiter, bearer_token, load_keys
from deployments.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
    GenerationRequest,
    logprobs_of,
    messages_of,
    sampling_of,
)
from deployments.telemetry import Recorder

logger = logging.getLogger("kvpilot.ingress")

HEALTH_PROBE_TIMEOUT_S = 2.0  # a replica that cannot answer a no-op this fast is not serving
QUEUE_PER_SEQ = 4  # default max_queued_requests per engine slot: a few batches' worth may wait
RETRY_BACKOFF_S = 0.2  # before resubmitting: Serve's router has dropped the dead replica by then
OVERLOADED_RETRY_AFTER_S = 1  # an overloaded model frees slots as fast as it finishes requests
ECHO_CHARS = 120  # longest piece of a client's input quoted back in an error message
NO_MODEL = "-"  # metric label when a request names no served model: client input never becomes a label
CLIENT_SCOPE_KEY = "kvpilot.client"  # the ASGI scope entry where the key gate leaves the client id

api = FastAPI(title="kvpilot", description="OpenAI-compatible API over Ray Serve and vLLM")


def _current_ingress() -> Ingress | None:
    """The Ingress instance of this replica (Serve's own way for class-based FastAPI views)."""
    try:
        ingress = serve.get_replica_context().servable_object
    except Exception:  # outside a replica
        return None
    return ingress if hasattr(ingress, "authenticate") else None  # None while the constructor runs


def _route_path(scope: dict[str, Any]) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


class _ApiKeyGate:
    """Pure ASGI middleware: every ``/v1`` path needs a valid key before any route runs.

    Pure ASGI rather than ``BaseHTTPMiddleware``: it neither buffers streamed responses nor
    hides a client's disconnect from the route.
    """

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            path = _route_path(scope)
            if path == "/v1" or path.startswith("/v1/"):
                ingress = _current_ingress()
                refusal = (ingress.authenticate(scope) if ingress is not None else
                           _Refused(503, "the server is starting", code="starting", kind="server_error").response())
                if refusal is not None:
                    await refusal(scope, receive, send)
                    return
        await self.app(scope, receive, send)


api.add_middleware(_ApiKeyGate)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown paths and methods get OpenAI-style errors too, not FastAPI's {"detail": ...}."""
    response = error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", None, None)
    ingress = _current_ingress()
    if ingress is not None:
        ingress.count(NO_MODEL, response.status_code, "unknown_route")
    return response


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


class _Refused(Exception):
    """A request the ingress answers itself with an OpenAI error; ``code`` is also the metric's kind."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code, self.kind, self.headers)


def _clip(text: str) -> str:
    return text if len(text) <= ECHO_CHARS else text[:ECHO_CHARS] + f"... ({len(text)} characters)"


def _echo(value: Any) -> str:
    return _clip(repr(value))


def _validation_error(e: ValidationError) -> _Refused:
    first = e.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = f"Unrecognized request argument supplied: {param}"
    elif first["type"] == "missing":
        msg = f"Missing required parameter: {param}"
    elif "input" in first:
        msg = f"Invalid value for {param}: {_echo(first['input'])}: {msg}"
    return _Refused(400, msg, param, first["type"])


def _retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def _replica_lost(e: BaseException) -> bool:
    """Did the request fail because its replica (actor or engine) died, not because of the request?"""
    seen = 0
    cur: BaseException | None = e
    while cur is not None and seen < 4:
        if isinstance(cur, RayActorError) or any(c.__name__ == "EngineDeadError" for c in type(cur).__mro__):
            return True
        cur = getattr(cur, "cause", None) or cur.__cause__
        seen += 1
    return False


def _engine_refusal(e: BaseException) -> str | None:
    """vLLM's message when it refused the request itself (``VLLMValidationError``), else None."""
    cur: BaseException | None = e
    for _ in range(4):
        if cur is None:
            return None
        if any(c.__name__ == "VLLMValidationError" for c in type(cur).__mro__):
            cause = getattr(cur, "cause", None)
            return str(cause if cause is not None else cur)
        cur = getattr(cur, "cause", None) or cur.__cause__
    return None


def _has_lone_surrogate(body: Any) -> bool:
    stack = [body]
    while stack:  # iterative: a body nested to JSON's limit would overflow a recursive walk
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


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


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


class _Admission:
    """One admitted request's claims: a slot of its model's in-flight bound and tokens of its key's budget.

    ``finish`` gives both back exactly once, whether the request completes, fails, or its stream
    is dropped unstarted (a finalizer on the response generator calls it then).
    """

    def __init__(self, ingress: Ingress, model: str, client: str, charged_tokens: int):
        self._ingress, self.model, self._client, self._charged = ingress, model, client, charged_tokens
        self._open = True
        self.attempts = 0  # submissions to a replica so far
        self.used_tokens = 0  # prompt + generated, once known: the rest of the charge is refunded

    def finish(self, used_tokens: int) -> bool:
        """Release the slot and refund unused tokens; True on the first call only."""
        if not self._open:
            return False
        self._open = False
        self._ingress._release(self.model, self._client, self._charged - used_tokens)
        return True


def _abandon(admission: _Admission, stream: Any) -> None:
    """Finalizer of a streamed response: the client left before (or while) it was sent."""
    if admission.finish(0):
        stream.cancel()


_ERROR_RESPONSES: dict[int, str] = {
    400: "Invalid request: malformed JSON, wrong types, unknown fields, limits exceeded",
    401: "Missing or invalid API key (when the endpoint has keys)",
    404: "Unknown model",
    413: "Request body larger than ingress.max_body_bytes",
    429: "Rate limit of the API key exceeded; see Retry-After",
    500: "The engine failed during generation",
    503: "Model overloaded (see Retry-After) or no replica available",
}
_GENERATION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The completion; server-sent events when `stream` is true",
          # Each server-sent event: `data: {chunk JSON}`, an error object, or `data: [DONE]` last.
          "content": {"text/event-stream": {"schema": {
              "type": "object", "required": ["data"],
              "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}}}},
    **{code: {"model": ErrorResponse, "description": d} for code, d in _ERROR_RESPONSES.items()},
}
_REQUEST_BODIES: dict[str, type[BaseModel]] = {
    "/v1/completions": CompletionRequest,
    "/v1/chat/completions": ChatCompletionRequest,
}


def _openapi_document(app: FastAPI, model_names: list[str], auth: bool) -> dict[str, Any]:
    """FastAPI's document plus the JSON request bodies (the routes read the raw request to keep
    OpenAI's 400 on malformed JSON), with ``model`` restricted to the served names."""
    app.openapi_schema = None
    doc = copy.deepcopy(app.openapi())
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for path, model in _REQUEST_BODIES.items():
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schema["properties"]["model"]["enum"] = list(model_names)
        schemas[model.__name__] = schema
        doc["paths"][path]["post"]["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
        }
    if auth:
        doc["components"]["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
        for path, ops in doc["paths"].items():
            if path.startswith("/v1/"):
                for op in ops.values():
                    op["security"] = [{"apiKey": []}]
    return doc


@serve.deployment(name="ingress", max_ongoing_requests=1000,
                  ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": SERVE_LOOP_ENV}})
@serve.ingress(api)
class Ingress:
    """Routes OpenAI requests to the model deployment their ``model`` names."""

    def __init__(self, handles: dict[str, Any], models: list[ModelConfig], ingress: IngressConfig | None = None):
        from transformers import AutoTokenizer

        self._cfg = ingress or IngressConfig()
        self._handles = {name: h.options(stream=True) for name, h in handles.items()}
        self._calls = handles  # unary calls: readiness probes
        self._max_model_len = {m.name: m.effective_max_model_len() for m in models}
        self._limits = {m.name: m.limits for m in models}
        self._queue_bound = {
            m.name: m.limits.max_queued_requests or QUEUE_PER_SEQ * m.max_num_seqs * max(1, m.max_replicas)
            for m in models
        }
        self._in_flight = {m.name: 0 for m in models}
        # Tokenize here, once: the router needs the prompt's blocks and the context limit is
        # enforced before any replica sees the request.
        self._tokenizers = {m.name: AutoTokenizer.from_pretrained(m.source) for m in models}
        self._created = int(time.time())
        self._keys = self._load_keys(self._cfg)
        self._limiter = RateLimiter(self._cfg.requests_per_minute, self._cfg.tokens_per_minute)
        self._metrics = Recorder()
        api.openapi_schema = _openapi_document(api, list(self._handles), self._keys is not None)
        logger.info("ingress: %s, %s", f"API keys required ({len(self._keys)} keys)" if self._keys else "no API keys",
                    "rate limits per key" if self._limiter.enabled else "no rate limits")

    @staticmethod
    def _load_keys(cfg: IngressConfig) -> KeyStore | None:
        """The accepted keys, or None when auth is off (``auto`` with no key configured is off)."""
        if cfg.auth == "off":
            return None
        keys = load_keys(cfg.api_keys_file, os.environ)  # the one place KVPILOT_API_KEYS is read
        if not keys:
            if cfg.auth == "required":
                raise ValueError("ingress.auth is required but no API key is configured: set KVPILOT_API_KEYS "
                                 "or ingress.api_keys_file")
            return None
        return keys

    # --- accounting ---------------------------------------------------------

    def count(self, model: str, status: int, error_kind: str | None = None) -> None:
        self._metrics.inc(M.INGRESS_REQUESTS, model=model, code=str(status))
        if error_kind is not None:
            self._metrics.inc(M.INGRESS_ERRORS, model=model, kind=error_kind)

    def _refuse(self, model: str, refused: _Refused) -> JSONResponse:
        self.count(model, refused.status, refused.code or refused.kind)
        return refused.response()

    def authenticate(self, scope: dict[str, Any]) -> JSONResponse | None:
        """Called by the key gate for every ``/v1`` request: None lets it through."""
        if self._keys is None:
            scope[CLIENT_SCOPE_KEY] = ANONYMOUS
            return None
        presented = bearer_token(Headers(scope=scope).get("authorization"))
        client = self._keys.verify(presented)
        if client is not None:
            scope[CLIENT_SCOPE_KEY] = client
            return None
        if presented is None:
            refused = _Refused(401, "You didn't provide an API key. Provide it in an Authorization header using "
                               "Bearer auth (Authorization: Bearer YOUR_KEY).", None, "missing_api_key",
                               headers={"WWW-Authenticate": "Bearer"})
        else:
            refused = _Refused(401, "Incorrect API key provided.", None, "invalid_api_key",
                               headers={"WWW-Authenticate": "Bearer"})
        return self._refuse(NO_MODEL, refused)

    def _admit(self, model: str, client: str, tokens: int) -> _Admission:
        """Claim a slot of the model's in-flight bound and the key's rate budget, or refuse."""
        bound = self._queue_bound[model]
        if self._in_flight[model] >= bound:
            raise _Refused(503, f"model {model} has {self._in_flight[model]} requests in flight, its limit "
                           f"(limits.max_queued_requests {bound}); retry later", None, "model_overloaded",
                           "server_error", _retry_after(OVERLOADED_RETRY_AFTER_S))
        capacity = self._limiter.token_capacity()
        if capacity is not None and tokens > capacity:
            raise _Refused(400, f"this request needs up to {tokens} tokens (prompt + n × max_tokens), more than "
                           f"the {capacity} tokens per minute of this API key; lower max_tokens or n",
                           "max_tokens", "exceeds_token_rate_limit")
        verdict = self._limiter.acquire(client, tokens)
        if not verdict.allowed:
            raise self._rate_limited(verdict.limit, verdict.retry_after_s)
        self._in_flight[model] += 1
        return _Admission(self, model, client, tokens)

    def _release(self, model: str, client: str, unused_tokens: int) -> None:
        self._in_flight[model] -= 1
        self._limiter.refund(client, unused_tokens)

    def _rate_limited(self, limit: str | None, wait_s: float) -> _Refused:
        per_minute = self._cfg.requests_per_minute if limit == "requests" else self._cfg.tokens_per_minute
        return _Refused(429, f"Rate limit reached for {limit} per minute: limit {per_minute}; retry in "
                        f"{max(1, math.ceil(wait_s))} s", None, "rate_limit_exceeded", headers=_retry_after(wait_s))

    # --- routes -------------------------------------------------------------

    @api.get("/health", responses={503: {"description": "A model has no replica that answers yet"}})
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

    @api.get("/v1/models", responses={401: {"model": ErrorResponse, "description": _ERROR_RESPONSES[401]}})
    async def list_models(self) -> dict[str, Any]:
        self.count(NO_MODEL, 200)
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": self._created, "owned_by": "kvpilot",
                 "max_model_len": self._max_model_len[name]}
                for name in self._handles
            ],
        }

    @api.post("/v1/completions", responses=_GENERATION_RESPONSES)
    async def completions(self, request: Request) -> Response:
        return await self._serve(request, CompletionRequest, chat=False)

    @api.post("/v1/chat/completions", responses=_GENERATION_RESPONSES)
    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, ChatCompletionRequest, chat=True)

    # --- serving ------------------------------------------------------------

    async def _json_body(self, request: Request) -> dict[str, Any]:
        limit = self._cfg.max_body_bytes
        too_large = _Refused(413, f"The request body exceeds the limit of {limit} bytes", None, "request_too_large")
        declared = request.headers.get("content-length", "").strip()
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():  # also bounds bodies sent without a Content-Length
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, nesting too deep
            raise _Refused(400, f"We could not parse the JSON body of your request: {type(e).__name__}: "
                           f"{str(e)[:200]}", None, "invalid_json") from None
        if not isinstance(body, dict):
            raise _Refused(400, "The request body must be a JSON object", None, "invalid_json")
        if _has_lone_surrogate(body):  # "\\ud800" parses, but no tokenizer (or UTF-8 encoder) accepts it
            raise _Refused(400, "The request body contains a lone UTF-16 surrogate (\\ud800-\\udfff) in a string",
                           None, "invalid_json")
        return body

    async def _serve(self, request: Request, schema: type, chat: bool) -> Response:
        client = request.scope.get(CLIENT_SCOPE_KEY, ANONYMOUS)
        model = NO_MODEL
        try:
            try:
                # Strict: JSON types as the OpenAPI document states them ("5" is no integer), as OpenAI does.
                req = schema.model_validate(await self._json_body(request), strict=True)
            except ValidationError as e:
                raise _validation_error(e) from None
            if req.model not in self._handles:
                raise _Refused(404, f"The model `{_clip(req.model)}` does not exist.", "model", "model_not_found")
            model = req.model
            early = self._limiter.check(client)  # the request rate, before spending time on tokenizing
            if not early.allowed:
                raise self._rate_limited(early.limit, early.retry_after_s)
            prompt_ids, max_tokens = self._tokenize(req, chat)
            admission = self._admit(model, client, len(prompt_ids) + req.n * max_tokens)
        except _Refused as e:
            return self._refuse(model, e)
        streaming = False
        try:
            response = await self._generate(req, chat, prompt_ids, max_tokens, admission)
            streaming = isinstance(response, StreamingResponse)
            return response
        finally:  # also when the client's disconnect cancels this task
            if not streaming:  # a stream's generator finishes its own admission
                admission.finish(admission.used_tokens)

    async def _generate(self, req: CompletionRequest | ChatCompletionRequest, chat: bool, prompt_ids: list[int],
                        max_tokens: int, admission: _Admission) -> Response:
        model = admission.model
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        gen_req = GenerationRequest(request_id, prompt_ids, max_tokens, logprobs_of(req), sampling_of(req))
        try:
            stream, first = await self._submit(gen_req, admission)
        except _Refused as e:  # waited too long for a first token
            return self._refuse(model, e)
        except Exception as e:  # the replicas failed before the engine answered
            refusal = _engine_refusal(e)
            if refusal is not None:  # a check of vLLM's that the schema does not repeat
                return self._refuse(model, _Refused(400, f"the engine refused the request: {_clip(refusal)}", None,
                                                    "engine_refused"))
            logger.exception("request %s failed at its replica", request_id)
            return self._refuse(model, _Refused(503, f"model {model} is unavailable: {type(e).__name__}", None,
                                                "model_unavailable", "server_error"))
        prompt_tokens = len(prompt_ids)
        admission.used_tokens = prompt_tokens
        meta = {"id": request_id, "created": int(time.time()), "model": model}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            events = self._stream(first, stream, meta, req.n, prompt_tokens, chat, include_usage, admission)
            weakref.finalize(events, _abandon, admission, stream)
            self.count(model, 200)
            return StreamingResponse(events, media_type="text/event-stream")
        try:
            acc, cached = await self._collect(first, stream, gen_req, admission, req.n)
        except _Refused as e:  # resubmitted after losing its replica, and no first token came in time
            return self._refuse(model, e)
        except Exception as e:
            logger.exception("request %s failed mid-generation", request_id)
            return self._refuse(model, _Refused(500, f"generation failed: {type(e).__name__}: {e}", None,
                                                "engine_error", "server_error"))
        admission.used_tokens = prompt_tokens + acc.completion_tokens
        usage = _usage(prompt_tokens, acc.completion_tokens, cached)
        self.count(model, 200)
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": acc.text[i]},
                        "logprobs": _chat_logprobs(acc.logprobs[i]), "finish_reason": acc.finish[i]}
                       for i in range(req.n)]
            return JSONResponse({**meta, "object": "chat.completion", "choices": choices, "usage": usage})
        choices = [{"index": i, "text": acc.text[i], "logprobs": _completion_logprobs(acc.logprobs[i], 0),
                    "finish_reason": acc.finish[i]} for i in range(req.n)]
        return JSONResponse({**meta, "object": "text_completion", "choices": choices, "usage": usage})

    async def _submit(self, gen_req: GenerationRequest, admission: _Admission) -> tuple[Any, dict[str, Any]]:
        """Send the request to a replica and wait for its first event; resubmit while replicas die."""
        timeout_s = self._limits[admission.model].first_token_timeout_s
        while True:
            attempt = admission.attempts
            admission.attempts += 1
            req = gen_req if attempt == 0 else dataclasses.replace(
                gen_req, request_id=f"{gen_req.request_id}-retry{attempt}")
            stream = self._handles[admission.model].generate.remote(req)
            try:
                # Bounded: at zero replicas Serve holds the request until one starts, however long that takes.
                return stream, await asyncio.wait_for(stream.__anext__(), timeout_s)
            except StopAsyncIteration:
                return stream, {"choices": []}
            except TimeoutError:
                stream.cancel()
                raise _Refused(503, f"model {admission.model} produced no first token within "
                               f"{timeout_s:g} s (no replica ready, or the queue is too long); "
                               "try again later", None, "first_token_timeout", "server_error",
                               _retry_after(OVERLOADED_RETRY_AFTER_S)) from None
            except Exception as e:
                if not _replica_lost(e) or attempt >= self._cfg.replica_retries:
                    raise
                self._metrics.inc(M.INGRESS_ERRORS, model=admission.model, kind="replica_lost_resubmitted")
                logger.warning("request %s: replica lost before the first token (%s); resubmitting",
                               gen_req.request_id, type(e).__name__)
                await asyncio.sleep(RETRY_BACKOFF_S)

    async def _collect(self, first: dict[str, Any], stream: Any, gen_req: GenerationRequest, admission: _Admission,
                       n: int) -> tuple[_Accumulator, int]:
        """An unstreamed request's whole output; nothing has reached the client, so a lost replica
        mid-generation costs a resubmission too."""
        while True:
            acc = _Accumulator(n)
            cached = first.get("cached_tokens", 0)
            for d in first["choices"]:
                acc.add(d)
            try:
                async for event in stream:
                    for d in event["choices"]:
                        acc.add(d)
                return acc, cached
            except Exception as e:
                if not _replica_lost(e) or admission.attempts > self._cfg.replica_retries:
                    raise
                self._metrics.inc(M.INGRESS_ERRORS, model=admission.model, kind="replica_lost_resubmitted")
                logger.warning("request %s: replica lost mid-generation (%s); resubmitting", gen_req.request_id,
                               type(e).__name__)
                await asyncio.sleep(RETRY_BACKOFF_S)
                stream, first = await self._submit(gen_req, admission)

    def _tokenize(self, req: CompletionRequest | ChatCompletionRequest, chat: bool) -> tuple[list[int], int]:
        """Prompt token ids and the output budget; refuses what the model's limits or context cannot hold."""
        tok = self._tokenizers[req.model]
        if chat:
            if not getattr(tok, "chat_template", None):
                raise _Refused(400, f"model {req.model} has no chat template", "messages", "no_chat_template")
            text = tok.apply_chat_template(messages_of(req), tokenize=False, add_generation_prompt=True)
            ids = tok.encode(text, add_special_tokens=False)
            asked = req.output_limit()
            param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        elif isinstance(req.prompt, str):
            ids = tok.encode(req.prompt)
            asked, param = req.max_tokens, "max_tokens"
        else:
            vocab = len(tok)
            bad = [t for t in req.prompt if not 0 <= t < vocab]
            if bad:
                raise _Refused(400, f"token id {bad[0]} is outside the vocabulary (size {vocab})", "prompt",
                               "invalid_token")
            ids, asked, param = list(req.prompt), req.max_tokens, "max_tokens"
        prompt_param = "messages" if chat else "prompt"
        limits = self._limits[req.model]
        if limits.max_prompt_tokens is not None and len(ids) > limits.max_prompt_tokens:
            raise _Refused(400, f"the prompt has {len(ids)} tokens; model {req.model} accepts at most "
                           f"{limits.max_prompt_tokens}", prompt_param, "prompt_too_long")
        if limits.max_tokens is not None and asked is not None and asked > limits.max_tokens:
            raise _Refused(400, f"{param} {asked} exceeds model {req.model}'s limit of {limits.max_tokens} output "
                           "tokens", param, "max_tokens_too_large")
        limit = self._max_model_len[req.model]
        room = limit - len(ids)
        if room <= 0 or (asked is not None and asked > room):
            more = f" + max_tokens {asked}" if asked is not None else ""
            raise _Refused(
                400, f"this model's maximum context length is {limit} tokens; the prompt has {len(ids)} tokens{more}",
                param if room > 0 else prompt_param, "context_length_exceeded")
        if asked is not None:
            return ids, asked
        return ids, min(room, limits.max_tokens or room)

    async def _stream(self, first: dict[str, Any], stream: Any, meta: dict[str, Any], n: int, prompt_tokens: int,
                      chat: bool, include_usage: bool, admission: _Admission) -> AsyncIterator[bytes]:
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
            self._metrics.inc(M.INGRESS_ERRORS, model=meta["model"], kind="stream_failed")
            logger.exception("stream %s failed mid-generation", meta["id"])
            yield _sse({"error": {"message": f"generation failed: {type(e).__name__}: {e}", "type": "server_error",
                                  "param": None, "code": "engine_error"}})
            yield _sse("[DONE]")
        finally:
            admission.finish(prompt_tokens + completion_tokens)
            if not finished:  # the client went away: cancel the replica's stream, which aborts the engine request
                stream.cancel()
