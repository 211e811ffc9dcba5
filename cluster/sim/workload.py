"""Request traces for the simulator: Mooncake, Azure, and length tables with synthetic arrivals.

Every loader returns a ``Workload``: requests sorted by arrival (seconds from the
first), each with its prompt and output lengths and a recipe for the chained
hashes of its prompt's full 16-token KV blocks, so the simulated prefix cache
shares exactly what the trace says is shared:

* Mooncake (JSON lines: ``timestamp`` ms, ``input_length``, ``output_length``,
  ``hash_ids``, one id per 512-token block): each 512-token block becomes 32
  chained 16-token blocks keyed by the whole id prefix up to it, so equal
  ``hash_ids`` prefixes give equal vLLM block prefixes. The blocks of a last,
  partial 512-token block are unique to the request.
* Azure (CSV ``TIMESTAMP,ContextTokens,GeneratedTokens``; timestamps parsed from
  their first 26 characters): no prefix information, so every block is unique.
* Length tables (CSV with ``num_prefill_tokens,num_decode_tokens``: ShareGPT,
  arXiv): rows in a seeded random order, arrivals Poisson or Gamma (``cv``) at
  ``rate`` requests/s, unique blocks.

``time_scale`` X divides arrival times by X (X = 2 replays twice as fast).
Requests longer than ``max_model_len`` are clipped: the output is kept (up to
half the length), the prompt is cut to fit, keeping its head (and so its shared
prefix); ``Workload.clipped`` says how many.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from datetime import datetime
from itertools import chain
from pathlib import Path

from cluster.hardware import GPU_BLOCK_SIZE

BLOCK_TOKENS = GPU_BLOCK_SIZE  # the simulated replicas are GPUs: vLLM caches prefixes in blocks of this
TRACE_BLOCK_TOKENS = 512  # Mooncake hashes prompts in 512-token blocks
SUB_BLOCKS = TRACE_BLOCK_TOKENS // BLOCK_TOKENS
UNIQUE_BASE = 1 << 40  # keys above this are unique to one request; Mooncake chain keys stay far below
UNIQUE_STRIDE = 1 << 16  # blocks per request in the unique key space (about a million tokens)


@dataclass(slots=True)
class TraceRequest:
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    index: int
    chain_ids: tuple[int, ...] = ()  # Mooncake: interned id of each full shared 512-token prefix
    adapter: str | None = None  # the LoRA adapter it names (None: the base model; cluster.sim.lora)

    def block_hashes(self) -> tuple[int, ...]:
        """Chained keys of the prompt's full 16-token blocks (what vLLM's prefix cache hashes)."""
        n_full = self.prompt_tokens // BLOCK_TOKENS
        shared = [range(c * SUB_BLOCKS, c * SUB_BLOCKS + SUB_BLOCKS) for c in self.chain_ids]
        n_shared = min(n_full, len(self.chain_ids) * SUB_BLOCKS)
        base = UNIQUE_BASE + self.index * UNIQUE_STRIDE
        keys = tuple(chain(*shared, range(base, base + n_full - n_shared)))
        return keys[:n_full]


@dataclass
class Workload:
    name: str
    requests: list[TraceRequest]
    source: str
    clipped: int = 0
    clipped_tokens: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        n = len(self.requests)
        span = self.requests[-1].arrival_s - self.requests[0].arrival_s if n else 0.0
        return {
            "name": self.name,
            "source": self.source,
            "requests": n,
            "span_s": round(span, 3),
            "rate_rps": round(n / span, 3) if span > 0 else None,
            "prompt_mean": round(sum(r.prompt_tokens for r in self.requests) / n, 1) if n else 0,
            "output_mean": round(sum(r.output_tokens for r in self.requests) / n, 1) if n else 0,
            "clipped": self.clipped,
            "clipped_prompt_tokens": self.clipped_tokens,
            "notes": self.notes,
        }


def _clip(prompt: int, output: int, max_model_len: int | None) -> tuple[int, int, int]:
    """(prompt, output, prompt tokens removed) so that prompt + output <= max_model_len."""
    if not max_model_len or prompt + output <= max_model_len:
        return prompt, output, 0
    output = min(output, max_model_len // 2)
    new_prompt = max(1, min(prompt, max_model_len - output))
    return new_prompt, output, prompt - new_prompt


def _finish(name: str, source: str, raw: list[tuple[float, int, int, tuple[int, ...]]], *, time_scale: float,
            max_requests: int | None, max_model_len: int | None, notes: list[str]) -> Workload:
    raw.sort(key=lambda r: r[0])
    if max_requests is not None:
        raw = raw[:max_requests]
    if time_scale <= 0:
        raise ValueError(f"time_scale: {time_scale} must be > 0")
    t0 = raw[0][0] if raw else 0.0
    reqs, clipped, clipped_tokens = [], 0, 0
    for i, (t, p, o, chain_ids) in enumerate(raw):
        p2, o2, cut = _clip(max(1, p), max(1, o), max_model_len)
        if (p2, o2) != (max(1, p), max(1, o)):
            clipped += 1
            clipped_tokens += cut
        reqs.append(TraceRequest((t - t0) / time_scale, p2, o2, i, chain_ids))
    if time_scale != 1:
        notes.append(f"arrival times divided by {time_scale:g} (--time-scale)")
    if clipped:
        notes.append(f"{clipped} of {len(reqs)} requests clipped to max_model_len {max_model_len} "
                     f"({clipped_tokens:,} prompt tokens cut from their tails)")
    return Workload(name, reqs, source, clipped, clipped_tokens, notes)


def load_mooncake(path: str | Path, *, time_scale: float = 1.0, max_requests: int | None = None,
                  max_model_len: int | None = None) -> Workload:
    interned: dict[tuple[int, int], int] = {}
    raw = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            d = json.loads(line)
            p = int(d["input_length"])
            ids = d["hash_ids"]
            full = min(len(ids), p // TRACE_BLOCK_TOKENS)  # a last partial 512-token block stays unique
            parent, chain_ids = 0, []
            for h in ids[:full]:
                key = (parent, int(h))
                parent = interned.get(key) or interned.setdefault(key, len(interned) + 1)
                chain_ids.append(parent)
            raw.append((float(d["timestamp"]) / 1e3, p, int(d["output_length"]), tuple(chain_ids)))
    return _finish(Path(path).stem, "mooncake", raw, time_scale=time_scale, max_requests=max_requests,
                   max_model_len=max_model_len, notes=[])


def load_azure(path: str | Path, *, time_scale: float = 1.0, max_requests: int | None = None,
               max_model_len: int | None = None) -> Workload:
    raw = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            t = datetime.fromisoformat(row["TIMESTAMP"][:26]).timestamp()
            raw.append((t, int(row["ContextTokens"]), int(row["GeneratedTokens"]), ()))
    return _finish(Path(path).stem, "azure", raw, time_scale=time_scale, max_requests=max_requests,
                   max_model_len=max_model_len, notes=["no prefix information: every prompt block is unique"])


def load_length_table(path: str | Path, *, rate: float, cv: float = 1.0, seed: int = 0, time_scale: float = 1.0,
                      max_requests: int | None = None, max_model_len: int | None = None) -> Workload:
    """Lengths from a table, arrivals Poisson (cv = 1) or Gamma with coefficient of variation ``cv``."""
    if rate <= 0:
        raise ValueError(f"--rate: {rate} must be > 0 for a length table (it has no arrival times)")
    if cv <= 0:
        raise ValueError(f"--cv: {cv} must be > 0")
    with open(path, newline="") as f:
        lengths = [(int(r["num_prefill_tokens"]), int(r["num_decode_tokens"])) for r in csv.DictReader(f)]
    rng = random.Random(seed)
    rng.shuffle(lengths)
    if max_requests is not None:
        lengths = lengths[:max_requests]
    shape = 1 / cv**2  # Gamma inter-arrivals with mean 1/rate and the given CV; shape 1 is Poisson
    t, raw = 0.0, []
    for p, o in lengths:
        raw.append((t, p, o, ()))
        t += rng.gammavariate(shape, 1 / (rate * shape))
    kind = "Poisson" if cv == 1 else f"Gamma (cv {cv:g})"
    return _finish(Path(path).stem, "lengths", raw, time_scale=time_scale, max_requests=None,
                   max_model_len=max_model_len,
                   notes=[f"{kind} arrivals at {rate:g} req/s (seed {seed}); every prompt block is unique"])


def load_trace(path: str | Path, *, time_scale: float = 1.0, max_requests: int | None = None,
               max_model_len: int | None = None, rate: float | None = None, cv: float = 1.0,
               seed: int = 0) -> Workload:
    """Pick the loader from the file: JSON lines (Mooncake), a TIMESTAMP column (Azure), or a length table."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--trace: {str(path)!r} is not a file")
    with open(path) as f:
        head = f.readline()
    kw = {"time_scale": time_scale, "max_requests": max_requests, "max_model_len": max_model_len}
    if head.lstrip().startswith("{"):
        return load_mooncake(path, **kw)
    cols = [c.strip() for c in head.split(",")]
    if "TIMESTAMP" in cols:
        return load_azure(path, **kw)
    if "num_prefill_tokens" in cols and "num_decode_tokens" in cols:
        if rate is None:
            raise ValueError(f"--rate: {path.name} is a length table without arrival times; give --rate REQ_PER_S")
        return load_length_table(path, rate=rate, cv=cv, seed=seed, **kw)
    raise ValueError(f"--trace: {path.name} is neither Mooncake JSON lines, an Azure CSV, nor a length table "
                     "(num_prefill_tokens,num_decode_tokens)")
