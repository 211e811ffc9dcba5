"""Hardening on the real stack: API keys, limits, faults (a replica or engine dying), no keys in logs.

Two applications beside each other on the package's Ray:

* ``guarded`` (``/guarded``): one replica, API keys from a file, tight per-key limits;
* ``faulty`` (``/faulty``): two replicas of two engine slots each, no keys; replicas and
  engines get killed here;
* ``lonely`` (``/lonely``, deployed by the one test that needs it): one replica of one slot
  and a short ``first_token_timeout_s``, for a request resubmitted to no replica.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import signal
import socket
import time
import urllib.parse
import urllib.request
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from ray import serve

from cluster import metrics
from cluster.bench.client import stream_outcome
from cluster.serving.placement import deployment_name
from tests.serve.conftest import ROOT, deploy

pytestmark = pytest.mark.serve

MODEL = "tiny"
GUARDED, FAULTY, LONELY = "guarded", "faulty", "lonely"
# Every key is 32 characters; one per test that spends a budget, so the tests do not share buckets.
KEYS = {name: f"sk-kvpilot-test-{name:>8}-{i:07d}".replace(" ", "x") for i, name in
        enumerate(["auth", "rate", "tokens", "queue", "body", "limits", "metrics"])}
RPM, TPM = 8, 600
MAX_QUEUED = 2
MAX_BODY = 64 * 1024
BODY_TIMEOUT_S = 3.0  # faulty's ingress.body_timeout_s


def _model(replicas: int, **extra) -> dict:
    return {"name": MODEL, "source": str(ROOT / ".fixtures/tiny-none"), "dtype": "float16", "accelerator": "cpu",
            "cpu_kv_cache_space_gib": 0.25, "max_model_len": 1024, "max_num_seqs": 8,
            "min_replicas": replicas, "max_replicas": replicas, **extra}


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("secrets") / "api-keys"
    path.write_text("# one key per line, as a mounted Kubernetes Secret\n" + "\n".join(KEYS.values()) + "\n")
    return path


@pytest.fixture(scope="module")
def apps(serve_instance, keys_file):
    deploy({"models": [_model(1, limits={"max_prompt_tokens": 200, "max_tokens": 800,
                                         "max_queued_requests": MAX_QUEUED})],
            "ingress": {"auth": "required", "api_keys_file": str(keys_file), "requests_per_minute": RPM,
                        "tokens_per_minute": TPM, "max_body_bytes": MAX_BODY}},
           GUARDED, f"/{GUARDED}")
    # Two slots per replica, so a burst leaves requests waiting in each engine without a token.
    deploy({"models": [_model(2, max_num_seqs=2)], "ingress": {"body_timeout_s": BODY_TIMEOUT_S}}, FAULTY, f"/{FAULTY}")
    yield serve_instance
    for app in (GUARDED, FAULTY):
        serve.delete(app)


@pytest.fixture
def guarded(apps) -> str:
    return f"{apps}/{GUARDED}"


@pytest.fixture
def faulty(apps) -> str:
    return f"{apps}/{FAULTY}"


def _auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


def _complete(base: str, key: str | None, timeout: float = 120, **body) -> httpx.Response:
    headers = _auth(key) if key else {}
    return httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "Hello", **body}, headers=headers,
                      timeout=timeout)


def _openai_error(r: httpx.Response, status: int, code: str | None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["code"] == code, err
    return err


# --- API keys -------------------------------------------------------------------


def test_every_v1_route_needs_a_key_and_health_stays_open(guarded):
    assert httpx.get(f"{guarded}/health").status_code == 200
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                         ("POST", "/v1/responses"), ("POST", "/v1/messages"), ("POST", "/tokenize"),
                         ("POST", "/detokenize"), ("GET", "/v1/no-such-route")]:
        r = httpx.request(method, f"{guarded}{path}", json={"model": MODEL, "prompt": "x"})
        _openai_error(r, 401, "missing_api_key")
        assert r.headers["www-authenticate"] == "Bearer"
        for bad in (f"Bearer {KEYS['auth']}x", "Bearer sk-kvpilot-not-a-key-at-all-000", f"Basic {KEYS['auth']}"):
            r = httpx.request(method, f"{guarded}{path}", json={"model": MODEL, "prompt": "x"},
                              headers={"Authorization": bad})
            assert r.status_code == 401 and KEYS["auth"] not in r.text
    assert httpx.get(f"{guarded}/v1/models", headers=_auth("auth")).json()["data"][0]["id"] == MODEL
    # Anthropic's clients send the key as x-api-key
    r = httpx.post(f"{guarded}/v1/messages", headers={"x-api-key": KEYS["auth"]},
                   json={"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}, timeout=120)
    assert r.status_code == 200 and r.json()["type"] == "message", r.text


def test_openai_client_with_and_without_a_key(guarded):
    good = openai.OpenAI(base_url=f"{guarded}/v1", api_key=KEYS["auth"], max_retries=0, timeout=120)
    assert good.completions.create(model=MODEL, prompt="Hi", max_tokens=4).usage.completion_tokens <= 4
    bad = openai.OpenAI(base_url=f"{guarded}/v1", api_key="sk-kvpilot-wrong-key-0000000000", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.body["code"] == "invalid_api_key"


# --- limits ---------------------------------------------------------------------


def test_requests_per_minute_gives_429_with_retry_after(guarded):
    # A token bucket of RPM that refills RPM per minute: however slow the machine, the key gets its
    # RPM requests plus what refilled while they ran, then a 429.
    started, statuses = time.monotonic(), []
    while len(statuses) < 3 * RPM and 429 not in statuses:
        r = _complete(guarded, "rate", max_tokens=1)
        statuses.append(r.status_code)
    elapsed = time.monotonic() - started
    assert set(statuses[:-1]) == {200} and statuses[-1] == 429, statuses
    assert RPM <= statuses.count(200) <= RPM + math.ceil(elapsed * RPM / 60), (statuses, elapsed)
    err = _openai_error(r, 429, "rate_limit_exceeded")
    assert "requests per minute" in err["message"]
    assert 1 <= int(r.headers["retry-after"]) <= 60 / RPM + 1
    assert _complete(guarded, "auth", max_tokens=1).status_code == 200  # another key is not affected


def test_tokens_per_minute_counts_prompt_and_max_tokens(guarded):
    assert _complete(guarded, "tokens", max_tokens=400, ignore_eos=True).status_code == 200
    r = _complete(guarded, "tokens", max_tokens=400, ignore_eos=True)  # 400 more do not fit in the 600
    err = _openai_error(r, 429, "rate_limit_exceeded")
    assert "tokens per minute" in err["message"] and int(r.headers["retry-after"]) >= 1
    r = _complete(guarded, "tokens", max_tokens=700)  # can never fit: no point retrying
    _openai_error(r, 400, "exceeds_token_rate_limit")


def test_oversize_body_is_413_with_or_without_content_length(guarded):
    big = json.dumps({"model": MODEL, "prompt": "x" * (MAX_BODY + 10)}).encode()
    r = httpx.post(f"{guarded}/v1/completions", content=big, headers=_auth("body"))
    _openai_error(r, 413, "request_too_large")

    def chunks():
        for i in range(0, len(big), 8192):
            yield big[i:i + 8192]

    r = httpx.post(f"{guarded}/v1/completions", content=chunks(), headers=_auth("body"))  # chunked: no length
    assert "content-length" not in r.request.headers
    _openai_error(r, 413, "request_too_large")


def test_prompt_and_max_tokens_bounds_per_model(guarded):
    r = _complete(guarded, "limits", prompt=list(range(10, 260)), max_tokens=1)
    err = _openai_error(r, 400, "prompt_too_long")
    assert err["param"] == "prompt" and "at most 200" in err["message"]
    r = _complete(guarded, "limits", max_tokens=801)
    assert _openai_error(r, 400, "max_tokens_too_large")["param"] == "max_tokens"
    r = _complete(guarded, "limits", max_tokens=2, n=2, temperature=0)  # vLLM refuses n > 1 when greedy (fuzz find)
    assert r.status_code == 400 and "greedy" in r.json()["error"]["message"], r.text


def test_queue_bound_per_model_gives_503_then_frees_on_disconnect(guarded):
    # Two streams of 250 tokens fit the key's 600 tokens a minute; they hold the model's two slots.
    body = {"model": MODEL, "prompt": "Keep going", "max_tokens": 250, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=120, headers=_auth("queue")) as http:
        streams = [http.stream("POST", f"{guarded}/v1/completions", json=body) for _ in range(MAX_QUEUED)]
        opened = [s.__enter__() for s in streams]
        assert [r.status_code for r in opened] == [200] * MAX_QUEUED
        r = http.post(f"{guarded}/v1/completions", json={**body, "stream": False, "max_tokens": 1})
        err = _openai_error(r, 503, "model_overloaded")
        assert "max_queued_requests" in err["message"] and r.headers["retry-after"] == "1"
        for s in streams:
            s.__exit__(None, None, None)  # the clients go away mid-stream
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # their slots come back
        r = _complete(guarded, "queue", max_tokens=1)
        if r.status_code == 200:
            break
        time.sleep(0.5)
    assert r.status_code == 200, r.text


# --- metrics and logs -------------------------------------------------------------


def _metrics_text() -> str:
    import ray

    port = ray._private.worker._global_node.metrics_export_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def _series(text: str, name: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name):].rsplit(" ", 1)
            out[labels] = float(value)
    return out


def _make_every_refusal(guarded: str) -> None:
    """One of each refusal the metrics test looks for, made with the test's own key (no test order)."""
    httpx.get(f"{guarded}/v1/models")  # 401 missing_api_key
    httpx.get(f"{guarded}/v1/models", headers={"Authorization": "Bearer sk-kvpilot-not-a-key-at-all-000"})  # 401
    big = json.dumps({"model": MODEL, "prompt": "x" * (MAX_BODY + 10)}).encode()
    httpx.post(f"{guarded}/v1/completions", content=big, headers=_auth("metrics"))  # 413
    body = {"model": MODEL, "prompt": "Keep going", "max_tokens": 250, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=120, headers=_auth("metrics")) as http:
        streams = [http.stream("POST", f"{guarded}/v1/completions", json=body) for _ in range(MAX_QUEUED)]
        for st in streams:
            st.__enter__()
        http.post(f"{guarded}/v1/completions", json={**body, "stream": False, "max_tokens": 1})  # 503 overloaded
        for st in streams:
            st.__exit__(None, None, None)
    for _ in range(3 * RPM):  # until the key's request rate runs out: 429
        if _complete(guarded, "metrics", max_tokens=1).status_code == 429:
            break


