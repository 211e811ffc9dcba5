"""How much memory the router's prefix index takes per entry (one replica holding one block).

Fills a ``cluster.routing.policies.PrefixIndex`` to its default bound (1M entries) over 64 replicas
with chains of at most 512 block hashes from ``block_hashes`` of random token ids, and measures with
``tracemalloc`` what the index holds: its LRU entries and keys (the hash ints), and the
hash -> bitmask dict. Two layouts: no two replicas share a block (one bitmask per entry),
and all 64 hold the same blocks (one bitmask per distinct hash).

    .venv/bin/python benchmarks/prefix_index_memory.py [--replicas 64] [--entries 1000000]
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.routing.policies import BLOCK_TOKENS, PrefixIndex, block_hashes  # noqa: E402


def chains(rng: random.Random, blocks: int, longest: int = 512) -> list[tuple[int, ...]]:
    """Block hashes of prompts of random tokens, ``blocks`` in all, at most ``longest`` blocks each."""
    sizes = [longest] * (blocks // longest) + ([blocks % longest] if blocks % longest else [])
    return [block_hashes([rng.randrange(32_000) for _ in range(n * BLOCK_TOKENS)]) for n in sizes]


def measure(replicas: int, entries: int, shared: bool, rng: random.Random) -> tuple[int, int]:
    """(entries held, bytes traced) once the index is full and only the index keeps the hashes alive."""
    per_replica = entries // replicas
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    index = PrefixIndex(max_blocks=entries)
    common = chains(rng, per_replica) if shared else None
    for i in range(replicas):
        rid = f"replica-{i}"
        index.set_capacity(rid, per_replica)
        for chain in common or chains(rng, per_replica):
            index.insert(rid, chain)
    del common
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return len(index), used


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--replicas", type=int, default=64)
    ap.add_argument("--entries", type=int, default=1_000_000, help="the index's bound (max_index_blocks)")
    ns = ap.parse_args()
    print(f"Python {sys.version.split()[0]}; {ns.replicas} replicas, prompts of up to 512 blocks, "
          f"index bound {ns.entries:,} entries")
    for shared in (False, True):
        n, used = measure(ns.replicas, ns.entries, shared, random.Random(0))
        layout = f"all {ns.replicas} replicas hold the same blocks" if shared else "no block shared"
        print(f"{layout}: {n:,} entries, {used / 2**20:.1f} MiB ({used / 1e6:.1f} MB), "
              f"{used / n:.0f} bytes per entry")
    return 0


if __name__ == "__main__":
    sys.exit(main())
