"""What a replica measures of its own engine, for the router and the autoscaler: pure code.

Three facts the policies need and a user would otherwise have to type in (or copy from
another machine):

``itl_floor_s``
    The decode time of one engine step at low batch: one sequence's inter-token latency,
    the autoscaler's compute floor (``cluster.autoscaling.policy``).
``prefill_tokens_per_s``
    How many uncached prompt tokens the engine prefills per second: the ``kvpilot``
    routing policy drains its per-replica prefill queue at this speed.
``kv_capacity_tokens``
    KV-cache blocks × block size as the engine allocated them (not the plan's estimate).

``EngineCalibrator`` is fed by the replica's vLLM stat logger on every engine step
(``deployments/engine.py``) and keeps bounded windows, so its estimates follow the engine:

* ITL floor: each step whose sequences all decoded (no prompt finished prefilling in it)
  gives one sample, the smallest inter-token latency of the step, keyed by the step's batch
  (sequences that got a token). Samples go into buckets of batch 1, 2, 3–4, 5–8, ... (the last
  ``window`` of each). The floor is a low quantile (``floor_quantile``) of the batch-1 bucket
  once it holds ``min_samples``; before that, the line through the low quantiles of the two
  smallest filled buckets, read at batch 1 (decode steps grow with the batch, so a replica
  that is never idle still gets an estimate); with one filled bucket of batch at most
  ``low_batch``, its quantile (an upper bound); otherwise unknown (None).
* Prefill speed: each finished request whose computed prompt (prompt minus cached tokens)
  is at least ``min_prefill_tokens`` gives computed tokens / prefill time (scheduled to first
  token). Prefill time includes the decodes batched into the same steps and other requests'
  chunks, so the estimate is a high quantile (``prefill_quantile``) of the last ``window``
  rates: the requests that prefilled most alone. Unknown until ``min_samples``.
* KV capacity: set once from the engine's cache config.

``warmup_requests`` is the start-up measurement: before a replica takes traffic it runs
``min_samples`` lone prefills of distinct prompts and one lone decode, so both estimates exist
from the first request instead of the plan's (0.4-2.4 s per tiny CPU replica, measured; on a
GPU, 8 prefills of 512 tokens and 16 decode steps: about a second for a 70B TP=2 replica, an
estimate). Its steps feed only the calibrator, not the replica's metrics.

``choose`` picks, for one fact, an explicit override, else the measurement, else the plan's
estimate, and says which (``override``, ``measured``, ``plan``); ``SourceLog`` remembers the
last source per key so the caller logs only changes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

OVERRIDE, MEASURED, PLAN = "override", "measured", "plan"

# Keys a replica adds to its record_routing_stats / record_autoscaling_stats (absent: not yet measured).
ITL_FLOOR_KEY = "itl_floor_s"
PREFILL_KEY = "prefill_tokens_per_s"
KV_CAPACITY_KEY = "kv_capacity_tokens"


def quantile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation between order statistics; ``values`` non-empty."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _bucket(batch: int) -> int:
    """Batch 1 -> 0, 2 -> 1, 3..4 -> 2, 5..8 -> 3, ..."""
    return (batch - 1).bit_length()


@dataclass(frozen=True)
class Calibration:
    """One replica's measured facts; None: not measured (yet)."""

    itl_floor_s: float | None = None
    prefill_tokens_per_s: float | None = None
    kv_capacity_tokens: int | None = None

    def as_stats(self) -> dict[str, float]:
        """The keys to add to a replica's stats: only the facts that are known."""
        out: dict[str, float] = {}
        if self.itl_floor_s is not None:
            out[ITL_FLOOR_KEY] = float(self.itl_floor_s)
        if self.prefill_tokens_per_s is not None:
            out[PREFILL_KEY] = float(self.prefill_tokens_per_s)
        if self.kv_capacity_tokens is not None:
            out[KV_CAPACITY_KEY] = float(self.kv_capacity_tokens)
        return out


