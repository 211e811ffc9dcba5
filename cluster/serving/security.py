"""API keys and per-key rate limits for the OpenAI endpoint. Pure: no Ray, no vLLM.

Keys come from a file (one per line, ``#`` comments; a mounted Kubernetes Secret is such a
file) and from the ``KVPILOT_API_KEYS`` environment variable (comma-separated; the Helm
chart sets it from its Secret). Only their SHA-256 digests are kept; a presented key is
hashed and compared with every stored digest in constant time (``hmac.compare_digest``),
so neither the match position nor the key's length shows in the timing.

Limits are token buckets that hold a minute's worth and refill continuously: a client may
burst up to its per-minute limit, then gets ``retry_after_s`` until enough has refilled.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

API_KEYS_ENV = "KVPILOT_API_KEYS"  # comma-separated keys; the Helm chart delivers it
ADMIN_API_KEYS_ENV = "KVPILOT_ADMIN_API_KEYS"  # comma-separated admin keys (also accepted as ordinary keys)
MIN_KEY_CHARS = 16  # shorter keys are guessable by brute force over the network
ANONYMOUS = "anonymous"  # the one client identity when auth is off: limits apply to all requests together


class KeySourceError(ValueError):
    """A key source is unreadable or holds a bad key; the message never contains a key."""


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def parse_keys(text: str, source: str) -> list[str]:
    """Keys separated by commas or newlines; blank entries and ``#`` comment lines are skipped."""
    keys = []
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        for part in line.split(","):
            key = part.strip()
            if not key:
                continue
            if len(key) < MIN_KEY_CHARS:
                raise KeySourceError(f"{source}: key #{len(keys) + 1} has {len(key)} characters; use at least "
                                f"{MIN_KEY_CHARS} (e.g. `openssl rand -hex 24`)")
            if any(c.isspace() for c in key):
                raise KeySourceError(f"{source}: key #{len(keys) + 1} contains whitespace")
            keys.append(key)
    return keys


@dataclass(frozen=True)
class KeyStore:
    """SHA-256 digests of the accepted keys; ``verify`` answers with an opaque client id."""

    digests: tuple[bytes, ...] = ()
    admin_digests: tuple[bytes, ...] = ()  # a subset of digests: keys that may also change what is served

    @classmethod
    def of(cls, keys: Iterable[str], admin_keys: Iterable[str] = ()) -> KeyStore:
        admins = tuple(dict.fromkeys(digest(k) for k in admin_keys))
        return cls(tuple(dict.fromkeys((*(digest(k) for k in keys), *admins))), admins)

    def is_admin(self, client: str | None) -> bool:
        """Whether the client id ``verify`` returned belongs to an admin key."""
        if not client:
            return False
        try:
            d = bytes.fromhex(client)
        except ValueError:
            return False
        found = False
        for stored in self.admin_digests:
            found |= hmac.compare_digest(d, stored)
        return found

    def __len__(self) -> int:
        return len(self.digests)

    def verify(self, presented: str | None) -> str | None:
        """The client id (the key's digest in hex) when ``presented`` is an accepted key, else None."""
        if not presented:
            return None
        d = digest(presented)
        found = False
        for stored in self.digests:  # no early exit: every request costs the same
            found |= hmac.compare_digest(d, stored)
        return d.hex() if found else None


def _file_keys(file: str | None, field: str) -> list[str]:
    if file is None:
        return []
    try:
        text = Path(file).read_text(encoding="utf-8")
    except OSError as e:
        raise KeySourceError(f"{field} {file!r} cannot be read ({e.strerror})") from e
    return parse_keys(text, f"{field} {file!r}")


def load_keys(file: str | None, environ: Mapping[str, str], admin_file: str | None = None) -> KeyStore:
    """Every key from ``file`` (when given) and from ``KVPILOT_API_KEYS`` in ``environ``; admin keys from
    ``admin_file`` and ``KVPILOT_ADMIN_API_KEYS`` (accepted as keys too)."""
    keys = _file_keys(file, "api_keys_file")
    keys += parse_keys(environ.get(API_KEYS_ENV, ""), f"environment variable {API_KEYS_ENV}")
    admins = _file_keys(admin_file, "admin_api_keys_file")
    admins += parse_keys(environ.get(ADMIN_API_KEYS_ENV, ""), f"environment variable {ADMIN_API_KEYS_ENV}")
    return KeyStore.of(keys, admins)


