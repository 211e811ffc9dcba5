"""Why llm-d's router beats kvpilot on multiscale_bursts at 2x (the robustness sweep's routing point): the
first 1,200 requests of that workload on 16 replicas, as ``benchmarks/sim_robustness.py --part routing`` runs
them, with each policy's goodput, SLO attainment, TTFT percentiles and load spread (coefficient of variation of
requests per replica).

    nice -n 19 .venv/bin/python benchmarks/results/routing-flood-20261202/run.py multiscale_bursts 2 \
        kvpilot,llmd,dynamo,sglang > benchmarks/results/routing-flood-20261202/run.log
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT)]
from sim_robustness import workload  # noqa: E402

from cluster.sim.simulator import make_setup, simulate  # noqa: E402

name, scale = sys.argv[1], float(sys.argv[2])
print(workload(name, scale, 1200, 0, make_setup(16).max_model_len).summary())
for policy in sys.argv[3].split(","):
    setup = make_setup(16)
    d = simulate(workload(name, scale, 1200, 0, setup.max_model_len), policy, setup)[0].to_dict()
    print(policy, {k: round(float(d[k]), 4) for k in ("goodput_rps", "slo_attainment", "duration_s", "ttft_p50_s",
                                                      "ttft_p90_s", "ttft_p99_s", "tpot_p50_s", "load_cv")})
