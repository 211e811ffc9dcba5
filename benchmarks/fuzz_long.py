"""A long schemathesis run against the real ingress (the CI test runs about 2,000 cases).

Starts the same stack as ``tests/fuzz`` (its own Ray, the tiny model with output clamped to
8 tokens, API keys on) and fuzzes it from its OpenAPI document, in rounds of fresh seeds, until
``--cases`` have been sent. Any 5xx or non-OpenAI error is a finding; findings are written to
``benchmarks/results/fuzz-<time>.json`` with the request that caused them.

    .venv/bin/python benchmarks/fuzz_long.py --cases 20000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fault_stack import ROOT, LocalStack, provenance, timestamp  # noqa: E402

from tests.fuzz.conftest import API_KEY, MAX_TOKENS, fuzz_args  # noqa: E402
from tests.fuzz.openapi_fuzz import run  # noqa: E402
from tests.fuzz.test_openapi_fuzz import PLAN  # noqa: E402  (every forwarded route, in the CI test's shares)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=20_000)
    p.add_argument("--round-cases", type=int, default=2_000, help="cases per seed")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ns = p.parse_args(argv)

    os.environ["HF_HUB_OFFLINE"] = "1"  # generated adapter paths look like hub ids: never fetch them
    ns.out.mkdir(parents=True, exist_ok=True)
    stamp = timestamp()
    keys = ns.out / f".fuzz-keys-{stamp}"
    keys.write_text(API_KEY + "\n")
    stack = LocalStack(fuzz_args(keys), num_cpus=ns.num_cpus)
    stack.start()
    scale = ns.round_cases / sum(sum(modes.values()) for modes in PLAN.values())
    plan = {op: {mode: max(1, round(n * scale)) for mode, n in modes.items()} for op, modes in PLAN.items()}
    total, statuses, findings, seconds, rounds = 0, Counter(), [], 0.0, []
    try:
        seed = ns.seed
        while total < ns.cases:
            report = run(stack.url, API_KEY, plan, seed=seed, workers=ns.workers, max_tokens=MAX_TOKENS,
                         nasty=seed == ns.seed)
            print(f"seed {seed}: {report.summary()}", flush=True)
            total += report.cases
            statuses.update(report.statuses)
            findings += [asdict(f) for f in report.findings]
            seconds += report.seconds
            rounds.append({"seed": seed, "cases": report.cases, "seconds": round(report.seconds, 1),
                           "server_errors": report.server_errors, "findings": len(report.findings)})
            seed += 1
    finally:
        stack.stop()
        keys.unlink(missing_ok=True)
    result = {**provenance(), "cases": total, "seconds_sending": round(seconds, 1), "cases_per_s": round(total / seconds, 1),
              "statuses": {str(k): v for k, v in sorted(statuses.items())},
              "server_errors": sum(v for k, v in statuses.items() if k >= 500), "findings": findings,
              "rounds": rounds, "load_average": os.getloadavg()}
    path = ns.out / f"fuzz-{stamp}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"{total} cases, {result['cases_per_s']} cases/s, 5xx: {result['server_errors']}, "
          f"findings: {len(findings)}; wrote {path}")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
