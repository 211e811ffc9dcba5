"""Request traces, the clip rule, the SLO and its per-request test: what the simulator and the bench share.

Trace files (``detect_kind`` tells them apart from the first line; ``read_rows`` reads one):

* Mooncake (JSON lines: ``timestamp`` ms, ``input_length``, ``output_length``, ``hash_ids``,
  one id per 512-token block, ``TRACE_BLOCK_TOKENS``).
* Azure LLM inference (CSV ``TIMESTAMP,ContextTokens,GeneratedTokens``; timestamps parsed
  from their first 26 characters): lengths and arrival times, no prefix information.
* Length tables (CSV with ``num_prefill_tokens,num_decode_tokens``: ShareGPT, arXiv):
  lengths only, in file order (each caller orders them with its own seeded stream).

``cluster.sim.workload`` turns rows into simulated requests (prefix hashes, time scale),
``cluster.bench.workload`` into prompts to send; both fit a request to ``max_model_len`` with
``clip`` and judge it against the ``SLO`` with ``meets_slo``, so a simulated run and a measured
one count the same requests as clipped and as good.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

TRACE_BLOCK_TOKENS = 512  # Mooncake hashes prompts in 512-token blocks
DEFAULT_TTFT_SLO_S = 2.0  # MLPerf Inference server scenario, Llama-2-70B: TTFT p99 2 s
DEFAULT_TPOT_SLO_S = 0.2  # and TPOT p99 200 ms
KINDS = ("mooncake", "azure", "length-table")


@dataclass(frozen=True)
class SLO:
    """Latency targets a request must meet to count toward goodput."""

    ttft_s: float = DEFAULT_TTFT_SLO_S
    tpot_s: float = DEFAULT_TPOT_SLO_S


def tpot_s(first_token_s: float, last_token_s: float, output_tokens: int) -> float | None:
    """Time per output token after the first: (last token − first token) / (output tokens − 1), the two
    times from any one origin (a TTFT and an end-to-end latency will do); None for a one-token output."""
    return (last_token_s - first_token_s) / (output_tokens - 1) if output_tokens > 1 else None


def meets_slo(ttft: float, tpot: float | None, slo: SLO) -> bool:
    """Whether a completed request met every target (a one-token request has no TPOT to miss)."""
    return ttft <= slo.ttft_s and (tpot is None or tpot <= slo.tpot_s)


@dataclass(frozen=True)
class Row:
    """One request as a trace file describes it."""

    input_len: int
    output_len: int
    timestamp_s: float | None = None  # seconds (absolute: subtract the first)
    hash_ids: tuple[int, ...] | None = None  # Mooncake: one id per TRACE_BLOCK_TOKENS of the prompt


def clip(prompt: int, output: int, max_model_len: int | None) -> tuple[int, int, bool]:
    """Fit one request into ``max_model_len``: (prompt, output, whether it was cut).

    The output keeps up to half the context and at least one token; the prompt keeps its head
    (and so the prefix it shares with other requests), loses its tail, and is never made longer
    than it was: the trace's prompt length is a fact about the request, and setting it to
    ``max_model_len − output`` instead would grow a short prompt whose long output was cut to
    half the context.
    """
    if not max_model_len or prompt + output <= max_model_len:
        return prompt, output, False
    output = max(1, min(output, max_model_len // 2))
    return max(1, min(prompt, max_model_len - output)), output, True


def detect_kind(path: str | Path) -> str:
    """``mooncake``, ``azure`` or ``length-table``, from the file's first line."""
    with open(path, encoding="utf-8") as f:
        first = f.readline().strip()
    if first.startswith("{"):
        return "mooncake"
    header = [h.strip() for h in first.split(",")]
    if "TIMESTAMP" in header and "ContextTokens" in header:
        return "azure"
    if "num_prefill_tokens" in header and "num_decode_tokens" in header:
        return "length-table"
    raise ValueError(f"{path}: not a trace kvpilot reads (Mooncake JSON lines, an Azure CSV, or a length table "
                     f"with num_prefill_tokens,num_decode_tokens); first line {first[:80]!r}")


def read_rows(path: str | Path, kind: str | None = None) -> tuple[str, list[Row]]:
    """(kind, every row of the file in file order)."""
    kind = kind or detect_kind(path)
    if kind == "mooncake":
        with open(path, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
        return kind, [Row(int(d["input_length"]), int(d["output_length"]), float(d["timestamp"]) / 1e3,
                          tuple(int(h) for h in d["hash_ids"])) for d in records]
    with open(path, newline="", encoding="utf-8") as f:
        records = list(csv.DictReader(f))
    if kind == "azure":
        return kind, [Row(int(r["ContextTokens"]), int(r["GeneratedTokens"]),
                          datetime.fromisoformat(r["TIMESTAMP"].strip()[:26]).timestamp()) for r in records]
    if kind == "length-table":
        return kind, [Row(int(r["num_prefill_tokens"]), int(r["num_decode_tokens"])) for r in records]
    raise ValueError(f"unknown trace kind {kind!r}; one of {', '.join(KINDS)}")