def test_ingress_metrics_count_codes_and_refusals_without_keys(guarded):
    _make_every_refusal(guarded)
    requests_name, errors_name = metrics.exported_name(metrics.INGRESS_REQUESTS), metrics.exported_name(metrics.INGRESS_ERRORS)
    wanted = ("missing_api_key", "invalid_api_key", "rate_limit_exceeded", "request_too_large", "model_overloaded")
    deadline = time.monotonic() + 120  # Ray's metrics agent exports every few seconds, later on a loaded machine
    while True:
        text = _metrics_text()
        codes, kinds = _series(text, requests_name), _series(text, errors_name)
        found = {k for k in wanted if any(f'kind="{k}"' in labels for labels in kinds)}
        if len(found) == len(wanted) or time.monotonic() > deadline:
            break
        time.sleep(3)
    shown = "\n".join(line for line in text.splitlines() if "kvpilot_ingress" in line and not line.startswith("#"))
    assert found == set(wanted), shown
    assert any('code="401"' in k and 'model="-"' in k for k in codes), shown
    assert any('code="200"' in k and f'model="{MODEL}"' in k for k in codes), shown
    assert any('code="429"' in k and f'model="{MODEL}"' in k for k in codes), shown
    for key in KEYS.values():
        assert key not in text


# --- slow clients -----------------------------------------------------------------


