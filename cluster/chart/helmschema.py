"""The Helm chart's view of the config, generated from the config itself.

``python -m cluster.chart.helmschema`` writes, from ``ClusterConfig`` (what ``kvpilot validate`` and
``build_app`` check) and the drain constants of ``cluster.serving.placement``:

* ``helm/kvpilot/files/args.schema.json``: the JSON schema of kvpilot's application ``args``,
  with which the chart checks a Serve config given as a file (``--set-file serveConfig=...``);
* ``properties.args`` of ``helm/kvpilot/values.schema.json``: the same schema, with which
  ``helm install`` itself checks ``args`` given inline in values;
* ``helm/kvpilot/files/drain.json``: the numbers the chart derives drain times from;
* ``helm/kvpilot/files/accelerators.yaml`` and the worker groups' ``accelerator`` enum of
  ``values.schema.json``: the GPU types of ``cluster.planning.hardware.CATALOG`` and Ray's name for each.

``--check`` writes nothing and exits 1 when a committed file differs (tests/helm run it too).

What the pydantic schema cannot say is added from the same sources the validators use: the
GPU names of ``cluster.planning.hardware.CATALOG`` (the chart runs GPU workers only), the quantization
methods and the routing policies. The chart also requires ``max_model_len``: it sizes the pods'
grace periods from it and cannot read the checkpoint's context length.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from cluster.config import ClusterConfig
from cluster.planning.hardware import CATALOG, QUANTIZATIONS
from cluster.routing.policies import POLICIES
from cluster.serving.placement import DRAIN_MARGIN_S, DRAIN_MS_PER_TOKEN

CHART = Path(__file__).resolve().parents[2] / "helm" / "kvpilot"
# Seconds a pod keeps after its replicas' drain, for `ray stop` and the container's exit.
POD_STOP_MARGIN_S = 30
_DROP = {"title", "default"}  # values.yaml and the config docs say defaults; the schema checks


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    """Resolve ``$ref``s (the config has no recursion) and turn ``anyOf [X, null]`` into a type list."""
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = _inline(defs[node["$ref"].rsplit("/", 1)[1]], defs)
        return {**target, **{k: _inline(v, defs) for k, v in node.items() if k != "$ref" and k not in _DROP}}
    out = {k: _inline(v, defs) for k, v in node.items() if k not in _DROP and k != "$defs"}
    options = out.get("anyOf")
    if isinstance(options, list) and len(options) == 2 and {"type": "null"} in options:
        (other,) = [o for o in options if o != {"type": "null"}]
        if isinstance(other.get("type"), str):
            del out["anyOf"]
            out.update(other, type=[other["type"], "null"])
    return out


def args_schema() -> dict[str, Any]:
    """JSON schema of kvpilot's application ``args`` as the chart accepts them."""
    raw = ClusterConfig.model_json_schema()
    schema = _inline(raw, raw["$defs"])
    model = schema["properties"]["models"]["items"]
    props = model["properties"]
    gpus = [name for name, a in CATALOG.items() if a.is_gpu]
    props["accelerator"].update(enum=gpus, description="The GPU type of the model's workers (the chart runs GPU workers only).")
    props["quantization"]["enum"] = list(QUANTIZATIONS)
    props["routing"]["properties"]["policy"]["enum"] = list(POLICIES)
    props["max_model_len"].update(
        type="integer",
        description=props["max_model_len"]["description"]
        + " Required by the chart: the pods' drain time is sized from it.",
    )
    model["required"] = sorted({*model.get("required", []), "max_model_len"})
    return schema


def drain_constants() -> dict[str, int]:
    return {"msPerToken": DRAIN_MS_PER_TOKEN, "marginSeconds": DRAIN_MARGIN_S, "podStopMarginSeconds": POD_STOP_MARGIN_S}


ACCELERATORS_HEADER = """\
# GPU types a worker group can run, keyed by kvpilot's accelerator name (the `accelerator`
# of a model in a Serve config), with the name Ray gives the same GPU in its
# `accelerator_type:<rayType>` node resource. kvpilot's placement bundles ask for a sliver of
# that resource (cluster/serving/placement.py, worker_bundles), so each worker group advertises it.
# rayType "" means Ray has no accelerator_type for the GPU: nothing is advertised, and
# kvpilot's bundles do not ask for one.
# Generated from cluster/planning/hardware.py (CATALOG, ray_type) by `python -m cluster.chart.helmschema`.
"""


def _gpus() -> dict[str, str]:
    return {name: a.ray_type or "" for name, a in CATALOG.items() if a.is_gpu}


def accelerators_yaml() -> str:
    return ACCELERATORS_HEADER + "".join(f"{name}: {{rayType: {json.dumps(ray) if not ray else ray}}}\n"
                                         for name, ray in _gpus().items())


def _dump(doc: Any) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def generated(chart: Path = CHART) -> dict[Path, str]:
    """Path -> the text the generator writes there."""
    schema = args_schema()
    values_schema = json.loads((chart / "values.schema.json").read_text())
    values_schema["properties"]["args"] = {
        **schema,
        "description": "kvpilot's application args inline (instead of serveConfig); "
        "generated from cluster.config.ClusterConfig by `python -m cluster.chart.helmschema`.",
    }
    worker = values_schema["properties"]["workerGroups"]["items"]["properties"]
    worker["accelerator"]["enum"] = list(_gpus())
    return {
        chart / "files" / "accelerators.yaml": accelerators_yaml(),
        chart / "files" / "args.schema.json": _dump(schema),
        chart / "values.schema.json": _dump(values_schema),
        chart / "files" / "drain.json": _dump(drain_constants()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.chart.helmschema", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file is not what would be written")
    p.add_argument("--chart", type=Path, default=CHART)
    ns = p.parse_args(argv)
    stale = []
    for path, text in generated(ns.chart).items():
        if path.exists() and path.read_text() == text:
            continue
        stale.append(path)
        if not ns.check:
            path.write_text(text)
    for path in stale:
        print(f"{'stale' if ns.check else 'wrote'}: {path}")
    return 1 if ns.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