class EngineCalibrator:
    """Running estimates of one engine's ITL floor and prefill speed from its per-step stats (see the module doc)."""

    def __init__(self, window: int = 256, min_samples: int = 8, floor_quantile: float = 0.1,
                 prefill_quantile: float = 0.9, min_prefill_tokens: int = 128, low_batch: int = 4):
        if not (0 <= floor_quantile <= 1 and 0 <= prefill_quantile <= 1 and window >= min_samples >= 1):
            raise ValueError("EngineCalibrator: quantiles in [0, 1] and window >= min_samples >= 1")
        self.window, self.min_samples = window, min_samples
        self.floor_quantile, self.prefill_quantile = floor_quantile, prefill_quantile
        self.min_prefill_tokens, self.low_batch = min_prefill_tokens, low_batch
        self._decode: dict[int, deque[tuple[int, float]]] = {}  # bucket -> (batch, step ITL s)
        self._prefill: deque[float] = deque(maxlen=window)  # tokens/s of recent long-enough prefills
        self.kv_capacity_tokens: int | None = None
        self.steps_seen = 0

    # --- feeding ------------------------------------------------------------

    def observe_decode(self, batch: int, itl_s: float) -> None:
        """One all-decode engine step of ``batch`` sequences whose (smallest) inter-token latency was ``itl_s``."""
        if batch < 1 or not itl_s > 0:
            return
        b = _bucket(batch)
        q = self._decode.get(b)
        if q is None:
            q = self._decode[b] = deque(maxlen=self.window)
        q.append((batch, itl_s))

    def observe_prefill(self, computed_tokens: int, prefill_s: float) -> None:
        """One request's prefill: ``computed_tokens`` uncached prompt tokens in ``prefill_s`` (scheduled to first token)."""
        if computed_tokens >= self.min_prefill_tokens and prefill_s > 0:
            self._prefill.append(computed_tokens / prefill_s)

    def observe_step(self, itls: list[float], first_tokens: int, prompt_tokens: int) -> None:
        """One engine step as vLLM's iteration stats give it: the inter-token latencies of the sequences that
        decoded, how many got their first token, and the prompt tokens of those."""
        self.steps_seen += 1
        if itls and first_tokens == 0 and prompt_tokens == 0:
            self.observe_decode(len(itls), min(itls))

    # --- estimates ----------------------------------------------------------

    def itl_floor_s(self) -> float | None:
        filled = sorted(b for b, q in self._decode.items() if len(q) >= self.min_samples)
        if not filled:
            return None
        points = []
        for b in filled[:2]:
            q = self._decode[b]
            # the same low quantile of the batches and of the times: in a bucket's mix, small batches step fastest
            points.append((quantile([x for x, _ in q], self.floor_quantile),
                           quantile([y for _, y in q], self.floor_quantile)))
        (x0, y0) = points[0]
        if x0 <= 1.0:
            return y0
        if len(points) == 1:
            return y0 if x0 <= self.low_batch else None
        (x1, y1) = points[1]
        slope = max(0.0, (y1 - y0) / (x1 - x0)) if x1 > x0 else 0.0
        return max(y0 - slope * (x0 - 1.0), 0.25 * y0)  # never below a quarter of the smallest batch's

    def prefill_tokens_per_s(self) -> float | None:
        if len(self._prefill) < self.min_samples:
            return None
        return quantile(list(self._prefill), self.prefill_quantile)

    def snapshot(self) -> Calibration:
        return Calibration(self.itl_floor_s(), self.prefill_tokens_per_s(), self.kv_capacity_tokens)


WARMUP_PROMPT_TOKENS = 512  # a prefill long enough to be compute-bound, short enough to cost little


def warmup_requests(max_model_len: int, vocab_size: int, calibrator: EngineCalibrator,
                    prompt_tokens: int = WARMUP_PROMPT_TOKENS) -> list[tuple[list[int], int]]:
    """(prompt token ids, output tokens) of the start-up measurement, run one at a time.

    ``calibrator.min_samples`` prefills of ``prompt_tokens`` (at most ``max_model_len`` - 2) with one output
    token each, their prompts distinct from the first token on (no prefix-cache hit between them), then a
    one-token prompt decoding ``2 × min_samples`` tokens alone. A context too short for a prefill of
    ``calibrator.min_prefill_tokens`` gets the decode only.
    """
    if max_model_len < 2 or vocab_size < 2:
        return []
    low = 100 if vocab_size > 1000 else 0  # past the special tokens of most vocabularies
    span = vocab_size - low
    out: list[tuple[list[int], int]] = []
    length = min(prompt_tokens, max_model_len - 2)
    if length >= calibrator.min_prefill_tokens:
        for i in range(calibrator.min_samples):
            out.append(([low + (i + j * 7919) % span for j in range(length)], 1))
    out.append(([low + calibrator.min_samples % span], min(2 * calibrator.min_samples, max_model_len - 1)))
    return out


def choose(override: float | None, measured: float | None, plan: float | None) -> tuple[float | None, str]:
    """(value, source) for one fact: an explicit override, else the replica's measurement, else the plan's."""
    if override is not None:
        return override, OVERRIDE
    if measured is not None and measured > 0:
        return measured, MEASURED
    return plan, PLAN


class SourceLog:
    """The last source seen per key: ``changed`` is true the first time and whenever it differs."""

    def __init__(self) -> None:
        self._last: dict[str, str] = {}

    def changed(self, key: str, source: str) -> bool:
        if self._last.get(key) == source:
            return False
        self._last[key] = source
        return True

    def forget(self, key: str) -> None:
        self._last.pop(key, None)
