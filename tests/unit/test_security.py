"""API keys, token buckets and the ingress config section: pure, no Ray."""

from __future__ import annotations

import hashlib
import math

import pytest

from cluster.config import ClusterConfig, ConfigError
from cluster.serving.security import (
    API_KEYS_ENV,
    KeySourceError,
    KeyStore,
    RateLimiter,
    TokenBucket,
    bearer_token,
    load_keys,
    parse_keys,
)

KEY_A = "sk-kvpilot-aaaaaaaaaaaaaaaaaaaa"
KEY_B = "sk-kvpilot-bbbbbbbbbbbbbbbbbbbb"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_keys_from_file_and_env_are_kept_hashed(tmp_path):
    f = tmp_path / "keys"
    f.write_text(f"# team a\n{KEY_A}\n\n")
    store = load_keys(str(f), {API_KEYS_ENV: f" {KEY_B} ,,"})
    assert len(store) == 2
    assert store.digests == (hashlib.sha256(KEY_A.encode()).digest(), hashlib.sha256(KEY_B.encode()).digest())
    assert KEY_A.encode() not in b"".join(store.digests) and KEY_A not in repr(store)


def test_verify_answers_an_opaque_id_and_refuses_the_rest():
    store = KeyStore.of([KEY_A, KEY_B])
    a, b = store.verify(KEY_A), store.verify(KEY_B)
    assert a and b and a != b and KEY_A not in a
    assert store.verify(KEY_A + "x") is None
    assert store.verify(KEY_A[:-1]) is None
    assert store.verify("") is None and store.verify(None) is None
    assert KeyStore().verify(KEY_A) is None


def test_short_keys_and_unreadable_files_are_refused_without_echoing_the_key(tmp_path):
    with pytest.raises(KeySourceError) as e:
        parse_keys(f"{KEY_A},short-secret", API_KEYS_ENV)
    assert "key #2 has 12 characters" in str(e.value) and "short-secret" not in str(e.value)
    with pytest.raises(KeySourceError, match="cannot be read"):
        load_keys(str(tmp_path / "missing"), {})


def test_bearer_header_parsing():
    assert bearer_token(f"Bearer {KEY_A}") == KEY_A
    assert bearer_token(f"bearer   {KEY_A} ") == KEY_A
    assert bearer_token(f"Basic {KEY_A}") is None
    assert bearer_token("Bearer") is None and bearer_token(None) is None and bearer_token("") is None


def test_token_bucket_bursts_a_minute_then_refills_continuously():
    b = TokenBucket(60, now=0.0)  # one a second
    assert b.wait_s(60, 0.0) == 0
    b.take(60, 0.0)
    assert b.wait_s(1, 0.0) == pytest.approx(1.0)
    assert b.wait_s(1, 0.5) == pytest.approx(0.5)
    assert b.wait_s(1, 1.0) == 0
    assert b.wait_s(61, 1.0) == math.inf
    b.give_back(1000, 1.0)
    assert b.level(1.0) == 60  # refunds never exceed the capacity


def test_rate_limiter_requests_per_minute_per_client():
    clock = Clock()
    rl = RateLimiter(requests_per_minute=3, tokens_per_minute=None, clock=clock)
    assert all(rl.acquire("a", 10).allowed for _ in range(3))
    v = rl.acquire("a", 10)
    assert v.limit == "requests" and v.retry_after_s == pytest.approx(20.0)
    assert rl.acquire("b", 10).allowed  # another key has its own bucket
    clock.t += 19.99  # just short of the wait it named: still refused
    assert not rl.acquire("a", 10).allowed
    clock.t += 0.02
    assert rl.acquire("a", 10).allowed


def test_rate_limiter_tokens_take_both_or_neither_and_refund():
    clock = Clock()
    rl = RateLimiter(requests_per_minute=10, tokens_per_minute=600, clock=clock)
    assert rl.acquire("a", 500).allowed
    v = rl.acquire("a", 200)
    assert v.limit == "tokens" and v.retry_after_s == pytest.approx(10.0)
    rl.refund("a", 300)  # the first request used 200 of its 500
    assert rl.acquire("a", 200).allowed
    # the refused request took no request slot: 2 taken of 10, so 8 more fit
    assert sum(rl.acquire("a", 0).allowed for _ in range(10)) == 8