def _raw_post(base: str, path: str, head_extra: str, rcvbuf: int | None = None) -> socket.socket:
    """An HTTP/1.1 POST's head on a raw socket; the caller sends (or trickles) the body."""
    url = urllib.parse.urlsplit(base)
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # a small window: the server must wait for us
    sock.connect((url.hostname, url.port))
    sock.sendall(f"POST {url.path}{path} HTTP/1.1\r\nHost: {url.hostname}\r\nContent-Type: application/json\r\n"
                 f"{head_extra}\r\n".encode())
    return sock


def _read_answer(sock: socket.socket, answer: bytes) -> bytes:
    """Read on until the head and all ``Content-Length`` bytes of the body are in: the two can come
    in separate segments (CI once saw the head alone)."""
    while b"\r\n\r\n" not in answer:
        answer += _recv_more(sock)
    head, _, got = answer.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    while length and len(got) < int(length.group(1)):
        got += _recv_more(sock)
    return head + b"\r\n\r\n" + got


def _recv_more(sock: socket.socket) -> bytes:
    data = sock.recv(65536)
    assert data, "the server closed the connection before its answer was complete"
    return data


def test_a_client_trickling_its_body_gets_408_within_the_bound(faulty):
    body = json.dumps({"model": MODEL, "prompt": "Hello", "max_tokens": 2}).encode()
    sock = _raw_post(faulty, "/v1/completions", f"Content-Length: {len(body)}\r\n")
    sock.settimeout(0.01)
    started, answer = time.monotonic(), b""
    try:
        for byte in body[:-1]:  # one byte a second, never the last: only the bound can end it
            sock.sendall(bytes([byte]))
            try:
                answer += sock.recv(65536)
            except TimeoutError:
                pass
            if answer or time.monotonic() - started > BODY_TIMEOUT_S + 30:
                break
            time.sleep(1.0)
        sock.settimeout(30)
        answer = _read_answer(sock, answer)
    finally:
        sock.close()
    waited = time.monotonic() - started
    status_line = answer.split(b"\r\n", 1)[0].decode()
    print(f"trickled body: answered {status_line!r} after {waited:.1f} s")
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"request_timeout"' in answer and b"body_timeout_s" in answer


