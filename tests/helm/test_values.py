"""Bad values are refused before anything reaches the cluster, with the offending field named."""

from __future__ import annotations

import copy
from typing import Any

import helm_python as helm
import pytest

from tests.helm.conftest import CHART, NAMESPACE, PROFILES, load_chart, render_files

pytestmark = pytest.mark.helm

GOOD = PROFILES["default"]


def _with(patch: dict[str, Any], base: dict[str, Any] = GOOD) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "args":
            out[key] = _with(value, out[key])
        else:
            out[key] = value
    return out


def _group(**fields: Any) -> dict[str, Any]:
    return {"workerGroups": [{"name": "gpu", **fields}]}


def _model(**fields: Any) -> dict[str, Any]:
    """GOOD with the first model's fields changed (None: removed)."""
    model = {**GOOD["args"]["models"][0], **fields}
    return {"args": {**GOOD["args"], "models": [{k: v for k, v in model.items() if v is not None}]}}


# values -> what the error must say (the field's path first).
SCHEMA_REFUSALS = [
    pytest.param({"image": {"repository": ""}}, ["/image/repository", "minLength"], id="empty-image"),
    pytest.param({"image": {"repository": 5}}, ["/image/repository", "want string"], id="image-not-a-string"),
    pytest.param({"serveConfig": 5}, ["/serveConfig", "want string"], id="config-not-text"),
    # kvpilot's args inline: values.schema.json's `args` is generated from ClusterConfig.
    pytest.param(_model(tensor_paralel_size=2), ["/args/models/0", "additional properties 'tensor_paralel_size' not allowed"], id="args-unknown-key"),
    pytest.param(_model(tensor_parallel_size="two"), ["/args/models/0/tensor_parallel_size", "want integer"], id="args-wrong-type"),
    pytest.param(_model(accelerator="A100"), ["/args/models/0/accelerator", "value must be one of", "A100-80GB"], id="args-unknown-gpu"),
    pytest.param(_model(accelerator="cpu"), ["/args/models/0/accelerator", "value must be one of"], id="args-cpu"),
    pytest.param(_model(max_model_len=None), ["/args/models/0", "missing property 'max_model_len'"], id="args-no-max-model-len"),
    pytest.param(_model(limits={"max_tokens": 0}), ["/args/models/0/limits/max_tokens", "minimum"], id="args-zero-max-tokens"),
    pytest.param({"args": {"models": []}}, ["/args/models", "minItems"], id="args-no-model"),
    pytest.param(_group(replicas=-1), ["/workerGroups/0/replicas", "minimum"], id="negative-replicas"),
    pytest.param(_group(maxReplicas=-2), ["/workerGroups/0/maxReplicas", "minimum"], id="negative-max-replicas"),
    pytest.param(_group(gpusPerPod="two"), ["/workerGroups/0/gpusPerPod", "want null or integer"], id="gpus-not-a-number"),
    pytest.param(_group(gpusPerPod=0), ["/workerGroups/0/gpusPerPod", "minimum"], id="zero-gpus"),
    pytest.param(_group(accelerator="A100"), ["/workerGroups/0/accelerator", "value must be one of", "A100-80GB"], id="unknown-gpu"),
    pytest.param(_group(memory="64GB"), ["/workerGroups/0/memory", "does not match pattern"], id="bad-quantity"),
    pytest.param(_group(rayStartParams={"num-cpus": 4}), ["/workerGroups/0/rayStartParams/num-cpus", "want string"], id="ray-param-not-a-string"),
    pytest.param({"workerGroups": [{"name": "GPU_1"}]}, ["/workerGroups/0/name", "does not match pattern"], id="bad-group-name"),
    pytest.param({"workerGroups": [{"accelerator": "A10G"}]}, ["/workerGroups/0", "missing property 'name'"], id="group-without-name"),
    pytest.param({"workerGroups": []}, ["/workerGroups", "minItems"], id="no-worker-group"),
    pytest.param({"workergroups": [{"name": "gpu"}]}, ["additional properties 'workergroups' not allowed"], id="typo-top-level"),
    pytest.param(_group(gpuPerPod=2), ["/workerGroups/0", "additional properties 'gpuPerPod' not allowed"], id="typo-in-group"),
    pytest.param({"monitoring": {"podMonitor": {"enabled": "yes"}}}, ["/monitoring/podMonitor/enabled", "want boolean"], id="enabled-not-bool"),
    pytest.param({"ingress": {"enabled": True, "hosts": [{"paths": [{"path": "v1"}]}]}}, ["/ingress/hosts/0/paths/0/path"], id="relative-path"),
    pytest.param({"service": {"type": "Internal"}}, ["/service/type", "value must be one of"], id="service-type"),
    pytest.param({"upgrade": {"strategy": "Rolling"}}, ["/upgrade/strategy", "value must be one of"], id="upgrade-strategy"),
    pytest.param({"upgrade": {"incremental": {"stepSizePercent": 0}}}, ["/upgrade/incremental/stepSizePercent", "minimum"], id="step-size-zero"),
    pytest.param({"upgrade": {"incremental": {"maxSurgePercent": 200}}}, ["/upgrade/incremental/maxSurgePercent", "maximum"], id="surge-over-100"),
    pytest.param({"upgrade": {"incremental": {"intervalSeconds": 0}}}, ["/upgrade/incremental/intervalSeconds", "minimum"], id="interval-zero"),
    pytest.param({"modelCache": {"type": "nfs"}}, ["/modelCache/type", "value must be one of"], id="cache-type"),
    pytest.param({"modelCache": {"hostPath": {"path": "relative"}}}, ["/modelCache/hostPath/path", "does not match pattern"], id="cache-relative-path"),
]


