"""Render the chart with real Helm (helm-python-sdk embeds Helm's Go SDK) and check what comes out.

Offline and fast: no cluster, no network. Kubernetes' own kinds are validated with
kubernetes-validate's bundled schemas; KubeRay's RayService against the OpenAPI schema of
KubeRay's CRD in ../shared/kuberay/ (as the API server would with strict field validation).
"""

from __future__ import annotations

import json
import os
import shlex
from functools import cache
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "kvpilot"
CONFIGS = ROOT / "configs"
# KubeRay v1.7.0 CRDs, shared data next to the checkout (../shared/kuberay/README.md).
KUBERAY_CRDS = Path(os.environ.get("KVPILOT_KUBERAY_CRDS", ROOT.parent / "shared" / "kuberay"))
KUBE_VERSION = "1.30"  # a Kubernetes version kubernetes-validate ships schemas for
RELEASE, NAMESPACE = "demo", "llm"

# Values profiles: the chart's ci/*-values.yaml (chart-testing's convention), by short name.
PROFILES: dict[str, dict[str, Any]] = {
    p.name.removesuffix("-values.yaml"): yaml.safe_load(p.read_text())
    for p in sorted((CHART / "ci").glob("*-values.yaml"))
}
# Kinds the Prometheus Operator defines: not in kubernetes-validate, shape-checked instead.
MONITOR_KINDS = {"PodMonitor", "ServiceMonitor"}


def load_chart(path: Path = CHART) -> helm.Chart:
    return helm.Chart.load(path)


@cache
def _render_cached(profile_json: str) -> tuple[tuple[str, str], ...]:
    with load_chart() as chart:
        out = chart.render(json.loads(profile_json), name=RELEASE, namespace=NAMESPACE)
    return tuple(sorted(out.items()))


def render_files(values: dict[str, Any], chart_path: Path = CHART) -> dict[str, str]:
    """Template path -> rendered text, rendered by Helm exactly as `helm template` would."""
    if chart_path == CHART:
        return dict(_render_cached(json.dumps(values, sort_keys=True)))
    with load_chart(chart_path) as chart:
        return chart.render(values, name=RELEASE, namespace=NAMESPACE)


def render(values: dict[str, Any], chart_path: Path = CHART) -> list[dict[str, Any]]:
    """Every Kubernetes object the chart renders for these values (NOTES.txt left out)."""
    docs = []
    for name, text in render_files(values, chart_path).items():
        if name.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def only(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def ray_cluster(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return only(docs, "RayService")["spec"]["rayClusterConfig"]


def pod_templates(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """'head' and each worker group name -> its pod template."""
    rc = ray_cluster(docs)
    out = {"head": rc["headGroupSpec"]["template"]}
    out.update({g["groupName"]: g["template"] for g in rc["workerGroupSpecs"]})
    return out


def ray_resources(ray_start_params: dict[str, str]) -> dict[str, float]:
    """Custom resources `ray start --resources=...` gets, parsed the way the pod's shell does."""
    value = ray_start_params.get("resources")
    if value is None:
        return {}
    (arg,) = shlex.split(f"--resources={value}")  # KubeRay pastes the value into a bash command
    return json.loads(arg.removeprefix("--resources="))


def validate_k8s(doc: dict[str, Any]) -> None:
    """A Kubernetes built-in kind against its schema, unknown fields refused."""
    kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def _strict(node: Any) -> Any:
    """A CRD's structural schema as strict field validation applies it: unknown fields are errors."""
    if isinstance(node, list):
        return [_strict(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items()}
    if (
        out.get("type") == "object"
        and isinstance(out.get("properties"), dict)
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if out.get("nullable") is True and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


@cache
def crd_validator(filename: str, version: str = "v1") -> jsonschema.Draft7Validator:
    path = KUBERAY_CRDS / filename
    if not path.is_file():
        # A fresh clone has no ../shared: everything else runs, the CRD checks say what they need.
        pytest.skip(
            f"KubeRay CRD {path} is missing: copy {filename} from ray-project/kuberay tag v1.7.0 "
            f"(ray-operator/config/crd/bases/{filename}) into ../shared/kuberay/, or point KVPILOT_KUBERAY_CRDS at its folder"
        )
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (ver,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return jsonschema.Draft7Validator(_strict(ver["schema"]["openAPIV3Schema"]))


def crd_errors(doc: dict[str, Any], filename: str) -> list[str]:
    errors = sorted(crd_validator(filename).iter_errors(doc), key=lambda e: list(e.absolute_path))
    return ["/".join(map(str, e.absolute_path)) + f": {e.message}" for e in errors]


@pytest.fixture(params=sorted(PROFILES))
def profile(request) -> str:
    return request.param
