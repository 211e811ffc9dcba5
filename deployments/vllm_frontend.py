"""vLLM's own OpenAI server, run in-process inside a model replica (the vLLM adapter).

The replica builds vLLM 0.32's FastAPI app (``vllm.entrypoints.launchers.app.build_app``
and ``init_app_state``) over its ``AsyncLLM``, and the ingress hands it each request as
an ``HttpCall`` (method, path, headers, body bytes). The app runs as plain ASGI: no
socket, no second server. So protocol, chat templates, tools, ``response_format``,
reasoning, tokenize endpoints and error answers are vLLM's, byte for byte, and each
streamed token is JSON-encoded once, by vLLM's own code, as in ``vllm serve``.

What ``VllmHttpApp.call`` yields, in order:

1. ``{"status", "headers", "body", "more"}``: the response start with the first body
   bytes (for a stream, the first event, which vLLM sends once the engine has the
   first token);
2. ``bytes``: every body chunk that was ready when the previous item went out,
   joined: a busy replica sends one Ray object per drain, not per token, and while
   ``COALESCE_MIN_STREAMS`` or more responses stream it lets ``COALESCE_S`` of chunks gather;
3. ``{"usage": {...}}`` last: prompt, completion and cached tokens the engine
   counted for this call (the ingress refunds the rate budget with it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import os
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.config import ConfigError, ModelConfig

# With this many responses streaming from a replica, each waits this long before sending what
# has gathered (the first bytes always go at once); KVPILOT_STREAM_COALESCE_MS=0 turns it off.
COALESCE_MIN_STREAMS = 4
COALESCE_S = float(os.environ.get("KVPILOT_STREAM_COALESCE_MS", "20")) / 1000.0

# The engine requests of the HTTP call being served (set in the call's ASGI task).
_CALL_USAGE: contextvars.ContextVar[Usage | None] = contextvars.ContextVar("kvpilot_call_usage", default=None)


@dataclass
class Usage:
    """Tokens of one HTTP call, counted from the engine's outputs (all its engine requests)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    _cumulative: dict[str, int] = field(default_factory=dict)  # request id → tokens so far (non-delta outputs)

    def add(self, out: Any, delta: bool) -> None:
        generated = sum(len(c.token_ids) for c in out.outputs)
        if delta:
            self.completion_tokens += generated
        else:  # cumulative or final-only outputs repeat earlier tokens
            self.completion_tokens += generated - self._cumulative.get(out.request_id, 0)
            self._cumulative[out.request_id] = generated

    def start(self, out: Any) -> None:
        self.prompt_tokens += len(out.prompt_token_ids or ())
        self.cached_tokens += out.num_cached_tokens or 0

    def as_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "cached_tokens": self.cached_tokens}


