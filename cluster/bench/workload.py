"""What the benchmark sends: request lengths from a trace or a fixed shape, and their prompts.

Sources (``load_rows`` picks one from the file):

* Azure LLM inference trace (CSV ``TIMESTAMP,ContextTokens,GeneratedTokens``): lengths and
  arrival times, no prompt content.
* Length tables (CSV ``num_prefill_tokens,num_decode_tokens,...``: ShareGPT, arXiv):
  lengths only, rows in a seeded random order; pair them with ``--rate`` or ``--concurrency``.
* Mooncake (JSON lines ``timestamp`` ms, ``input_length``, ``output_length``, ``hash_ids``,
  one id per 512-token block): prompts are synthesized so that each hash id always becomes
  the same block of tokens, so requests whose ``hash_ids`` share a prefix send prompts that
  share that prefix, and the engine's prefix cache sees the sharing the trace describes.
* Synthetic: every request ``input_len`` prompt tokens and ``output_len`` output tokens.

Lengths can be scaled down (by one factor for prompts, outputs and Mooncake's block
size) so a long-context trace fits a small model; what is still too long is clipped by
``cluster.traces.clip``, the simulator's rule too (the output keeps up to half of
``max_model_len``, the prompt loses its tail, keeping its shared head). Trace files are read by
``cluster.traces``. ``Workload.scale`` says what was done.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cluster.traces import TRACE_BLOCK_TOKENS, Row, clip, read_rows

# Token ids drawn for synthetic prompts when no tokenizer is given: valid in any vocabulary
# of 480+ entries (the tiny fixtures' tokenizer has 491) and clear of the usual special ids (0-3).
DEFAULT_TOKEN_ID_RANGE = (16, 480)
AUTO_SCALE_QUANTILE = 0.99  # auto scaling fits this quantile of prompt+output; the rest is clipped
# Seeds of the three independent random streams: per hash id, per request, per row order.
_HASH_STREAM, _UNIQUE_STREAM, _ORDER_STREAM = 1, 2, 3

# Plain words for text prompts (chat endpoints, servers that refuse token ids).
_WORDS = (
    "time year people way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work government number night point "
    "home water room mother area money story fact month lot right study book eye job word business issue "
    "side kind head house service friend father power hour game line end member law car city community name "
    "president team minute idea kid body information back parent face others level office door health person "
    "art war history party result change morning reason research girl guy moment air teacher force education"
).split()


@dataclass(frozen=True)
class RequestSpec:
    """One request to send: its prompt (token ids or text), output length and arrival offset."""

    index: int
    prompt: list[int] | str
    input_len: int  # intended prompt tokens (text prompts: words, the server's count may differ)
    output_len: int
    arrival_s: float | None = None  # offset from the start; None in closed-loop runs
    hash_ids: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Scaling:
    """How lengths were changed to fit the model."""

    factor: float = 1.0
    reason: str = "none"  # "none", "--scale-lengths", "auto: fit max_model_len N"
    clipped: int = 0  # requests cut further to fit max_model_len
    max_model_len: int | None = None
    block_tokens: int | None = None  # Mooncake: tokens each hash id stands for after scaling

    def describe(self) -> str:
        parts = [f"lengths × {self.factor:.4g} ({self.reason})"]
        if self.clipped:
            parts.append(f"{self.clipped} requests clipped to max_model_len {self.max_model_len}")
        if self.block_tokens is not None:
            parts.append(f"{self.block_tokens} tokens per hash id (trace: {TRACE_BLOCK_TOKENS})")
        return "; ".join(parts)


@dataclass
class Workload:
    name: str  # "synthetic", "azure", "mooncake", "length-table"
    source: str
    requests: list[RequestSpec]
    has_timestamps: bool
    scale: Scaling = field(default_factory=Scaling)
    prompt_format: str = "token-ids"

    def describe(self) -> dict:
        ins = [r.input_len for r in self.requests] or [0]
        outs = [r.output_len for r in self.requests] or [0]
        return {
            "name": self.name,
            "source": self.source,
            "num_requests": len(self.requests),
            "prompt_format": self.prompt_format,
            "input_len_mean": float(np.mean(ins)),
            "input_len_max": int(max(ins)),
            "output_len_mean": float(np.mean(outs)),
            "output_len_max": int(max(outs)),
            "scale_factor": self.scale.factor,
            "scale_reason": self.scale.reason,
            "clipped": self.scale.clipped,
            "max_model_len": self.scale.max_model_len,
            "block_tokens": self.scale.block_tokens,
            "scaling": self.scale.describe(),
        }


# --- reading traces ------------------------------------------------------------


def load_rows(path: str | Path, kind: str | None = None, seed: int = 0) -> tuple[str, list[Row]]:
    """Every row of a trace file (``cluster.traces.read_rows``), in trace order (length tables:
    a seeded random order, numpy's stream, so a bench run's rows do not depend on the simulator's)."""
    kind, rows = read_rows(path, kind)
    if kind == "length-table":
        order = np.random.default_rng([seed, _ORDER_STREAM]).permutation(len(rows))
        rows = [rows[i] for i in order]
    return kind, rows


# --- scaling -------------------------------------------------------------------


def auto_scale_factor(rows: list[Row], max_model_len: int) -> float:
    """The factor (≤ 1) that makes the 99th percentile of prompt + output fit ``max_model_len``."""
    if not rows:
        return 1.0
    totals = np.array([r.input_len + r.output_len for r in rows], dtype=float)
    q = float(np.quantile(totals, AUTO_SCALE_QUANTILE))
    return min(1.0, max_model_len / q) if q > 0 else 1.0


# --- prompts -------------------------------------------------------------------


class PromptSynth:
    """Deterministic prompts: the same hash id always gives the same block, unique tails differ.

    ``token-ids`` prompts are lists of ids drawn uniformly from ``token_id_range`` (exact
    lengths); ``text`` prompts are words, one per intended token (lengths approximate).
    """

    def __init__(self, prompt_format: str = "token-ids", token_id_range: tuple[int, int] = DEFAULT_TOKEN_ID_RANGE,
                 seed: int = 0):
        if prompt_format not in ("token-ids", "text"):
            raise ValueError(f"prompt format must be token-ids or text, got {prompt_format!r}")
        lo, hi = token_id_range
        if not 0 <= lo < hi:
            raise ValueError(f"token id range must be 0 <= LO < HI, got {lo}:{hi}")
        self.prompt_format, self.lo, self.hi, self.seed = prompt_format, lo, hi, seed

    def _ids(self, key: list[int], n: int) -> np.ndarray:
        if self.prompt_format == "token-ids":
            return np.random.default_rng([self.seed, *key]).integers(self.lo, self.hi, n)
        return np.random.default_rng([self.seed, *key]).integers(0, len(_WORDS), n)

    def block(self, hash_id: int, block_tokens: int) -> np.ndarray:
        return self._ids([_HASH_STREAM, hash_id], block_tokens)

    def unique(self, index: int, n: int) -> np.ndarray:
        return self._ids([_UNIQUE_STREAM, index], n)

    def prompt(self, index: int, input_len: int, hash_ids: tuple[int, ...] | None = None,
               block_tokens: int = TRACE_BLOCK_TOKENS) -> list[int] | str:
        parts: list[np.ndarray] = []
        have = 0
        for h in hash_ids or ():
            if have >= input_len:
                break
            parts.append(self.block(h, block_tokens))
            have += block_tokens
        if have < input_len:
            parts.append(self.unique(index, input_len - have))
        ids = np.concatenate(parts)[:input_len] if parts else np.zeros(0, dtype=np.int64)
        if self.prompt_format == "token-ids":
            return ids.tolist()
        return " ".join(_WORDS[i] for i in ids)


# --- building a workload ---------------------------------------------------------


def build_workload(
    *,
    trace: str | Path | None = None,
    num_requests: int = 256,
    offset: int = 0,
    input_len: int = 128,
    output_len: int = 128,
    scale_lengths: float | None = None,
    max_model_len: int | None = None,
    block_tokens: int | None = None,
    prompt_format: str = "token-ids",
    token_id_range: tuple[int, int] = DEFAULT_TOKEN_ID_RANGE,
    seed: int = 0,
) -> Workload:
    """Rows → scaled, clipped lengths → prompts. Arrival offsets are added by the runner."""
    if num_requests < 1:
        raise ValueError(f"number of requests must be >= 1, got {num_requests}")
    if trace is None:
        if input_len < 1 or output_len < 1:
            raise ValueError(f"input and output lengths must be >= 1, got {input_len} and {output_len}")
        name, source, rows = "synthetic", f"input {input_len}, output {output_len}", [
            Row(input_len, output_len) for _ in range(num_requests)]
    else:
        name, all_rows = load_rows(trace, seed=seed)
        source = str(trace)
        if offset < 0 or offset >= len(all_rows):
            raise ValueError(f"trace offset {offset} is outside the trace's {len(all_rows)} rows")
        rows = all_rows[offset:offset + num_requests]

    if scale_lengths is not None:
        if scale_lengths <= 0:
            raise ValueError(f"--scale-lengths must be > 0, got {scale_lengths}")
        factor, reason = scale_lengths, "--scale-lengths"
    elif max_model_len is not None and trace is not None:
        factor = auto_scale_factor(rows, max_model_len)
        reason = f"auto: p{AUTO_SCALE_QUANTILE * 100:.0f} of prompt+output fits max_model_len {max_model_len}"
        if factor == 1.0:
            reason = "none needed"
    else:
        factor, reason = 1.0, "none"

    has_hashes = any(r.hash_ids for r in rows)
    blk = (block_tokens or max(1, round(TRACE_BLOCK_TOKENS * factor))) if has_hashes else None
    synth = PromptSynth(prompt_format, token_id_range, seed)
    specs, clipped = [], 0
    t0 = min((r.timestamp_s for r in rows if r.timestamp_s is not None), default=None)
    for i, r in enumerate(rows):
        n_in = max(1, round(r.input_len * factor))
        n_out = max(1, round(r.output_len * factor))
        n_in, n_out, was_clipped = clip(n_in, n_out, max_model_len)
        clipped += was_clipped
        arrival = None if r.timestamp_s is None else r.timestamp_s - t0
        prompt = synth.prompt(offset + i, n_in, r.hash_ids, blk or TRACE_BLOCK_TOKENS)
        specs.append(RequestSpec(i, prompt, n_in, n_out, arrival, r.hash_ids))
    scale = Scaling(factor, reason, clipped, max_model_len, blk)
    has_ts = all(r.timestamp_s is not None for r in rows)
    return Workload(name, source, specs, has_ts, scale, prompt_format)


def parse_token_id_range(text: str) -> tuple[int, int]:
    """``LO:HI`` (HI exclusive)."""
    try:
        lo, hi = (int(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"--token-id-range must be LO:HI, got {text!r}") from None
    if not 0 <= lo < hi:
        raise ValueError(f"--token-id-range must satisfy 0 <= LO < HI, got {text!r}")
    return lo, hi


def token_id_range_from_tokenizer(path: str) -> tuple[int, int]:
    """Ids above the tokenizer's special tokens, below its vocabulary size."""
    from transformers import AutoTokenizer  # only when --tokenizer is given

    tok = AutoTokenizer.from_pretrained(path)
    special = sorted(i for i in tok.all_special_ids if i is not None)
    lo = max([i for i in special if i < 1000], default=-1) + 1  # special ids at the start (Llama-2: 0-2)
    hi = min([len(tok)] + [i for i in special if i >= lo])  # and at the end (Llama-3: 128000+)
    if lo >= hi:
        raise ValueError(f"tokenizer {path} leaves no ordinary token ids (vocabulary {len(tok)})")
    return lo, hi
