"""Request traces for the simulator: Mooncake, Azure, and length tables with synthetic arrivals.

The files are read by ``cluster.traces`` (the bench reads them there too). Every loader returns a ``Workload``: requests sorted by arrival (seconds from the
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
Requests longer than ``max_model_len`` are clipped by ``cluster.traces.clip`` (the
output keeps up to half the length, the prompt its head and so its shared prefix);
``Workload.clipped`` says how many.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

from cluster.planning.hardware import GPU_BLOCK_SIZE
from cluster.traces import TRACE_BLOCK_TOKENS, clip, detect_kind, read_rows

BLOCK_TOKENS = GPU_BLOCK_SIZE  # the simulated replicas are GPUs: vLLM caches prefixes in blocks of this
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


def _finish(name: str, source: str, raw: list[tuple[float, int, int, tuple[int, ...]]], *, time_scale: float,
            max_requests: int | None, max_model_len: int | None, notes: list[str]) -> Workload:
    raw.sort(key=lambda r: r[0])
    if max_requests is not None:
        raw = raw[:max_requests]
    if time_scale <= 0:
        raise ValueError(f"time_scale: {time_scale} must be > 0")
    t0 = raw[0][0] if raw else 0.0
    reqs, clipped, clipped_tokens = [], 0, 0
    for i, (t, prompt, output, chain_ids) in enumerate(raw):
        prompt, output = max(1, prompt), max(1, output)
        fitted_prompt, fitted_output, was_clipped = clip(prompt, output, max_model_len)
        if was_clipped:
            clipped += 1
            clipped_tokens += prompt - fitted_prompt
        reqs.append(TraceRequest((t - t0) / time_scale, fitted_prompt, fitted_output, i, chain_ids))
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
    for row in read_rows(path, "mooncake")[1]:
        full = min(len(row.hash_ids), row.input_len // TRACE_BLOCK_TOKENS)  # a last partial block stays unique
        parent, chain_ids = 0, []
        for hash_id in row.hash_ids[:full]:
            key = (parent, hash_id)
            parent = interned.get(key) or interned.setdefault(key, len(interned) + 1)
            chain_ids.append(parent)
        raw.append((row.timestamp_s, row.input_len, row.output_len, tuple(chain_ids)))
    return _finish(Path(path).stem, "mooncake", raw, time_scale=time_scale, max_requests=max_requests,
                   max_model_len=max_model_len, notes=[])


def load_azure(path: str | Path, *, time_scale: float = 1.0, max_requests: int | None = None,
               max_model_len: int | None = None) -> Workload:
    raw = [(row.timestamp_s, row.input_len, row.output_len, ()) for row in read_rows(path, "azure")[1]]
    return _finish(Path(path).stem, "azure", raw, time_scale=time_scale, max_requests=max_requests,
                   max_model_len=max_model_len, notes=["no prefix information: every prompt block is unique"])


def load_length_table(path: str | Path, *, rate: float, cv: float = 1.0, seed: int = 0, time_scale: float = 1.0,
                      max_requests: int | None = None, max_model_len: int | None = None) -> Workload:
    """Lengths from a table, arrivals Poisson (cv = 1) or Gamma with coefficient of variation ``cv``."""
    if rate <= 0:
        raise ValueError(f"--rate: {rate} must be > 0 for a length table (it has no arrival times)")
    if cv <= 0:
        raise ValueError(f"--cv: {cv} must be > 0")
    lengths = [(row.input_len, row.output_len) for row in read_rows(path, "length-table")[1]]
    rng = random.Random(seed)  # the simulator's row order (the bench orders rows with numpy's stream)
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
    try:
        kind = detect_kind(path)
    except ValueError as e:
        raise ValueError(f"--trace: {e}") from None
    kw = {"time_scale": time_scale, "max_requests": max_requests, "max_model_len": max_model_len}
    if kind == "mooncake":
        return load_mooncake(path, **kw)
    if kind == "azure":
        return load_azure(path, **kw)
    if rate is None:
        raise ValueError(f"--rate: {path.name} is a length table without arrival times; give --rate REQ_PER_S")
    return load_length_table(path, rate=rate, cv=cv, seed=seed, **kw)