def frontend_args(model: ModelConfig) -> argparse.Namespace:
    """vLLM's ``vllm serve`` arguments for this model, parsed and checked by vLLM's own parser."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    o = model.openai
    # usage.prompt_tokens_details.cached_tokens: the prompt tokens served from the prefix cache
    argv = ["--model", model.source, "--served-model-name", model.name, "--enable-prompt-tokens-details"]
    if o.chat_template is not None:
        argv += ["--chat-template", o.chat_template]
    if o.tool_call_parser is not None:
        argv += ["--tool-call-parser", o.tool_call_parser, "--enable-auto-tool-choice"]
    if o.reasoning_parser is not None:
        argv += ["--reasoning-parser", o.reasoning_parser]
    if model.lora is not None and model.lora.preload:
        # vLLM's OpenAIServingModels loads these at start (add_lora) and serves them by name.
        paths = model.adapter_paths()
        argv += ["--lora-modules", *(json.dumps({"name": n, "path": paths[n], "base_model_name": model.name})
                                     for n in model.lora.preload)]
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
    validate_parsed_serve_args(args)
    return args


def check_openai_config(model: ModelConfig, where: str) -> None:
    """Refuse, at config time, parser names and templates vLLM 0.32 does not have (ConfigError naming the field)."""
    from vllm.reasoning.abs_reasoning_parsers import ReasoningParserManager
    from vllm.tool_parsers.abstract_tool_parser import ToolParserManager

    o, errors = model.openai, []
    for name, value, known in (("tool_call_parser", o.tool_call_parser, ToolParserManager.list_registered()),
                               ("reasoning_parser", o.reasoning_parser, ReasoningParserManager.list_registered())):
        if value is not None and value not in known:
            errors.append(f"{where}.openai.{name}: {value!r} is not a vLLM {name.replace('_', ' ')}; "
                          f"choose one of {', '.join(known)}")
    if o.chat_template is not None and not Path(o.chat_template).is_file() and "{" not in o.chat_template:
        errors.append(f"{where}.openai.chat_template: {o.chat_template!r} is neither a file nor a Jinja template")
    if not errors and (o.tool_call_parser or o.reasoning_parser):
        errors += _parser_fits_tokenizer(model, where)
    if errors:
        raise ConfigError(errors)


def _parser_fits_tokenizer(model: ModelConfig, where: str) -> list[str]:
    """vLLM checks a parser against the model's tokenizer (special tokens it needs) only when the
    replica starts, after the engine has loaded; check it here, before anything starts."""
    from vllm.parser.parser_manager import ParserManager
    from vllm.tokenizers.registry import get_tokenizer

    from cluster.planning.hub import resolve_source

    o = model.openai
    tokenizer = get_tokenizer(resolve_source(model.source, model.revision))
    try:
        ParserManager.get_parser(tool_parser_name=o.tool_call_parser, reasoning_parser_name=o.reasoning_parser,
                                 enable_auto_tools=o.tool_call_parser is not None, model_name=model.name,
                                 tokenizer=tokenizer)
    except TypeError as e:
        field = "tool_call_parser" if o.tool_call_parser else "reasoning_parser"
        return [f"{where}.openai.{field}: {getattr(o, field)!r} does not fit this model's tokenizer: {e}"]
    return []


def register_adapters(models: Any, model: ModelConfig) -> None:
    """Make the configured adapters that were not preloaded servable by name: vLLM's engine loads an
    adapter from its path on the first request that names it (into a free or least recently used slot)."""
    from vllm.lora.request import LoRARequest

    if model.lora is None:
        return
    for name, path in model.adapter_paths().items():
        if name not in models.lora_requests:
            models.lora_requests[name] = LoRARequest(name, models.lora_id_counter.inc(1), path,
                                                     base_model_name=model.name)


class _Server:
    """What vLLM's error handlers expect at ``app.state.server``: the replica ends itself instead."""

    should_exit = False