def bearer_token(authorization: str | None) -> str | None:
    """The credential of an ``Authorization: Bearer <key>`` header (scheme case-insensitive)."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


class TokenBucket:
    """Holds up to ``per_minute`` units and refills at ``per_minute / 60`` units a second."""

    def __init__(self, per_minute: float, now: float):
        self.capacity = float(per_minute)
        self._rate = self.capacity / 60.0
        self._level = self.capacity
        self._stamp = now

    def level(self, now: float) -> float:
        if now > self._stamp:
            self._level = min(self.capacity, self._level + (now - self._stamp) * self._rate)
            self._stamp = now
        return self._level

    def wait_s(self, amount: float, now: float) -> float:
        """Seconds until ``amount`` is available: 0 now, ``inf`` if it exceeds the capacity."""
        if amount > self.capacity:
            return math.inf
        return max(0.0, (amount - self.level(now)) / self._rate)

    def take(self, amount: float, now: float) -> None:
        self._level = self.level(now) - amount

    def give_back(self, amount: float, now: float) -> None:
        self._level = min(self.capacity, self.level(now) + amount)


def most_admitted(per_minute: int, elapsed_s: float, cost: float = 1.0) -> int:
    """The most requests of ``cost`` units a fresh ``per_minute`` bucket lets through within ``elapsed_s``.

    The full bucket plus what refills meanwhile: a test that sends requests until one is
    refused measures its own elapsed time and asserts against this, instead of assuming the
    requests finish before the first refill (60 / ``per_minute`` seconds).
    """
    return int((per_minute + max(0.0, elapsed_s) * per_minute / 60.0) // cost)


@dataclass(frozen=True)
class Verdict:
    """A rate-limit decision: ``limit`` names the bucket that refused (None: allowed)."""

    limit: str | None = None  # "requests" or "tokens"
    retry_after_s: float = 0.0

    @property
    def allowed(self) -> bool:
        return self.limit is None


class RateLimiter:
    """Per-client request and token buckets; a request takes from both or from neither.

    Tokens are charged up front (prompt + ``n × max_tokens``, what the request may use) and the
    unused part is given back with ``refund`` when it finishes, as OpenAI's limits do.
    """

    def __init__(self, requests_per_minute: int | None, tokens_per_minute: int | None,
                 clock: Callable[[], float] = time.monotonic):
        self._rpm = requests_per_minute
        self._tpm = tokens_per_minute
        self._clock = clock
        # One entry per client id; ids are accepted keys (bounded by the key store) or ANONYMOUS.
        self._buckets: dict[str, tuple[TokenBucket | None, TokenBucket | None]] = {}

    @property
    def enabled(self) -> bool:
        return self._rpm is not None or self._tpm is not None

    def _of(self, client: str, now: float) -> tuple[TokenBucket | None, TokenBucket | None]:
        pair = self._buckets.get(client)
        if pair is None:
            pair = (TokenBucket(self._rpm, now) if self._rpm else None,
                    TokenBucket(self._tpm, now) if self._tpm else None)
            self._buckets[client] = pair
        return pair

    def check(self, client: str, tokens: int = 0) -> Verdict:
        """Would one request of ``tokens`` be allowed now? Takes nothing."""
        now = self._clock()
        requests, token_bucket = self._of(client, now)
        if requests is not None and (w := requests.wait_s(1, now)) > 0:
            return Verdict("requests", w)
        if token_bucket is not None and tokens and (w := token_bucket.wait_s(tokens, now)) > 0:
            return Verdict("tokens", w)
        return Verdict()

    def acquire(self, client: str, tokens: int) -> Verdict:
        """Take one request and ``tokens`` tokens if both are available; else take nothing."""
        verdict = self.check(client, tokens)
        if verdict.allowed:
            now = self._clock()
            requests, token_bucket = self._of(client, now)
            if requests is not None:
                requests.take(1, now)
            if token_bucket is not None:
                token_bucket.take(tokens, now)
        return verdict

    def refund(self, client: str, tokens: int) -> None:
        """Give back tokens charged but not used (the output stopped before ``max_tokens``)."""
        if tokens > 0 and self._tpm:
            now = self._clock()
            bucket = self._of(client, now)[1]
            if bucket is not None:
                bucket.give_back(tokens, now)

    def token_capacity(self) -> int | None:
        return self._tpm