def test_a_client_that_stops_reading_holds_no_engine_slot(faulty):
    """It reads the first bytes of a long stream, then nothing (its connection open, a small receive
    window): the engine finishes the request and the ingress lets go of it while the client sleeps."""
    body = json.dumps({"model": MODEL, "prompt": "Stall", "max_tokens": 900, "ignore_eos": True, "stream": True})
    sock = _raw_post(faulty, "/v1/completions", f"Content-Length: {len(body)}\r\n", rcvbuf=4096)
    try:
        sock.sendall(body.encode())
        sock.settimeout(120)
        first = sock.recv(1024)
        assert first.startswith(b"HTTP/1.1 200"), first[:200]
        assert _wait(lambda: _ingress_stats(faulty)["in_flight"].get(MODEL, 0) == 1, 30) is not None
        # Nothing more is read. 900 tokens of events (~150 KB) are far more than the window holds.
        released = _wait(lambda: _ingress_stats(faulty)["in_flight"].get(MODEL, 0) == 0, 120)
        assert released is not None, "a client that stopped reading held its request for 120 s"
        print(f"stalled reader: the request left the ingress and the engine {released:.1f} s after its first bytes")
        assert _complete(faulty, None, max_tokens=4).status_code == 200
    finally:
        sock.close()


# --- faults ---------------------------------------------------------------------