class VllmHttpApp:
    """vLLM's OpenAI app over one engine, called with in-process ASGI."""

    def __init__(self, app: Any, engine: Any):
        self._app = app
        self._engine = engine
        self._streaming = 0  # responses of this replica being streamed now

    @classmethod
    async def build(cls, model: ModelConfig, engine: Any) -> VllmHttpApp:
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.app import build_app

        args = frontend_args(model)
        args.structured_outputs_config = engine.vllm_config.structured_outputs_config
        tasks = tuple(await engine.get_supported_tasks())
        app = build_app(args, tasks, engine.model_config)
        await init_app_state(engine, app.state, args, tasks)
        register_adapters(app.state.openai_serving_models, model)
        app.state.server = _Server()
        _count_usage(engine)
        return cls(app, engine)

    async def call(self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]], body: bytes):
        """Run one request through vLLM's app; see the module docstring for what is yielded."""
        usage = Usage()
        messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        gone = asyncio.Event()
        delivered = False

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            messages.put_nowait(message)

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": query, "root_path": "", "headers": headers,
            "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0), "state": {},
        }
        ctx = contextvars.copy_context()
        ctx.run(_CALL_USAGE.set, usage)
        task = asyncio.get_running_loop().create_task(self._app(scope, receive, send), context=ctx)
        streamed = False
        try:
            status, head, chunks, more = await self._response_start(messages, task)
            self._exit_if_engine_dead()  # before anything reaches the client: the ingress resubmits
            yield {"status": status, "headers": head, "body": b"".join(chunks), "more": more}
            streamed = more
            self._streaming += streamed
            while more:
                if self._streaming >= COALESCE_MIN_STREAMS:
                    # A busy replica lets a few engine steps' chunks gather: each item costs every
                    # hop after the engine (Ray object, ingress, proxy) the same, whatever it holds.
                    await asyncio.sleep(COALESCE_S)
                message = await self._next(messages, task)
                if message is None:
                    break
                chunks = [message.get("body", b"")]
                more = message.get("more_body", False)
                while more and not messages.empty():
                    m = messages.get_nowait()
                    chunks.append(m.get("body", b""))
                    more = m.get("more_body", False)
                yield b"".join(chunks)
            await task
            yield {"usage": usage.as_dict()}
        finally:
            if streamed:
                self._streaming -= 1
            gone.set()  # the client left (the stream was cancelled) or the call is over
            if not task.done():
                task.cancel()  # vLLM's generator aborts the engine request on cancellation
            self._exit_if_engine_dead()

    def ensure_adapter(self, name: str, path: str | None, base: str) -> None:
        """Serve ``name`` from ``path`` (the ingress's record) if vLLM's app does not know it yet."""
        from vllm.lora.request import LoRARequest

        models = self._app.state.openai_serving_models
        if path and name not in models.lora_requests:
            models.lora_requests[name] = LoRARequest(name, models.lora_id_counter.inc(1), path, base_model_name=base)

    async def resident_adapters(self) -> list[str]:
        """Names of the adapters the engine holds loaded (its LoRA cache), sorted."""
        ids = await self._engine.list_loras()
        models = self._app.state.openai_serving_models
        return sorted(n for n, r in models.lora_requests.items() if r.lora_int_id in ids)

    async def _response_start(self, messages: asyncio.Queue, task: asyncio.Task) -> tuple[int, list, list, bool]:
        """Status, headers and the first body bytes (a stream's first event); ``more``: a body follows."""
        status, head, chunks, more = 500, [], [], True
        while more:
            message = await self._next(messages, task)
            if message is None:  # the app ended without a complete response
                break
            batch = [message]
            while not messages.empty():
                batch.append(messages.get_nowait())
            for m in batch:
                if m["type"] == "http.response.start":
                    status, head = m["status"], [(k, v) for k, v in m.get("headers", ())]
                elif m["type"] == "http.response.body":
                    chunks.append(m.get("body", b""))
                    more = m.get("more_body", False)
            if chunks or not more:
                break
        return status, head, chunks, more

    @staticmethod
    async def _next(messages: asyncio.Queue, task: asyncio.Task) -> dict[str, Any] | None:
        if not messages.empty():
            return messages.get_nowait()
        get = asyncio.ensure_future(messages.get())
        done, _ = await asyncio.wait({get, task}, return_when=asyncio.FIRST_COMPLETED)
        if get in done:
            return get.result()
        get.cancel()
        if not messages.empty():
            return messages.get_nowait()
        task.result()  # re-raise what ended the app
        return None

    def _exit_if_engine_dead(self) -> None:
        if self._engine.errored:
            # A dead engine does not come back. Ending the process makes callers see the replica
            # die at once: the ingress resubmits requests that had no token yet elsewhere, and
            # Serve starts a replacement.
            import logging

            logging.getLogger("kvpilot.engine").error("the vLLM engine died; ending this replica so Serve replaces it")
            os._exit(1)


def _count_usage(engine: Any) -> None:
    """Wrap ``engine.generate`` so every engine request counts its tokens into its HTTP call's ``Usage``."""
    from vllm.sampling_params import RequestOutputKind

    generate = engine.generate

    async def counted(prompt: Any, sampling_params: Any, *args: Any, **kwargs: Any):
        usage = _CALL_USAGE.get()
        delta = getattr(sampling_params, "output_kind", None) == RequestOutputKind.DELTA
        first = True
        async for out in generate(prompt, sampling_params, *args, **kwargs):
            if usage is not None:
                if first:
                    usage.start(out)
                    first = False
                usage.add(out, delta)
            yield out

    engine.generate = counted
