"""Schemathesis against a live kvpilot ingress: cases generated from its OpenAPI document.

Used by ``tests/fuzz/test_openapi_fuzz.py`` (CI, about 2,000 cases) and by
``benchmarks/fuzz_long.py`` (as many as you like). Cases are generated first (Hypothesis,
through schemathesis' strategies: schema-valid bodies in ``positive`` mode, schema-violating
ones in ``negative`` mode), then sent concurrently, so a run measures the server, not the
generator. Each response must be:

* no 5xx;
* every 4xx an OpenAI error object ``{"error": {"message", "type", "param", "code"}}``;
* a documented status code, content type and body schema (schemathesis' own checks), and a
  schema-violating request never accepted (``negative_data_rejection``).

Add to these the hand-written bodies no schema produces (``NASTY_BODIES``): broken JSON, deep
nesting, huge numbers, lone surrogates, NUL bytes, invalid UTF-8.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import requests

ERROR_KEYS = {"message", "type", "param", "code"}
UNAUTHENTICATED_EVERY = 25  # one case in this many goes without the API key (expects 401)

NASTY_BODIES: list[bytes] = [
    b"", b"{", b"}", b"null", b"[]", b"123", b'"string"', b"{'model': 'tiny'}", b'{"model": "tiny",}',
    b"[" * 100_000 + b"]" * 100_000,
    b'{"model": "tiny", "prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    b'{"model": "tiny", "prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}",
    b'{"model": "tiny", "prompt": "x", "max_tokens": 1e400}',
    b'{"model": "tiny", "prompt": "x", "temperature": NaN}',
    b'{"model": "tiny", "prompt": "x", "temperature": Infinity}',
    b'{"model": "tiny", "prompt": "\\ud800"}',
    b'{"model": "tiny", "prompt": "a\\u0000b", "max_tokens": 2}',
    b'{"model": "tiny", "prompt": "\xff\xfe"}',
    b'{"model": "tiny\\u0000", "prompt": "x"}',
    b'{"model": "tiny", "prompt": [0, 1, -1]}',
    b'{"model": "tiny", "prompt": [true, false]}',
    b'{"model": "tiny", "prompt": [1.5]}',
    b'{"model": "tiny", "prompt": "x", "stop": ["\\ud83d"]}',
    b'{"model": "tiny", "prompt": "x", "n": 16, "max_tokens": 8, "logprobs": 20}',
    b'{"model": "tiny", "prompt": "x", "seed": 9223372036854775807, "max_tokens": 2}',
    b'{"model": "tiny", "prompt": "x", "model": "other"}',
    b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}',
    b'{"model": "tiny", "messages": [{"role": "user", "content": []}], "max_tokens": 2}',
    b'{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
    b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 5}',
]


@dataclass
class Finding:
    operation: str
    mode: str
    status: int
    problem: str
    request: str
    response: str


@dataclass
class FuzzReport:
    cases: int = 0
    seconds: float = 0.0
    generate_seconds: float = 0.0
    statuses: Counter = field(default_factory=Counter)
    by_operation: Counter = field(default_factory=Counter)
    findings: list[Finding] = field(default_factory=list)
    keyless_sent: int = 0  # keyed-route requests sent without our key (on purpose, or a generated header replaced it)
    keyless_refused: int = 0  # of those, answered 401
    keyed_refused: int = 0  # requests that carried our key and still got 401 (must be 0)

    @property
    def server_errors(self) -> int:
        return sum(n for code, n in self.statuses.items() if code >= 500)

    @property
    def cases_per_s(self) -> float:
        return self.cases / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        codes = ", ".join(f"{c}: {n}" for c, n in sorted(self.statuses.items()))
        return (f"{self.cases} cases in {self.seconds:.1f} s ({self.cases_per_s:.1f} cases/s; generating took "
                f"{self.generate_seconds:.1f} s); status codes {{{codes}}}; 5xx: {self.server_errors}; "
                f"findings: {len(self.findings)}")


def _anthropic_error(body: Any) -> bool:
    """Anthropic's error format, which vLLM's /v1/messages routes answer in (the ingress's own refusals stay OpenAI's)."""
    err = body.get("error") if isinstance(body, dict) else None
    return (isinstance(body, dict) and set(body) == {"type", "error"} and body["type"] == "error"
            and isinstance(err, dict) and set(err) == {"type", "message"} and bool(err["message"]))


def _openai_error_problem(response: requests.Response, anthropic: bool = False) -> str | None:
    if response.status_code < 400:
        return None
    try:
        body = response.json()
    except ValueError:
        return "error response is not JSON"
    if anthropic and _anthropic_error(body):
        return None if "Traceback" not in response.text else "error response carries a traceback"
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict) or set(err) != ERROR_KEYS or set(body) != {"error"}:
        return "error response is not an OpenAI error object"
    if not isinstance(err["message"], str) or not err["message"] or not isinstance(err["type"], str):
        return "error object lacks a message or type"
    if "Traceback" in response.text:
        return "error response carries a traceback"
    return None


def _clamp(body: Any, max_tokens: int) -> None:
    """Keep generated output budgets small, so cases that reach the engine stay cheap."""
    if isinstance(body, dict):
        for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
            v = body.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and v > max_tokens:
                body[key] = 1 + v % max_tokens


def generate(schema: Any, plan: dict[tuple[str, str], dict[str, int]], seed: int) -> list[tuple[str, str, Any]]:
    """``(operation label, mode, case)`` for each requested case: ``plan[(method, path)][mode] = count``."""
    import hypothesis
    from hypothesis import HealthCheck, Phase, settings
    from schemathesis import GenerationMode

    out: list[tuple[str, str, Any]] = []
    for result in schema.get_all_operations():
        op = result.ok()
        wanted = plan.get((op.method.upper(), op.path), {})
        for mode_name, count in wanted.items():
            if count <= 0:
                continue
            mode = GenerationMode(mode_name)
            got: list[Any] = []

            @hypothesis.seed(seed)
            @settings(max_examples=count, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @hypothesis.given(case=op.as_strategy(generation_mode=mode))
            def collect(case: Any) -> None:
                got.append(case)

            collect()
            out += [(f"{op.method.upper()} {op.path}", mode_name, c) for c in got[:count]]
    return out


def run(base_url: str, api_key: str, plan: dict[tuple[str, str], dict[str, int]], *, seed: int = 0,
        workers: int = 8, max_tokens: int = 8, nasty: bool = True,
        log: Callable[[str], None] = print) -> FuzzReport:
    import schemathesis
    from schemathesis.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    report = FuzzReport()
    started = time.monotonic()
    cases = generate(schema, plan, seed)
    report.generate_seconds = time.monotonic() - started
    log(f"generated {len(cases)} cases in {report.generate_seconds:.1f} s")
    auth = {"Authorization": f"Bearer {api_key}"}
    local = threading.local()
    lock = threading.Lock()
    # Not negative_data_rejection: the bodies are vLLM's own request models, which (like `vllm serve`)
    # coerce in pydantic's lax mode ("5" for 5) and keep unknown fields; kvpilot accepts what vLLM does.
    checks = [status_code_conformance, content_type_conformance, response_schema_conformance]

    def session() -> requests.Session:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        return local.session

    def record(label: str, mode: str, status: int, problem: str | None, request: str, text: str) -> None:
        with lock:
            report.cases += 1
            report.statuses[status] += 1
            report.by_operation[label] += 1
            if problem is not None or status >= 500:
                report.findings.append(Finding(label, mode, status, problem or "server error", request[:2000],
                                               text[:2000]))

    def one(i: int, item: tuple[str, str, Any]) -> None:
        label, mode, case = item
        if mode == "positive":
            _clamp(case.body, max_tokens)
        headers = {} if i % UNAUTHENTICATED_EVERY == 0 else auth
        if case.headers:  # negative cases may carry a generated Authorization: the key is ours to choose
            case.headers = {k: v for k, v in case.headers.items() if k.lower() != "authorization"}
        sent = json.dumps(case.body, default=repr) if case.body is not None else ""
        try:
            response = case.call(base_url=base_url, headers=headers, session=session(), timeout=300)
        except Exception as e:  # the connection itself failed: as bad as a 5xx
            record(label, mode, 599, f"request failed: {type(e).__name__}: {e}", sent, "")
            return
        problem = _openai_error_problem(response, anthropic=" /v1/messages" in label)
        keyed = response.request.headers.get("Authorization") == auth["Authorization"]
        if label.endswith(" /health"):  # open to all: no key asked
            keyed = True
        with lock:
            report.keyless_sent += not keyed
            report.keyless_refused += not keyed and response.status_code == 401
            report.keyed_refused += keyed and response.status_code == 401
        if problem is None and headers:
            try:
                case.validate_response(response, checks=checks, headers=headers)
            except (Exception, BaseExceptionGroup) as e:  # schemathesis raises a failure or a group of them
                problem = f"schemathesis: {type(e).__name__}: {str(e)[:1500]}"
        record(label, mode, response.status_code, problem, sent, response.text)

    def nasty_one(body: bytes) -> None:
        for path in ("/v1/completions", "/v1/chat/completions"):
            r = session().post(f"{base_url}{path}", data=body, headers={**auth, "Content-Type": "application/json"},
                               timeout=300)
            record(f"POST {path} (hand-written)", "nasty", r.status_code, _openai_error_problem(r),
                   body[:300].decode(errors="replace"), r.text)

    sent_at = time.monotonic()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(one, i, item) for i, item in enumerate(cases)]
        if nasty:
            futures += [pool.submit(nasty_one, b) for b in NASTY_BODIES]
        for f in futures:
            f.result()
    report.seconds = time.monotonic() - sent_at
    return report