class _Outcome:
    def __init__(self) -> None:
        self.first_chunk_at: float | None = None
        # Until it ends: "completed"; "failed_mid_stream" (tokens, then an error event and [DONE]);
        # "failed_before_streaming" (an error before any token: what resubmission must prevent);
        # "failed_unclean" (no OpenAI error, or no [DONE]).
        self.result = "hung"


async def _one_stream(http: httpx.AsyncClient, base: str, i: int, out: _Outcome, max_tokens: int) -> None:
    body = {"model": MODEL, "prompt": f"Stream number {i}", "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True}
    async with http.stream("POST", f"{base}/v1/completions", json=body) as r:
        if r.status_code != 200:
            text = (await r.aread()).decode()
            out.result = "failed_before_streaming" if "error" in json.loads(text) else "failed_unclean"
            return

        def seen() -> None:
            out.first_chunk_at = out.first_chunk_at or time.monotonic()

        out.result = await stream_outcome(r.aiter_bytes(), seen)


def _replicas(app: str) -> dict[str, int]:
    """Live replica actors of the app's model: actor name → pid."""
    from ray._private import state

    cls = f"ServeReplica:{app}:{deployment_name(MODEL)}"
    return {a["Name"]: a["Pid"] for a in state.actors().values()
            if a["ActorClassName"] == cls and a["State"] == "ALIVE"}


def _running(app: str) -> int:
    status = serve.status().applications[app].deployments[deployment_name(MODEL)]
    return int(status.replica_states.get("RUNNING", 0))


def _wait(predicate, timeout_s: float) -> float | None:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if predicate():
            return time.monotonic() - started
        time.sleep(0.5)
    return None


def test_killing_a_replica_mid_stream_hangs_nothing_and_it_is_replaced(faulty):
    import ray

    # 16 streams fill both replicas' 4 x 2 requests (ONGOING_PER_SLOT x max_num_seqs): each engine
    # runs 2 and holds 6 without a token, so the kill hits streams in flight and requests not started.
    n, max_tokens = 16, 200
    before = _replicas(FAULTY)
    assert len(before) == 2 and _running(FAULTY) == 2
    outcomes = [_Outcome() for _ in range(n)]
    killed_at: list[float] = []
    resubmitted_before = _ingress_stats(faulty)["resubmitted"]

    async def main() -> None:
        async with httpx.AsyncClient(timeout=httpx.Timeout(240.0)) as http:
            tasks = [asyncio.create_task(_one_stream(http, faulty, i, outcomes[i], max_tokens)) for i in range(n)]
            deadline = time.monotonic() + 180
            while sum(o.first_chunk_at is not None for o in outcomes) < 4:  # both engines are streaming
                assert time.monotonic() < deadline, "no 4 streams started within 180 s"
                await asyncio.sleep(0.05)
            victim = sorted(before)[0]
            ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
            killed_at.append(time.monotonic())
            await asyncio.wait(tasks, timeout=240)

    asyncio.run(main())
    kinds = ("completed", "failed_mid_stream", "failed_before_streaming", "failed_unclean", "hung")
    counts = {k: sum(o.result == k for o in outcomes) for k in kinds}
    resubmitted = _ingress_stats(faulty)["resubmitted"] - resubmitted_before
    print(f"kill during {n} streams: {counts}; resubmitted after the kill: {resubmitted}")
    # Only streams that were already sending may fail (cleanly); a request without a token yet
    # is resubmitted. (Judged by what each stream received, not by when the client read it.)
    assert counts["hung"] == 0 and counts["failed_unclean"] == 0 and counts["failed_before_streaming"] == 0
    assert counts["completed"] >= n // 2
    # The kill hit both kinds: streams that were sending failed cleanly, requests waiting in the
    # victim's engine went to the other replica and completed.
    assert counts["failed_mid_stream"] >= 1, counts
    assert resubmitted >= 1 and counts["completed"] >= resubmitted, (resubmitted, counts)

    recovered = _wait(lambda: _running(FAULTY) == 2 and len(set(_replicas(FAULTY)) - set(before)) == 1, 300)
    assert recovered is not None, "no replacement replica within 300 s"
    print(f"two replicas serve again {time.monotonic() - killed_at[0]:.1f} s after the kill")
    assert _complete(faulty, None, max_tokens=4).status_code == 200


FIRST_TOKEN_TIMEOUT_S = 6.0  # lonely's limit: far shorter than a replacement replica's start


@pytest.fixture(scope="module")
def lonely(serve_instance) -> str:
    deploy({"models": [_model(1, max_num_seqs=1, limits={"first_token_timeout_s": FIRST_TOKEN_TIMEOUT_S})]},
           LONELY, f"/{LONELY}")
    yield f"{serve_instance}/{LONELY}"
    serve.delete(LONELY)


def test_a_resubmitted_request_without_a_first_token_in_time_gets_a_503(lonely):
    """The only replica dies while a request waits in its engine: the request is resubmitted, no
    replica takes it within ``first_token_timeout_s``, and the client gets the 503 with
    ``Retry-After`` that says so (not a 500, not a hang)."""
    import ray

    victim = next(iter(_replicas(LONELY)))
    resubmitted_before = _ingress_stats(lonely)["resubmitted"]
    running = _Outcome()

    async def main() -> tuple[httpx.Response, float]:
        async with httpx.AsyncClient(timeout=httpx.Timeout(120.0)) as http:
            stream = asyncio.create_task(_one_stream(http, lonely, 0, running, 1000))
            deadline = time.monotonic() + 120
            while running.first_chunk_at is None:
                assert time.monotonic() < deadline, "the long stream did not start within 120 s"
                await asyncio.sleep(0.05)
            waiting = asyncio.create_task(http.post(f"{lonely}/v1/completions",
                                                    json={"model": MODEL, "prompt": "Waiting", "max_tokens": 4}))
            await asyncio.sleep(0.5)  # it reaches the replica and waits for the engine's only slot
            assert running.result == "hung" and not waiting.done(), "the long stream ended before the kill"
            ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
            killed = time.monotonic()
            r = await waiting
            waited = time.monotonic() - killed
            await stream
            return r, waited

    r, waited = asyncio.run(main())
    resubmitted = _ingress_stats(lonely)["resubmitted"] - resubmitted_before
    print(f"resubmitted {resubmitted}; the waiting request got {r.status_code} {waited:.1f} s after the kill")
    assert running.result == "failed_mid_stream"
    assert resubmitted >= 1
    _openai_error(r, 503, "first_token_timeout")
    assert int(r.headers["retry-after"]) > 0
    assert _wait(lambda: _running(LONELY) == 1 and victim not in _replicas(LONELY), 300) is not None
    # A request sent as soon as Serve reports the replacement RUNNING was once refused the same way
    # (no first token within the 6 s limit); the service must come back, not at once.
    back = _wait(lambda: _complete(lonely, None, max_tokens=4).status_code == 200, 120)
    assert back is not None, "the replacement replica answered no request within 120 s"
    print(f"lonely answers again {back:.1f} s after its replacement was RUNNING")


def _ingress_stats(base: str) -> dict:
    return httpx.get(f"{base}/ingress/stats", timeout=30).json()


def test_a_dead_engine_fails_the_health_check_and_is_replaced(faulty):
    """No request comes: Serve's periodic health check (ModelServer.check_health) finds the dead engine."""
    before = _replicas(FAULTY)
    assert _wait(lambda: len(_replicas(FAULTY)) == 2 and _running(FAULTY) == 2, 300) is not None
    before = _replicas(FAULTY)
    victim_name, victim_pid = sorted(before.items())[0]
    engine_cores = [p for p in psutil.Process(victim_pid).children(recursive=True) if "EngineCore" in p.name()]
    assert engine_cores, "the replica has no vLLM EngineCore process"
    for p in engine_cores:
        os.kill(p.pid, signal.SIGKILL)
    killed = time.monotonic()
    # Health checks every 10 s (cluster/serving/placement.py), then up to 30 s of graceful shutdown.
    gone = _wait(lambda: victim_name not in _replicas(FAULTY), 120)
    assert gone is not None, "the replica with a dead engine was not stopped within 120 s"
    assert [_complete(faulty, None, max_tokens=4).status_code for _ in range(4)] == [200] * 4
    replaced = _wait(lambda: _running(FAULTY) == 2 and len(_replicas(FAULTY)) == 2, 300)
    assert replaced is not None
    print(f"dead engine: replica stopped {gone:.1f} s after, replaced {time.monotonic() - killed:.1f} s after")


ENGINE_BOUND_S = 10.0  # PR_SET_PDEATHSIG acts at once; the reaper's watcher polls every second


def _alive_engines(processes: list[psutil.Process]) -> list[str]:
    out = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {p.name()} (parent {p.ppid()})")
        except psutil.NoSuchProcess:
            pass
    return out


def test_a_sigkilled_replica_leaves_no_engine_process(faulty):
    """SIGKILL of the replica's process (the OOM killer, ``ray stop --force``): its EngineCore and workers go too."""
    assert _wait(lambda: len(_replicas(FAULTY)) == 2 and _running(FAULTY) == 2, 300) is not None
    before = _replicas(FAULTY)
    victim_name, victim_pid = sorted(before.items())[0]
    engines = [p for p in psutil.Process(victim_pid).children(recursive=True)
               if "VLLM" in p.name() or "EngineCore" in p.name()]
    assert any("EngineCore" in p.name() for p in engines), [p.name() for p in engines]
    os.kill(victim_pid, signal.SIGKILL)
    killed = time.monotonic()
    gone = _wait(lambda: not _alive_engines(engines), ENGINE_BOUND_S)
    assert gone is not None, f"engine processes outlived their replica by {ENGINE_BOUND_S} s: {_alive_engines(engines)}"
    print(f"SIGKILLed replica: its {len(engines)} engine processes gone {gone:.1f} s after")
    replaced = _wait(lambda: _running(FAULTY) == 2 and victim_name not in _replicas(FAULTY)
                     and len(_replicas(FAULTY)) == 2, 300)
    assert replaced is not None, "no replacement replica within 300 s"
    print(f"replaced {time.monotonic() - killed:.1f} s after the kill")
    assert _complete(faulty, None, max_tokens=4).status_code == 200


def test_router_forgets_a_dead_replica_at_once():
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID, RequestMetadata
    from ray.serve.request_router import PendingRequest

    from deployments.protocol import HttpCall
    from deployments.router import KVPilotRouter

    async def main() -> None:
        dep = DeploymentID(name="model-x", app_name="app")
        router = KVPilotRouter(deployment_id=dep, handle_source=DeploymentHandleSource.UNKNOWN)
        router.initialize_state(policy="kvpilot", kv_capacity_tokens=4096, block_tokens=16)
        dead, alive = ReplicaID("dead", dep), ReplicaID("alive", dep)
        for i, rep in enumerate((dead, alive, dead)):
            gen = HttpCall("POST", "/v1/completions", b"", [], b"{}", f"r{i}", list(range(64)), 8)
            pending = PendingRequest(args=[gen], kwargs={}, metadata=RequestMetadata(f"r{i}", f"i{i}"))
            router.on_request_routed(pending, rep, None)
        assert router._index.size("dead") > 0 and router._ledger.requests["dead"] == 2
        router.on_replica_actor_died(dead)
        assert router._index.size("dead") == 0 and router._ledger.requests.get("dead", 0) == 0
        assert router._index.size("alive") > 0 and router._ledger.requests["alive"] == 1
        assert "dead" not in {u for u, _ in router._inflight.values()}

    asyncio.run(main())


def test_no_key_reaches_any_log_line(apps):
    """Every key is sent, refused and accepted, then every log file is scanned (more if run last)."""
    import ray

    guarded = f"{apps}/{GUARDED}"
    for key in KEYS.values():
        httpx.get(f"{guarded}/v1/models", headers={"Authorization": f"Bearer {key}x"})  # refused, logged as 401
        httpx.get(f"{guarded}/v1/models", headers={"Authorization": f"Bearer {key}"})
    time.sleep(2)  # Serve's access log and replica logs are written asynchronously

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    files = [p for p in logs.rglob("*") if p.is_file()]
    assert files
    access = re.compile(rf"(GET|POST) /{GUARDED}/v1/\S* 401 |(GET|POST) /v1/\S* 401 ")
    saw_access_line = False
    for path in files:
        data = path.read_bytes()
        for name, key in KEYS.items():
            assert key.encode() not in data, f"key {name!r} appears in {path}"
        saw_access_line |= bool(access.search(data.decode(errors="replace")))
    assert saw_access_line, "Serve's access log has no line for the refused requests (the scan saw no requests)"


def test_which_failures_count_as_a_lost_replica():
    """Resubmitted: the replica actor died or is unreachable (a dead engine ends its replica). Not: the
    request's own fault, which vLLM answers with an error response instead."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError

    from deployments.ingress import _replica_lost

    assert _replica_lost(ActorDiedError())
    assert _replica_lost(ActorUnavailableError("unreachable", b"\0" * 16))
    assert _replica_lost(RayTaskError("serve_http", "tb", ActorDiedError()))
    assert not _replica_lost(RayTaskError("serve_http", "tb", ValueError("bad request")).as_instanceof_cause())
    assert not _replica_lost(ValueError("bad request"))


def test_lone_surrogates_are_found_anywhere_in_a_body():
    from deployments.ingress import _has_lone_surrogate

    assert _has_lone_surrogate(json.loads('{"messages": [{"content": "ok \\ud800"}]}'))
    assert _has_lone_surrogate(json.loads('{"\\udfff": 1}'))
    assert not _has_lone_surrogate({"prompt": "é 😀 \u0000", "stop": ["x"], "n": 1})


def test_integers_beyond_64_bits_are_refused_before_vllm():
    """vLLM 0.32 answers {"stream_interval": 2**73} with an empty 500 (a fuzz find); the ingress refuses it."""
    from deployments.ingress import _Refused, _json_object

    with pytest.raises(_Refused) as e:
        _json_object(b'{"model": "tiny", "messages": [], "stream_interval": 12598761270790066358190}')
    assert e.value.status == 400 and "64-bit" in e.value.message
    assert _json_object(b'{"seed": 9223372036854775807}') == {"seed": 2**63 - 1}


def test_a_non_object_structured_outputs_is_refused_before_vllm():
    """vLLM 0.32's chat validator calls .get() on it: {"structured_outputs": true} was a 500 (a fuzz find)."""
    from deployments.ingress import _Refused, _json_object

    with pytest.raises(_Refused) as e:
        _json_object(b'{"model": "tiny", "messages": [], "structured_outputs": true}')
    assert (e.value.status, e.value.param) == (400, "structured_outputs") and "must be an object" in e.value.message
    assert _json_object(b'{"structured_outputs": {"choice": ["a"]}}') == {"structured_outputs": {"choice": ["a"]}}


def test_errors_vllm_answers_outside_openais_format_are_rewritten():
    """A route the model's task lacks (embeddings on a generative model) is FastAPI's {"detail"}: a fuzz find."""
    from deployments.ingress import _as_openai_error

    err = json.loads(_as_openai_error(404, b'{"detail":"Not Found"}', "/v1/embeddings"))["error"]
    assert set(err) == {"message", "type", "param", "code"} and "/v1/embeddings is not served" in err["message"]
    assert _as_openai_error(400, b'{"error": {"message": "m", "type": "t", "param": null, "code": 400}}',
                            "/v1/completions") is None  # already OpenAI's
    assert _as_openai_error(400, b'{"type": "error", "error": {"type": "t", "message": "m"}}',
                            "/v1/messages") is None  # Anthropic's route keeps Anthropic's format
    assert _as_openai_error(200, b"{}", "/v1/embeddings") is None
