"""The OpenAI-compatible front door: FastAPI under Ray Serve.

The request's ``model`` picks the model deployment; the replica answers with vLLM's
own OpenAI server code, and the ingress relays the response bytes as they come
(``deployments/vllm_frontend.py``). So requests are accepted, and refused, exactly
as ``vllm serve`` does; the ingress adds only what is kvpilot's own, before a replica
sees the request, in this order: the API key (every ``/v1`` path and the tokenize
endpoints, 401), the body size (413), a JSON object (400), the model (404), the
key's request rate (429 + ``Retry-After``), the prompt against the model's limits
and context (400), the model's bound on requests in flight (503 + ``Retry-After``),
the key's token rate (429). A replica that dies before a request's first byte
costs a resubmission to another replica, not an error.
"""

from __future__ import annotations

import asyncio
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
from ray import serve
from ray.exceptions import RayActorError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster import metrics
from cluster.config import IngressConfig, ModelConfig
from cluster.planning.hub import resolve_source
from cluster.serving.placement import ONGOING_PER_SLOT, SERVE_LOOP_ENV
from cluster.serving.security import ANONYMOUS, KeyStore, RateLimiter, bearer_token, load_keys
from deployments.protocol import FORWARDED_HEADERS, FORWARDED_ROUTES, LORA_ADMIN_ROUTES, HttpCall
from deployments.telemetry import Recorder, log_where_serve_logs

logger = logging.getLogger("kvpilot.ingress")

HEALTH_PROBE_TIMEOUT_S = 2.0  # a replica that cannot answer a no-op this fast is not serving
RETRY_BACKOFF_S = 0.2  # before resubmitting: Serve's router has dropped the dead replica by then
OVERLOADED_RETRY_AFTER_S = 1  # an overloaded model frees slots as fast as it finishes requests
ECHO_CHARS = 120  # longest piece of a client's input quoted back in an error message
NO_MODEL = "-"  # metric label when a request names no served model: client input never becomes a label
CLIENT_SCOPE_KEY = "kvpilot.client"  # the ASGI scope entry where the key gate leaves the client id
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # vLLM's (and OpenAI's) default for /v1/completions
KEYED_PATHS = ("/tokenize", "/detokenize")  # outside /v1, but they reach a replica: keys needed too

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
    """Pure ASGI middleware: every ``/v1`` path (and tokenize) needs a valid key before any route runs.

    Pure ASGI rather than ``BaseHTTPMiddleware``: it neither buffers streamed responses nor
    hides a client's disconnect from the route.
    """

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            path = _route_path(scope)
            if path == "/v1" or path.startswith("/v1/") or path in KEYED_PATHS:
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


def _retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def _replica_lost(e: BaseException) -> bool:
    """Did the request fail because its replica died (the process, or its engine, which ends it)?"""
    cur: BaseException | None = e
    for _ in range(4):
        if cur is None:
            return False
        if isinstance(cur, RayActorError):
            return True
        cur = getattr(cur, "cause", None) or cur.__cause__
    return False


def _has_lone_surrogate(body: Any) -> bool:
    return _unsafe_value(body) == "surrogate"


INT64 = 2**63


def _unsafe_value(body: Any) -> str | None:
    """"surrogate" for a lone UTF-16 surrogate anywhere in the body, "integer" for an integer beyond
    64 bits: both parse as JSON, and vLLM answers either with a 500 (OverflowError, UnicodeEncodeError)."""
    stack = [body]
    while stack:  # iterative: a body nested to JSON's limit would overflow a recursive walk
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return "surrogate"
        elif isinstance(item, int) and not -INT64 <= item < INT64:
            return "integer"
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None



def _output_budget(path: str, body: dict[str, Any]) -> tuple[int | None, str]:
    """The output tokens a request asks for (None: it does not say) and the field that says it."""
    fields = {"/v1/chat/completions": ("max_completion_tokens", "max_tokens"), "/v1/responses": ("max_output_tokens",)}
    for name in fields.get(path, ("max_tokens",)):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value, name
    return None, fields.get(path, ("max_tokens",))[-1]


def _text_content(content: Any) -> Any:
    """A message's content as the chat template sees it: text parts joined (vLLM's renderer does the same)."""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return content


_SKIP_HEADERS = frozenset({b"content-length", b"transfer-encoding", b"connection"})


