"""kvpilot's autoscaler alone on the robustness sweep's autoscaling workloads and bounds (its defaults,
the same jobs as ``benchmarks/sim_robustness.py --part autoscaling``): GPU-h, SLO met, mean / max replicas.

    nice -n 19 .venv/bin/python benchmarks/results/autoscale-stabilize-20261202/run.py LABEL
"""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT)]
from sim_robustness import _scale  # noqa: E402

for w in ("azure", "multiscale_bursts", "long_prompt_bursts", "overload"):
    for lo, hi in ((2, 12), (2, 24)):
        r = _scale((w, "kvpilot", lo, hi, 60.0, 0, 1.0))
        print(json.dumps({"variant": sys.argv[1], **{k: r[k] for k in (
            "workload", "bounds", "gpu_hours", "slo_attainment", "replicas_mean", "replicas_max")}}), flush=True)