@pytest.mark.parametrize(("patch", "says"), SCHEMA_REFUSALS)
def test_schema_refuses(patch, says):
    values = _with(patch)
    with load_chart() as chart:
        with pytest.raises(helm.HelmValuesError) as err:
            chart.validate_schema(values)
    for text in says:
        assert text in str(err.value)
    # `helm install` / `helm template` refuse the same values before rendering anything.
    with pytest.raises(helm.HelmValuesError):
        render_files(values)


def test_missing_image_is_refused_and_lint_says_so():
    with pytest.raises(helm.HelmValuesError, match=r"at '/image': missing property 'repository'"):
        render_files({})
    report = helm.lint(CHART, namespace=NAMESPACE)
    assert any("missing property 'repository'" in e for e in report["errors"])


# Checks that need the Serve config (the schema cannot see it): the template refuses, naming the value.
TEMPLATE_REFUSALS = [
    pytest.param(_group(gpusPerPod=1), r"workerGroups\[0\] \(gpu\)\.gpusPerPod: 1 is below the tensor_parallel_size 2 of model llama-2-70b-awq", id="tp-split-across-pods"),
    pytest.param(_group(accelerator="L4"), r"workerGroups\[0\] \(gpu\)\.accelerator: L4, but no model of args runs on it", id="wrong-gpu"),
    pytest.param(_group(accelerator="L4", models=["llama-2-70b-awq"]), r"workerGroups\[0\] \(gpu\)\.accelerator: L4, but model llama-2-70b-awq runs on A10G", id="model-on-wrong-gpu"),
    pytest.param(_group(models=["llama-7b"]), r"workerGroups\[0\] \(gpu\)\.models: \"llama-7b\" is not a model of args, which serves: llama-2-70b-awq", id="unknown-model"),
    pytest.param({"workerGroups": [{"name": "gpu"}, {"name": "gpu"}]}, r"workerGroups\[1\] \(gpu\): name \"gpu\" is taken", id="duplicate-group"),
    pytest.param(_group(replicas=3, maxReplicas=2), r"workerGroups\[0\] \(gpu\): replicas must lie between minReplicas and maxReplicas, got minReplicas 3, replicas 3, maxReplicas 2", id="replicas-above-max"),
    pytest.param(_group(gpusPerPod=3), r"workerGroups\[0\] \(gpu\)\.gpusPerPod: 3 GPUs do not divide into tensor-parallel groups of 2 \(model llama-2-70b-awq\)", id="tp-does-not-divide"),
    pytest.param({"upgrade": {"strategy": "NewClusterWithIncrementalUpgrade"}}, r"upgrade\.incremental\.gatewayClassName: required with upgrade\.strategy NewClusterWithIncrementalUpgrade", id="incremental-without-gateway"),
    pytest.param({"upgrade": {"strategy": "NewClusterWithIncrementalUpgrade", "incremental": {"gatewayClassName": "istio"}}},
                 r"upgrade\.strategy: NewClusterWithIncrementalUpgrade needs Ray's autoscaler", id="incremental-without-autoscaler"),
    pytest.param({"serveConfig": "applications: [{name: x, import_path: deployments.app:build_app, args: {models: []}}]"},
                 r"serveConfig and args are both set", id="file-and-args"),
    pytest.param({"monitoring": {"podMonitor": {"enabled": True}, "serviceMonitor": {"enabled": True}}}, r"monitoring: enable podMonitor or serviceMonitor, not both", id="two-monitors"),
    pytest.param({"secrets": {"hfToken": {"value": "hf_x", "existingSecret": "hf"}}}, r"secrets\.hfToken: set value .* or existingSecret .*, not both", id="secret-twice"),
]


@pytest.mark.parametrize(("patch", "says"), TEMPLATE_REFUSALS)
def test_template_refuses(patch, says):
    values = _with(patch)
    with load_chart() as chart:
        chart.validate_schema(values)  # well-formed values...
    with pytest.raises(helm.HelmRenderError, match=says):  # ...that cannot serve this config
        render_files(values)