def _response_headers(head: list[tuple[bytes, bytes]]) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in head if k.lower() not in _SKIP_HEADERS}


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
    400: "Invalid request: vLLM's validation, or the prompt beyond the model's limits or context",
    401: "Missing or invalid API key (when the endpoint has keys)",
    404: "Unknown model or route",
    408: "Request body not received within ingress.body_timeout_s",
    413: "Request body larger than ingress.max_body_bytes",
    429: "Rate limit of the API key exceeded; see Retry-After",
    503: "Model overloaded (see Retry-After) or no replica available",
}
_ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "integer", "null"]}}}}}
_GENERATION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "vLLM's answer; server-sent events when `stream` is true",
          "content": {"application/json": {}, "text/event-stream": {}}},
    **{code: {"description": d, "content": {"application/json": {"schema": _ERROR_SCHEMA}}}
       for code, d in _ERROR_RESPONSES.items()},
}

_ADMIN_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "vLLM's answer (text)", "content": {"text/plain": {}}},
    **{code: {"description": d, "content": {"application/json": {"schema": _ERROR_SCHEMA}}}
       for code, d in {**_ERROR_RESPONSES, 403: "Not an admin API key", 404: "No such adapter"}.items()},
}


def _request_schemas() -> dict[str, type]:
    """vLLM's own request models for the forwarded routes (the OpenAPI document's bodies, which
    clients and the fuzz tests generate from)."""
    from vllm.entrypoints.anthropic.protocol import AnthropicCountTokensRequest, AnthropicMessagesRequest
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
    from vllm.entrypoints.pooling.embed.protocol import EmbeddingCompletionRequest
    from vllm.entrypoints.serve.tokenize.protocol import DetokenizeRequest, TokenizeCompletionRequest

    return {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest,
            "/v1/responses": ResponsesRequest, "/v1/embeddings": EmbeddingCompletionRequest,
            "/v1/messages": AnthropicMessagesRequest, "/v1/messages/count_tokens": AnthropicCountTokensRequest,
            "/tokenize": TokenizeCompletionRequest, "/detokenize": DetokenizeRequest}


def _admin_schemas() -> dict[str, type]:
    """vLLM's request models for adapter management; ``model`` (the base) is optional there."""
    from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest

    return {"/v1/load_lora_adapter": LoadLoRAAdapterRequest, "/v1/unload_lora_adapter": UnloadLoRAAdapterRequest}


