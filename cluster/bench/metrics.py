"""Per-request measurements and their summary, as the field defines them.

* TTFT: request sent → first streamed chunk with a choice.
* ITL: gaps between successive streamed chunks, pooled over all requests (vLLM's
  ``bench serve`` convention: a server that coalesces several tokens into one chunk
  shows fewer, longer gaps; ``tokens_per_chunk`` in the summary shows how much).
* TPOT: ``(latency − TTFT) / (output tokens − 1)`` per request (requests with one
  output token have none).
* E2E: request sent → stream finished.
* Throughput: tokens of completed requests over the run's duration (first send →
  last completion). Goodput: completed requests per second that met every SLO
  (TTFT ≤ ``slo.ttft_s`` and TPOT ≤ ``slo.tpot_s``).

Percentiles are numpy's linear interpolation, as vLLM's benchmark computes them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from cluster.traces import SLO, meets_slo, tpot_s

DEFAULT_PERCENTILES = (50.0, 90.0, 95.0, 99.0)


@dataclass
class RequestRecord:
    """One request's outcome. Times are seconds; ``start_s`` from the run's start."""

    index: int
    start_s: float
    input_len: int  # intended prompt tokens
    output_len: int  # requested output tokens (max_tokens)
    ok: bool = False
    error: str | None = None  # kind: "http_503", "stream_error", an exception class name
    error_message: str | None = None
    ttft_s: float | None = None
    latency_s: float | None = None
    chunk_times_s: list[float] = field(default_factory=list)  # arrival of each chunk, from start_s
    prompt_tokens: int | None = None  # from the server's usage
    output_tokens: int | None = None  # from usage; the chunk count when the server sends none
    cached_tokens: int | None = None
    usage_reported: bool = False

    @property
    def itl_s(self) -> list[float]:
        t = self.chunk_times_s
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.output_tokens is None:
            return None
        return tpot_s(self.ttft_s, self.latency_s, self.output_tokens)

    @property
    def end_s(self) -> float | None:
        return None if self.latency_s is None else self.start_s + self.latency_s

    def meets(self, slo: SLO) -> bool:
        return self.ok and meets_slo(self.ttft_s, self.tpot_s, slo)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tpot_s"] = self.tpot_s
        return d


def distribution(values_s: list[float] | np.ndarray, percentiles: tuple[float, ...] = DEFAULT_PERCENTILES,
                 ) -> dict[str, float | None]:
    """Mean, std, min, max and percentiles, in milliseconds; None for an empty sample."""
    keys = ["mean", "std", "min", "max"] + [f"p{p:g}" for p in percentiles]
    v = np.asarray(values_s, dtype=float) * 1000.0
    if v.size == 0:
        return dict.fromkeys(keys)
    out = {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "max": float(v.max())}
    for p, q in zip(percentiles, np.percentile(v, percentiles)):
        out[f"p{p:g}"] = float(q)
    return out


def run_duration(records: list[RequestRecord]) -> float:
    """First send → last completion (s), over every request that ended."""
    ends = [r.end_s for r in records if r.end_s is not None]
    if not records or not ends:
        return 0.0
    return max(ends) - min(r.start_s for r in records)


def summarize(records: list[RequestRecord], slo: SLO = SLO(), duration_s: float | None = None,
              percentiles: tuple[float, ...] = DEFAULT_PERCENTILES) -> dict[str, Any]:
    """The numbers a serving benchmark reports, from the per-request records."""
    done = [r for r in records if r.ok]
    dur = run_duration(records) if duration_s is None else duration_s
    out_tokens = sum(r.output_tokens or 0 for r in done)
    in_tokens = sum((r.prompt_tokens if r.prompt_tokens is not None else r.input_len) for r in done)
    good = sum(r.meets(slo) for r in done)
    chunks = sum(len(r.chunk_times_s) for r in done)
    errors = Counter(r.error for r in records if not r.ok)
    per_s = (lambda x: x / dur) if dur > 0 else (lambda x: 0.0)
    itl = [g for r in done for g in r.itl_s]
    return {
        "requests": len(records),
        "completed": len(done),
        "failed": len(records) - len(done),
        "errors": dict(sorted(errors.items(), key=lambda kv: (-kv[1], str(kv[0])))),
        "error_examples": {k: next(r.error_message for r in records if r.error == k) for k in errors},
        "duration_s": dur,
        "request_throughput": per_s(len(done)),
        "output_throughput": per_s(out_tokens),
        "total_token_throughput": per_s(out_tokens + in_tokens),
        "prompt_tokens": in_tokens,
        "output_tokens": out_tokens,
        "cached_tokens": sum(r.cached_tokens or 0 for r in done),
        "output_len_mismatches": sum(1 for r in done if r.output_tokens != r.output_len),
        "usage_missing": sum(1 for r in done if not r.usage_reported),
        "tokens_per_chunk": out_tokens / chunks if chunks else None,
        "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s},
        "goodput": per_s(good),
        "slo_attainment": good / len(records) if records else 0.0,
        "ttft_ms": distribution([r.ttft_s for r in done], percentiles),
        "tpot_ms": distribution([t for r in done if (t := r.tpot_s) is not None], percentiles),
        "itl_ms": distribution(itl, percentiles),
        "e2e_ms": distribution([r.latency_s for r in done], percentiles),
    }


def throughput_timeline(records: list[RequestRecord], bin_s: float | None = None) -> dict[str, Any]:
    """Output tokens per second in time bins, spreading each request's tokens over its chunks."""
    dur = run_duration(records)
    if dur <= 0:
        return {"bin_s": bin_s or 1.0, "t_s": [], "output_tok_s": [], "in_flight": []}
    bin_s = bin_s or max(0.1, dur / 60)
    n = int(np.ceil(dur / bin_s)) or 1
    t0 = min(r.start_s for r in records)
    tokens = np.zeros(n)
    in_flight = np.zeros(n)
    for r in records:
        if r.ok and r.chunk_times_s:
            w = (r.output_tokens or len(r.chunk_times_s)) / len(r.chunk_times_s)
            idx = np.minimum(((r.start_s - t0 + np.asarray(r.chunk_times_s)) / bin_s).astype(int), n - 1)
            np.add.at(tokens, idx, w)
        if r.end_s is not None:
            a, b = int((r.start_s - t0) / bin_s), min(int((r.end_s - t0) / bin_s), n - 1)
            in_flight[a:b + 1] += 1
    return {"bin_s": bin_s, "t_s": [(i + 0.5) * bin_s for i in range(n)],
            "output_tok_s": (tokens / bin_s).tolist(), "in_flight": in_flight.tolist()}