@pytest.mark.parametrize("seconds_per_request", [0.0, 0.5, 2.0, 7.5, 20.0])
def test_admitted_requests_stay_within_the_derived_budget_however_slow_they_are(seconds_per_request):
    from cluster.serving.security import most_admitted

    clock = Clock()
    rl = RateLimiter(requests_per_minute=8, tokens_per_minute=None, clock=clock)
    start, admitted = clock.t, 0
    for sent in range(1, 41):  # one client, each request taking seconds_per_request before the next is sent
        if rl.acquire("a", 1).allowed:
            admitted += 1
        assert min(sent, 8) <= admitted <= most_admitted(8, clock.t - start)  # the first 8 always pass
        clock.t += seconds_per_request
    if seconds_per_request >= 7.5:  # one refill per request at least: nothing is ever refused
        assert admitted == 40
    if seconds_per_request == 0.0:
        assert admitted == 8 == most_admitted(8, 0.0)


def test_unlimited_limiter_allows_everything():
    rl = RateLimiter(None, None)
    assert not rl.enabled and all(rl.acquire("a", 10**9).allowed for _ in range(1000))


MODEL = {"name": "m", "source": "TheBloke/Llama-2-70B-AWQ", "quantization": "awq", "accelerator": "A10G",
         "tensor_parallel_size": 2, "max_model_len": 4096}


def _errors(args: dict) -> list[str]:
    with pytest.raises(ConfigError) as e:
        ClusterConfig.from_args(args)
    return e.value.errors


def test_ingress_section_defaults_and_values():
    cfg = ClusterConfig.from_args({"models": [MODEL]})
    assert cfg.ingress.auth == "auto" and cfg.ingress.requests_per_minute is None
    assert cfg.ingress.max_body_bytes == 4 * 2**20 and cfg.ingress.replica_retries == 2
    assert cfg.models[0].limits.max_queued_requests is None
    cfg = ClusterConfig.from_args({"models": [{**MODEL, "limits": {"max_tokens": 256, "max_queued_requests": 8}}],
                                   "ingress": {"auth": "required", "api_keys_file": "/etc/kvpilot/keys",
                                               "requests_per_minute": 60, "tokens_per_minute": 10000}})
    assert cfg.models[0].limits.max_tokens == 256 and cfg.ingress.tokens_per_minute == 10000


@pytest.mark.parametrize(("args", "expected"), [
    ({"ingress": {"requests_per_minute": 0}},
     "args.ingress.requests_per_minute: 0: Input should be greater than or equal to 1"),
    ({"ingress": {"max_body_bytes": 10}},
     "args.ingress.max_body_bytes: 10: Input should be greater than or equal to 1024"),
    ({"ingress": {"auth": "maybe"}}, "args.ingress.auth: 'maybe': Input should be 'auto', 'required' or 'off'"),
    ({"ingress": {"auth": "off", "api_keys_file": "/k"}}, "args.ingress.api_keys_file: '/k' is set but auth is off"),
    ({"ingress": {"replica_retries": 9}}, "args.ingress.replica_retries: 9: Input should be less than or equal to 5"),
    ({"ingress": {"api_keys": ["sk-1"]}}, "args.ingress.api_keys: ['sk-1'] is under an unknown field"),
    ({"models": [{**MODEL, "limits": {"max_tokens": 0}}]},
     "args.models[0].limits.max_tokens: 0: Input should be greater than or equal to 1"),
    ({"models": [{**MODEL, "limits": {"max_queued_requests": -5}}]},
     "args.models[0].limits.max_queued_requests: -5: Input should be greater than or equal to 1"),
    ({"models": [{**MODEL, "limits": {"first_token_timeout_s": 0}}]},
     "args.models[0].limits.first_token_timeout_s: 0: Input should be greater than 0"),
])
def test_bad_ingress_values_are_refused_with_path_and_value(args, expected):
    (err,) = _errors({"models": [MODEL], **args})
    assert err.startswith(expected), err