def _openapi_document(app: FastAPI, model_names: list[str], auth: bool) -> dict[str, Any]:
    """FastAPI's document plus vLLM's JSON request bodies (the routes read the raw request and pass
    it on as bytes), with ``model`` restricted to the served names."""
    import copy

    app.openapi_schema = None
    doc = copy.deepcopy(app.openapi())
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    admin = _admin_schemas()
    for path, model in {**_request_schemas(), **admin}.items():
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schema["properties"]["model"] = {"type": "string", "enum": list(model_names)}
        schema.setdefault("required", [])
        if "model" not in schema["required"] and path not in admin:
            schema["required"].append("model")
        schemas[model.__name__] = schema
        doc["paths"][path]["post"]["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
        }
    if auth:
        doc["components"]["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
        for path, ops in doc["paths"].items():
            if path.startswith("/v1/") or path in KEYED_PATHS:
                for op in ops.values():
                    op["security"] = [{"apiKey": []}]
    return doc


_GENERATING = ("/v1/chat/completions", "/v1/completions")
_NO_OUTPUT = ("/tokenize", "/detokenize", "/v1/embeddings", "/v1/messages/count_tokens")


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, nesting too deep
        raise _Refused(400, f"We could not parse the JSON body of your request: {type(e).__name__}: "
                       f"{str(e)[:200]}", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise _Refused(400, "The request body must be a JSON object", None, "invalid_json")
    unsafe = _unsafe_value(body)
    if unsafe == "surrogate":  # "\\ud800" parses, but no tokenizer (or UTF-8 encoder) accepts it
        raise _Refused(400, "The request body contains a lone UTF-16 surrogate (\\ud800-\\udfff) in a string",
                       None, "invalid_json")
    if unsafe == "integer":
        raise _Refused(400, "The request body contains an integer outside the 64-bit range", None, "invalid_json")
    for field in _OBJECT_FIELDS:
        if body.get(field) is not None and not isinstance(body[field], dict):
            raise _Refused(400, f"{field} must be an object, not {type(body[field]).__name__} "
                           f"{_clip(json.dumps(body[field]))}", field, "invalid_type")
    return body


# Fields vLLM 0.32 reads as objects in a before-validator, so another type is a 500 there
# (ChatCompletionRequest.check_structured_outputs_count: 'bool' object has no attribute 'get').
_OBJECT_FIELDS = ("structured_outputs",)


# The strings pydantic's lax mode reads as False for a bool field
_FALSE_WORDS = ("false", "0", "no", "off", "f", "n")


def _check_no_prompt_logprobs(path: str, body: dict[str, Any], model: str) -> None:
    """Refuse prompt logprobs, in any of the ways vLLM asks for them, for a model that cannot serve them
    (``ModelConfig.serves_prompt_logprobs``)."""
    # vLLM turns echo into prompt logprobs: on completions with logprobs (default None); on chat
    # always, as top_logprobs (default 0, and a null there becomes 0 too)
    echo = body.get("echo")
    echoed = echo not in (None, False, 0) and not (isinstance(echo, str) and echo.lower() in _FALSE_WORDS)
    if path == "/v1/completions":
        echoed = echoed and body.get("logprobs") is not None
    if body.get("prompt_logprobs") is not None or echoed:
        raise _Refused(400, f"model {model} (LoRA on the CPU engine) does not serve prompt logprobs "
                       "(prompt_logprobs, echo with logprobs on completions, or echo on chat): "
                       "vLLM 0.32 fails computing them", "prompt_logprobs", "unsupported_parameter")


def _check_responses_input(body: dict[str, Any]) -> None:
    """vLLM 0.32 reads ``content[0].text`` of a Responses input item that is an assistant's output
    message, so an empty content list was a 500 ("list index out of range") and a refusal part first
    was one too ("'ResponseOutputRefusal' object has no attribute 'text'"): both fuzz finds."""
    items = body.get("input")
    for i, item in enumerate(items if isinstance(items, list) else ()):
        if not (isinstance(item, dict) and item.get("type") == "message" and item.get("role") == "assistant"):
            continue
        content = item.get("content")
        if content == []:
            raise _Refused(400, f"input[{i}].content is empty: a message needs at least one content part",
                           f"input[{i}].content", "invalid_value")
        if isinstance(content, list) and isinstance(content[0], dict) and content[0].get("type") == "refusal":
            raise _Refused(400, f"input[{i}].content[0] is a refusal: vLLM 0.32 reads an assistant message's text "
                           "from its first part, so put an output_text part first", f"input[{i}].content[0]",
                           "invalid_value")


def _as_openai_error(status: int, body: bytes, path: str) -> bytes | None:
    """An error answer that is not an OpenAI error object, rewritten as one (None: leave it).

    vLLM's app answers a route its model does not serve (``/v1/embeddings`` on a generative
    model) with FastAPI's ``{"detail": "Not Found"}``; clients parse ``error``. The Anthropic
    routes keep Anthropic's error format.
    """
    if status < 400 or path.startswith("/v1/messages"):
        return None
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        return None
    detail = parsed.get("detail") if isinstance(parsed, dict) else None
    message = f"{path}: {detail if isinstance(detail, str) else _clip(body.decode(errors='replace')) or status}"
    if status == 404 and detail == "Not Found":
        message = f"{path} is not served by this model (vLLM has no such route for its task)"
    kind = "invalid_request_error" if status < 500 else "server_error"
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": str(status)}}).encode()


def _template_text(template: str | None) -> str | None:
    """A configured chat template's text (the config holds a file path or the template itself)."""
    if template is None:
        return None
    from pathlib import Path

    path = Path(template)
    return path.read_text() if path.is_file() else template


@serve.deployment(name="ingress", max_ongoing_requests=1000,
                  ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": SERVE_LOOP_ENV}})
@serve.ingress(api)
class Ingress:
    """Routes OpenAI requests to the model deployment their ``model`` names and relays the answer."""

    def __init__(self, handles: dict[str, Any], models: list[ModelConfig], ingress: IngressConfig | None = None):
        from transformers import AutoTokenizer

        log_where_serve_logs()
        self._cfg = ingress or IngressConfig()
        self._handles = {name: h.options(stream=True) for name, h in handles.items()}
        self._calls = handles  # unary calls: readiness probes
        self._probes: dict[str, asyncio.Future] = {}  # the readiness probe in flight per model, never cancelled
        self._starting_since: dict[str, float] = {}  # models reported as starting, since when
        self._max_model_len = {m.name: m.effective_max_model_len() for m in models}
        self._limits = {m.name: m.limits for m in models}
        self._max_num_seqs = {m.name: m.max_num_seqs for m in models}
        self._no_prompt_logprobs = {m.name for m in models if not m.serves_prompt_logprobs}
        self._queue_bound = {
            m.name: m.limits.max_queued_requests or ONGOING_PER_SLOT * m.max_num_seqs * max(1, m.max_replicas)
            for m in models
        }
        self._in_flight = {m.name: 0 for m in models}
        # Tokenize here, once: the router needs the prompt's blocks and the context limit is
        # enforced before any replica sees the request.
        # A hub id resolves to a snapshot of its tokenizer files (cluster.planning.hub), never the weights.
        self._tokenizers = {m.name: AutoTokenizer.from_pretrained(resolve_source(m.source, m.revision)) for m in models}
        self._templates = {m.name: _template_text(m.openai.chat_template) for m in models}
        self._default_model = models[0].name if len(models) == 1 else None
        self._created = int(time.time())
        self._keys = self._load_keys(self._cfg)
        # LoRA adapters: a request's `model` may name one; it goes to its base model's deployment.
        self._models = {m.name: m for m in models}
        self._adapters: dict[str, tuple[str, str]] = {  # adapter -> (base model, directory)
            a: (m.name, path) for m in models for a, path in m.adapter_paths().items()}
        self._limiter = RateLimiter(self._cfg.requests_per_minute, self._cfg.tokens_per_minute)
        self._metrics = Recorder()
        self.resubmitted = 0  # requests sent again after their replica died before answering
        api.openapi_schema = _openapi_document(api, list(self._handles), self._keys is not None)
        logger.info("ingress: %s, %s", f"API keys required ({len(self._keys)} keys)" if self._keys else "no API keys",
                    "rate limits per key" if self._limiter.enabled else "no rate limits")

    @staticmethod
    def _load_keys(cfg: IngressConfig) -> KeyStore | None:
        """The accepted keys, or None when auth is off (``auto`` with no key configured is off)."""
        if cfg.auth == "off":
            return None
        keys = load_keys(cfg.api_keys_file, os.environ, cfg.admin_api_keys_file)  # the one place the key env vars are read
        if not keys:
            if cfg.auth == "required":
                raise ValueError("ingress.auth is required but no API key is configured: set KVPILOT_API_KEYS "
                                 "or ingress.api_keys_file")
            return None
        return keys

    # --- accounting ---------------------------------------------------------

    def count(self, model: str, status: int, error_kind: str | None = None) -> None:
        self._metrics.inc(metrics.INGRESS_REQUESTS, model=model, code=str(status))
        if error_kind is not None:
            self._metrics.inc(metrics.INGRESS_ERRORS, model=model, kind=error_kind)

    def _refuse(self, model: str, refused: _Refused) -> JSONResponse:
        self.count(model, refused.status, refused.code or refused.kind)
        return refused.response()

    def authenticate(self, scope: dict[str, Any]) -> JSONResponse | None:
        """Called by the key gate for every keyed request: None lets it through.

        The key comes as OpenAI clients send it (``Authorization: Bearer``) or as Anthropic's do
        (``x-api-key``).
        """
        if self._keys is None:
            scope[CLIENT_SCOPE_KEY] = ANONYMOUS
            return None
        headers = Headers(scope=scope)
        presented = bearer_token(headers.get("authorization")) or headers.get("x-api-key") or None
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
        states = dict(zip(self._calls, await asyncio.gather(*(self._probe(name) for name in self._calls))))
        ok = all(v == "ready" for v in states.values())
        return JSONResponse({"status": "ok" if ok else "starting", "models": states}, status_code=200 if ok else 503)

    async def _probe(self, name: str) -> str:
        """``ready`` or ``unavailable``: one no-op call per model at a time, waited for up to the probe timeout.

        A model that is loading has no replica to take the call, so the call waits in Serve's
        queue; it is left there (not cancelled) for the next probe to find answered, and a
        starting model logs one line, not a cancelled call's traceback on every probe.
        """
        probe = self._probes.get(name)
        if probe is None:
            probe = self._probes[name] = asyncio.ensure_future(self._calls[name].ready.remote())
        done, _ = await asyncio.wait({probe}, timeout=HEALTH_PROBE_TIMEOUT_S)
        if not done:
            if name not in self._starting_since:
                self._starting_since[name] = time.monotonic()
                logger.info("model %s: no replica answers yet (starting, or all replicas busy or gone)", name)
            return "unavailable"
        if self._probes.get(name) is probe:
            del self._probes[name]  # the next probe asks again: a ready replica can die
        error = probe.exception()
        if error is not None:
            logger.warning("model %s: readiness probe failed: %s", name, f"{type(error).__name__}: {error}"[:300])
            self._starting_since.setdefault(name, time.monotonic())
            return "unavailable"
        since = self._starting_since.pop(name, None)
        if since is not None:
            logger.info("model %s: a replica answers (%.0f s after the first probe that found none)", name,
                        time.monotonic() - since)
        return "ready"

    @api.get("/v1/models", responses={401: {"description": _ERROR_RESPONSES[401]}})
    async def list_models(self) -> dict[str, Any]:
        self.count(NO_MODEL, 200)
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": self._created, "owned_by": "kvpilot",
                 "root": name, "parent": None, "max_model_len": self._max_model_len[name]}
                for name in self._handles
            ] + [
                {"id": name, "object": "model", "created": self._created, "owned_by": "kvpilot",
                 "root": path, "parent": base, "max_model_len": self._max_model_len[base]}
                for name, (base, path) in self._adapters.items()
            ],
        }

    @api.get("/ingress/stats", include_in_schema=False)
    async def ingress_stats(self) -> dict[str, Any]:
        """What this ingress did so far that no metric label carries (tests read it)."""
        return {"resubmitted": self.resubmitted, "in_flight": dict(self._in_flight)}

    async def forward(self, request: Request) -> Response:
        """Every OpenAI route of ``FORWARDED_ROUTES``: checked here, answered by the model's replica."""
        client = request.scope.get(CLIENT_SCOPE_KEY, ANONYMOUS)
        path = _route_path(request.scope)
        model = NO_MODEL
        try:
            raw = await self._read_body(request)
            body = _json_object(raw)
            if path == "/v1/responses":
                _check_responses_input(body)
            model = self._model_of(body)
            if model in self._no_prompt_logprobs and path in _GENERATING:  # the two routes that read these fields
                _check_no_prompt_logprobs(path, body, model)
            early = self._limiter.check(client)  # the request rate, before spending time on tokenizing
            if not early.allowed:
                raise self._rate_limited(early.limit, early.retry_after_s)
            prompt_ids, budget, raw = self._check_prompt(path, body, model, raw)
            n = body.get("n") if type(body.get("n")) is int and body["n"] > 0 else 1
            if n > self._max_num_seqs[model]:  # each choice is a sequence the engine batches at once
                raise _Refused(400, f"n {n} exceeds model {model}'s max_num_seqs {self._max_num_seqs[model]}: each "
                               "choice takes an engine slot", "n", "n_exceeds_max_num_seqs")
            admission = self._admit(model, client, len(prompt_ids) + n * budget)
        except _Refused as e:
            return self._refuse(model, e)
        adapter = self._adapters.get(body.get("model")) if isinstance(body.get("model"), str) else None
        call = HttpCall(request.method, path, request.scope.get("query_string", b""),
                        [(k, v) for k, v in request.scope["headers"] if k in FORWARDED_HEADERS], raw,
                        uuid.uuid4().hex, prompt_ids, budget,
                        adapter=body["model"] if adapter else None, adapter_path=adapter[1] if adapter else None)
        streaming = False
        try:
            response = await self._relay(call, admission)
            streaming = isinstance(response, StreamingResponse)
            return response
        finally:  # also when the client's disconnect cancels this task
            if not streaming:  # a stream's generator finishes its own admission
                admission.finish(admission.used_tokens)

    for _path in FORWARDED_ROUTES:
        forward = api.post(_path, responses=_GENERATION_RESPONSES)(forward)
    del _path

    # --- LoRA adapters at run time (admin keys only) ---------------------------

    async def lora_admin(self, request: Request) -> Response:
        """vLLM's ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``, for the whole model.

        The adapter is checked against its base (``cluster.planning.lora``), then loaded by one replica with
        vLLM's own route (which validates it in the engine); once loaded, the ingress routes the
        name to the base's deployment and sends its path with every request, so every replica,
        including one started later, registers it on first use. Body: vLLM's (``lora_name``,
        ``lora_path``), plus ``model`` (the base) when more than one model takes adapters.
        """
        client = request.scope.get(CLIENT_SCOPE_KEY, ANONYMOUS)
        path = _route_path(request.scope)
        try:
            if self._keys is None or not self._keys.is_admin(client):
                raise _Refused(403, f"{path} needs an admin API key (ingress.admin_api_keys_file or "
                               "KVPILOT_ADMIN_API_KEYS)", None, "admin_key_required")
            body = _json_object(await self._read_body(request))
            name = body.get("lora_name")
            if not isinstance(name, str) or not name:
                raise _Refused(400, "lora_name must name the adapter", "lora_name", "missing")
            if path.endswith("/unload_lora_adapter"):
                return await self._unload_adapter(name)
            return await self._load_adapter(name, body)
        except _Refused as e:
            return self._refuse(NO_MODEL, e)

    for _path in LORA_ADMIN_ROUTES:
        lora_admin = api.post(_path, responses=_ADMIN_RESPONSES)(lora_admin)
    del _path

    def _lora_base(self, body: dict[str, Any]) -> str:
        takers = [n for n, m in self._models.items() if m.lora is not None]
        base = body.get("model", takers[0] if len(takers) == 1 else None)
        if not takers:
            raise _Refused(400, "no model serves LoRA adapters (a model needs a lora: section)", "model",
                           "lora_not_enabled")
        if base not in takers:
            raise _Refused(400, f"model {_echo(base)} must name the base model, one of {', '.join(takers)}",
                           "model", "invalid_base_model")
        return base

    async def _load_adapter(self, name: str, body: dict[str, Any]) -> Response:
        from cluster.planning.hub import HubError, resolve_adapter
        from cluster.planning.lora import AdapterError, check_adapter

        base = self._lora_base(body)
        if name in self._handles or (name in self._adapters and not body.get("load_inplace")):
            raise _Refused(400, f"the name {name!r} is already served; unload it first", "lora_name", "name_taken")
        source = body.get("lora_path")
        if not isinstance(source, str) or not source:
            raise _Refused(400, "lora_path must be the adapter's directory or hub id", "lora_path", "missing")
        cfg = self._models[base]
        try:
            directory, adapter_cfg = await asyncio.to_thread(resolve_adapter, source)
            check_adapter(name, source, directory, adapter_cfg, cfg.spec(), cfg.lora.max_lora_rank)
        except (AdapterError, HubError) as e:
            raise _Refused(400, f"adapter {name!r} ({_clip(source)}) {e}", "lora_path", "invalid_adapter") from None
        raw = json.dumps({"lora_name": name, "lora_path": directory,
                          "load_inplace": bool(body.get("load_inplace"))}).encode()
        status, answer = await self._replica_call(base, "/v1/load_lora_adapter", raw)
        if status == 200:
            self._adapters[name] = (base, directory)
            logger.info("adapter %s loaded on model %s from %s", name, base, directory)
        return Response(answer, status_code=status,
                        media_type="application/json" if answer.startswith(b"{") else "text/plain")

    async def _unload_adapter(self, name: str) -> Response:
        if name not in self._adapters:
            raise _Refused(404, f"The lora adapter '{_clip(name)}' cannot be found.", "lora_name", "adapter_not_found")
        base, _ = self._adapters.pop(name)
        # The replica that answers forgets it; the others keep its registration, unreachable from here.
        status, answer = await self._replica_call(base, "/v1/unload_lora_adapter",
                                                  json.dumps({"lora_name": name}).encode())
        logger.info("adapter %s unloaded from model %s (replica answered %d)", name, base, status)
        return Response(f"Success: LoRA adapter '{name}' removed successfully.", status_code=200,
                        media_type="text/plain")

    async def _replica_call(self, model: str, path: str, raw: bytes) -> tuple[int, bytes]:
        call = HttpCall("POST", path, b"", [(b"content-type", b"application/json")], raw, uuid.uuid4().hex, [], 0)
        stream = self._handles[model].serve_http.remote(call)
        status, chunks = 500, []
        async for item in stream:
            if type(item) is bytes:
                chunks.append(item)
            elif "status" in item:
                status = item["status"]
                chunks.append(item["body"])
        return status, b"".join(chunks)

    # --- serving ------------------------------------------------------------

    async def _read_body(self, request: Request) -> bytes:
        limit = self._cfg.max_body_bytes
        too_large = _Refused(413, f"The request body exceeds the limit of {limit} bytes", None, "request_too_large")
        declared = request.headers.get("content-length", "").strip()
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self._cfg.body_timeout_s):  # a client trickling its body holds nothing long
                async for chunk in request.stream():  # also bounds bodies sent without a Content-Length
                    size += len(chunk)
                    if size > limit:
                        raise too_large
                    chunks.append(chunk)
        except TimeoutError:
            raise _Refused(408, f"The request body did not arrive within ingress.body_timeout_s "
                           f"({self._cfg.body_timeout_s:g} s)", None, "request_timeout") from None
        return b"".join(chunks)

    def _model_of(self, body: dict[str, Any]) -> str:
        model = body.get("model", self._default_model)
        if model is None:
            raise _Refused(400, f"Missing required parameter: model (one of {', '.join(self._handles)})", "model",
                           "missing")
        if isinstance(model, str) and model in self._adapters:
            return self._adapters[model][0]  # the base model's deployment serves its adapters
        if not isinstance(model, str) or model not in self._handles:
            raise _Refused(404, f"The model `{_clip(str(model))}` does not exist.", "model", "model_not_found")
        return model

    def _prompt_ids(self, path: str, body: dict[str, Any], model: str) -> list[int] | None:
        """The prompt's token ids as the replica will see them, for routing and the context check;
        None when this request's prompt is not one the ingress renders (vLLM checks it then)."""
        tok = self._tokenizers[model]
        try:
            if path == "/v1/chat/completions":
                messages = body.get("messages")
                if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                    return None
                plain = [{**m, "content": _text_content(m.get("content"))} for m in messages]
                tools = body.get("tools") if isinstance(body.get("tools"), list) else None
                template = self._templates[model] or getattr(tok, "chat_template", None)
                if not template:
                    return None
                text = tok.apply_chat_template(plain, tools=tools, chat_template=template, tokenize=False,
                                               add_generation_prompt=True)
                return tok.encode(text, add_special_tokens=False)
            if path == "/v1/completions":
                prompt = body.get("prompt")
                if isinstance(prompt, str):
                    return tok.encode(prompt)
                if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
                    return prompt
        except Exception:  # a body the tokenizer cannot take: vLLM's validation answers it
            return None
        return None

    def _check_prompt(self, path: str, body: dict[str, Any], model: str, raw: bytes) -> tuple[list[int], int, bytes]:
        """Prompt ids, the output budget, and the body to send; refuses what the model's limits or context
        cannot hold. The body changes only when the model's ``limits.max_tokens`` supplies a missing budget."""
        limits, limit = self._limits[model], self._max_model_len[model]
        ids = self._prompt_ids(path, body, model)
        asked, param = _output_budget(path, body)
        prompt_param = {"/v1/chat/completions": "messages", "/v1/completions": "prompt"}.get(path, "input")
        if ids is not None and limits.max_prompt_tokens is not None and len(ids) > limits.max_prompt_tokens:
            raise _Refused(400, f"the prompt has {len(ids)} tokens; model {model} accepts at most "
                           f"{limits.max_prompt_tokens}", prompt_param, "prompt_too_long")
        if limits.max_tokens is not None and asked is not None and asked > limits.max_tokens:
            raise _Refused(400, f"{param} {asked} exceeds model {model}'s limit of {limits.max_tokens} output "
                           "tokens", param, "max_tokens_too_large")
        room = limit - len(ids) if ids is not None else limit
        if ids is not None and (room <= 0 or (asked is not None and asked > room)):
            more = f" + {param} {asked}" if asked is not None else ""
            raise _Refused(
                400, f"this model's maximum context length is {limit} tokens; the prompt has {len(ids)} tokens{more}",
                param if room > 0 else prompt_param, "context_length_exceeded")
        if asked is None and limits.max_tokens is not None and path in _GENERATING and ids is not None:
            asked = min(room, limits.max_tokens)
            raw = json.dumps({**body, param: asked}).encode()
        if path in _NO_OUTPUT:  # the engine generates nothing for these: nothing to charge or route by
            asked = 0
        elif asked is None:
            asked = COMPLETIONS_DEFAULT_MAX_TOKENS if path == "/v1/completions" else max(room, 0)
        return ids or [], max(asked, 0), raw

    async def _relay(self, call: HttpCall, admission: _Admission) -> Response:
        model = admission.model
        try:
            stream, first = await self._submit(call, admission)
        except _Refused as e:  # waited too long for a first token
            return self._refuse(model, e)
        except Exception as e:  # the replicas failed before answering
            logger.exception("request %s failed at its replica", call.request_id)
            return self._refuse(model, _Refused(503, f"model {model} is unavailable: {type(e).__name__}", None,
                                                "model_unavailable", "server_error"))
        self.count(model, first["status"], None if first["status"] < 400 else "engine_refused")
        headers = _response_headers(first["headers"])
        if first["more"]:
            body = self._stream(first["body"], stream, call, admission)
            weakref.finalize(body, _abandon, admission, stream)
            return StreamingResponse(body, status_code=first["status"], headers=headers)
        try:  # the usage trailer: what the engine generated, for the token budget
            trailer = await asyncio.wait_for(stream.__anext__(), HEALTH_PROBE_TIMEOUT_S)
            usage = trailer.get("usage", {})
            admission.used_tokens = usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0)
        except Exception:  # no trailer: keep the whole charge
            admission.used_tokens = admission._charged
        rewritten = _as_openai_error(first["status"], first["body"], call.path)
        if rewritten is not None:
            headers = {k: v for k, v in headers.items() if k.lower() not in ("content-length", "content-type")}
            return Response(rewritten, status_code=first["status"], headers=headers, media_type="application/json")
        return Response(first["body"], status_code=first["status"], headers=headers)

    async def _submit(self, call: HttpCall, admission: _Admission) -> tuple[Any, dict[str, Any]]:
        """Send the request to a replica and wait for its first bytes; resubmit while replicas die."""
        timeout_s = self._limits[admission.model].first_token_timeout_s
        while True:
            attempt = admission.attempts
            admission.attempts += 1
            stream = self._handles[admission.model].serve_http.remote(call)
            try:
                # Bounded: at zero replicas Serve holds the request until one starts, however long that takes.
                return stream, await asyncio.wait_for(stream.__anext__(), timeout_s)
            except TimeoutError:
                stream.cancel()
                raise _Refused(503, f"model {admission.model} produced no first token within "
                               f"{timeout_s:g} s (no replica ready, or the queue is too long); "
                               "try again later", None, "first_token_timeout", "server_error",
                               _retry_after(OVERLOADED_RETRY_AFTER_S)) from None
            except Exception as e:
                if not _replica_lost(e) or attempt >= self._cfg.replica_retries:
                    raise
                self.resubmitted += 1
                self._metrics.inc(metrics.INGRESS_ERRORS, model=admission.model, kind="replica_lost_resubmitted")
                logger.warning("request %s: replica lost before the first token (%s); resubmitting",
                               call.request_id, type(e).__name__)
                await asyncio.sleep(RETRY_BACKOFF_S)

    async def _stream(self, first: bytes, stream: Any, call: HttpCall, admission: _Admission) -> AsyncIterator[bytes]:
        """The response bytes as the replica sends them; nothing here parses a token."""
        used = admission._charged
        finished = False
        try:
            yield first
            async for item in stream:
                if type(item) is bytes:
                    yield item
                else:  # the trailer
                    usage = item.get("usage", {})
                    used = usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0)
            finished = True
        except Exception as e:
            finished = True
            self._metrics.inc(metrics.INGRESS_ERRORS, model=admission.model, kind="stream_failed")
            logger.warning("stream %s failed mid-generation: %s", call.request_id, type(e).__name__)
            error = {"error": {"message": f"generation failed: {type(e).__name__}", "type": "server_error",
                               "param": None, "code": "engine_error"}}
            yield f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode()
        finally:
            admission.finish(used)
            if not finished:  # the client went away: cancel the replica's stream, which aborts the engine request
                stream.cancel()

