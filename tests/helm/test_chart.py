"""The chart as a user installs it: every profile renders valid manifests that serve the chosen config."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import helm_python as helm
import pytest
import yaml

from cluster.chart import helmschema
from cluster.config import APP_IMPORT_PATH, ClusterConfig, read_serve_args
from cluster.planning.hardware import CATALOG
from cluster.planning.planner import plan_model
from cluster.serving.placement import worker_bundles
from tests.helm.conftest import (
    CHART,
    CONFIGS,
    KUBE_VERSION,
    MONITOR_KINDS,
    NAMESPACE,
    PROFILES,
    RELEASE,
    ROOT,
    crd_errors,
    load_chart,
    only,
    pod_templates,
    ray_cluster,
    ray_resources,
    render,
    render_files,
    validate_k8s,
)

pytestmark = pytest.mark.helm

FULLNAME = f"{RELEASE}-kvpilot"
SCHEMA = json.loads((CHART / "values.schema.json").read_text())
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _serve_config(docs: list[dict], tmp_path: Path) -> tuple[str, ClusterConfig]:
    """The rendered serveConfigV2, and kvpilot's config read from it the way `serve run` gets it."""
    text = only(docs, "RayService")["spec"]["serveConfigV2"]
    path = tmp_path / "serveConfigV2.yaml"
    path.write_text(text)
    args, prefix = read_serve_args(path)  # finds kvpilot's application by its import_path
    return text, ClusterConfig.from_args(args, prefix)


def _is_gpu_config(path: Path) -> bool:
    args, _ = read_serve_args(path)
    return all(CATALOG[m["accelerator"]].is_gpu for m in args["models"])


# --- the user's own Serve config ----------------------------------------------------------

IMAGE = {"image": {"repository": "r/kvpilot"}}
GPU_CONFIGS = sorted(p.name for p in CONFIGS.glob("*.yaml") if _is_gpu_config(p))
# Each values profile serves the args of one shipped config (ci/ files are self-contained values).
PROFILE_CONFIGS = {"default": "llama70b-awq.yaml", "ingress": "llama70b-awq.yaml", "two-groups": "llama70b-awq.yaml",
                   "monitoring": "llama3-8b-fp8.yaml", "servicemonitor": "mistral7b-gptq.yaml"}

# A config that is in no configs/ file: two models, one on each of two GPU types.
MY_MODELS = """\
# my-models.yaml: what a user writes for their own models.
applications:
  - name: dashboard-app
    route_prefix: /other
    import_path: somewhere.else:app
  - name: my-llms
    route_prefix: /
    import_path: deployments.app:build_app
    args:
      models:
        - name: qwen-7b
          source: Qwen/Qwen2.5-7B-Instruct
          accelerator: L40S
          max_model_len: 16384
          limits: {max_tokens: 2048}
          min_replicas: 1
          max_replicas: 3
        - name: llama-70b
          source: TheBloke/Llama-2-70B-AWQ
          quantization: awq
          max_model_len: 4096
          accelerator: A10G
          gpu_memory_utilization: 0.95
          tensor_parallel_size: 2
"""
MY_GROUPS = [{"name": "l40s", "accelerator": "L40S"}, {"name": "a10g", "accelerator": "A10G"}]


def _kvpilot_plan(path: Path) -> None:
    """`kvpilot plan FILE`, as the README tells users to run it before installing."""
    out = subprocess.run([sys.executable, "-m", "cluster.cli.kvpilot", "plan", str(path)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, f"kvpilot plan {path} exited {out.returncode}:\n{out.stdout}{out.stderr}"
    assert "does not fit" not in out.stdout


def test_generated_schema_and_drain_numbers_are_committed():
    # `python -m cluster.chart.helmschema` writes them from ClusterConfig and cluster/serving/placement.py.
    stale = [str(p) for p, text in helmschema.generated().items() if p.read_text() != text]
    assert stale == [], f"run `python -m cluster.chart.helmschema`: {stale} differ from what it generates"
    assert SCHEMA["properties"]["args"]["properties"] == helmschema.args_schema()["properties"]


def test_users_own_config_file_is_served_verbatim(tmp_path):
    path = tmp_path / "my-models.yaml"
    path.write_text(MY_MODELS)
    _kvpilot_plan(path)
    # `helm install --set-file serveConfig=my-models.yaml` passes the file's text as the value.
    docs = render({**IMAGE, "serveConfig": path.read_text(), "workerGroups": MY_GROUPS})
    text, cfg = _serve_config(docs, tmp_path)
    assert text == MY_MODELS
    assert cfg == ClusterConfig.from_serve_yaml(path)
    assert crd_errors(only(docs, "RayService"), "ray.io_rayservices.yaml") == []
    groups = {g["groupName"]: g for g in ray_cluster(docs)["workerGroupSpecs"]}
    assert ray_resources(groups["l40s"]["rayStartParams"]) == {"accelerator_type:L40S": 1}
    assert (groups["l40s"]["replicas"], groups["l40s"]["maxReplicas"]) == (1, 3)
    assert groups["a10g"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert ray_cluster(docs)["enableInTreeAutoscaling"] is True


@pytest.mark.parametrize("config", GPU_CONFIGS)
def test_every_shipped_config_plans_and_renders_verbatim(config, tmp_path):
    _kvpilot_plan(CONFIGS / config)
    docs = render({**IMAGE, "serveConfig": (CONFIGS / config).read_text()})
    text, cfg = _serve_config(docs, tmp_path)
    assert text == (CONFIGS / config).read_text()
    assert cfg == ClusterConfig.from_serve_yaml(CONFIGS / config)


def test_profiles_serve_the_shipped_configs_args(profile, tmp_path):
    args, _ = read_serve_args(CONFIGS / PROFILE_CONFIGS[profile])
    assert PROFILES[profile]["args"] == args
    _, cfg = _serve_config(render(PROFILES[profile]), tmp_path)
    assert cfg == ClusterConfig.from_serve_yaml(CONFIGS / PROFILE_CONFIGS[profile])


def test_packaged_chart_renders_a_users_file(tmp_path):
    archive = helm.package(CHART, destination=tmp_path)
    with helm.Chart.load(archive) as chart:
        names = {f["name"] for f in chart.files}
        out = chart.render({**IMAGE, "serveConfig": MY_MODELS, "workerGroups": MY_GROUPS}, name=RELEASE, namespace=NAMESPACE)
    assert not any(n.startswith("ci/") for n in names)  # test profiles stay out of the package
    assert {"files/args.schema.json", "files/drain.json"} <= names
    assert yaml.safe_load(out["kvpilot/templates/rayservice.yaml"])["spec"]["serveConfigV2"] == MY_MODELS


def test_gpu_catalog_matches_cluster_hardware():
    with load_chart() as chart:
        files = {f["name"]: f["data"] for f in chart.files}
    chart_catalog = yaml.safe_load(files["files/accelerators.yaml"])
    gpus = {name: a for name, a in CATALOG.items() if a.is_gpu}
    assert chart_catalog == {name: {"rayType": a.ray_type or ""} for name, a in gpus.items()}
    worker = SCHEMA["properties"]["workerGroups"]["items"]["properties"]
    assert worker["accelerator"]["enum"] == list(gpus)


def test_versions_match_pyproject():
    with load_chart() as chart:
        meta, values = chart.metadata, chart.values
    assert meta["appVersion"] == PYPROJECT["project"]["version"]
    ray_pin = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("ray["))
    assert ray_pin.endswith(f"=={values['rayVersion']}")


def test_dockerfile_builds_the_gpu_extra_on_the_pinned_ray():
    dockerfile = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^ARG RAY_IMAGE=rayproject/ray:(\S+)$", dockerfile, re.M)
    assert base, "Dockerfile: ARG RAY_IMAGE=rayproject/ray:<tag> not found"
    ray_pin = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("ray["))
    assert base.group(1).startswith(ray_pin.split("==")[1] + "-py311-cu")
    assert re.search(r'pip install [^\n]*\[gpu\]', dockerfile)


# --- every profile: valid manifests ------------------------------------------------------


def test_every_manifest_validates(profile):
    docs = render(PROFILES[profile])
    kinds = [d["kind"] for d in docs]
    assert kinds.count("RayService") == 1
    for doc in docs:
        where = f"{profile}: {doc['kind']}/{doc['metadata']['name']}"
        assert doc["metadata"]["namespace"], where
        if doc["kind"] == "RayService":
            assert doc["apiVersion"] == "ray.io/v1"
            # KubeRay's CRD: test_rayservice_matches_kuberays_crd. The CRD schema is loose on some nested Kubernetes types; check those with Kubernetes' own.
            for group, template in pod_templates(docs).items():
                validate_k8s({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": group}, "template": template})
            validate_k8s({"apiVersion": "v1", "kind": "Service", **doc["spec"]["serveService"]})
        elif doc["kind"] in MONITOR_KINDS:
            assert doc["apiVersion"] == "monitoring.coreos.com/v1", where
        else:
            validate_k8s(doc)


def test_rayservice_matches_kuberays_crd(profile):
    rayservice = only(render(PROFILES[profile]), "RayService")
    assert crd_errors(rayservice, "ray.io_rayservices.yaml") == []


def test_lint_is_clean(profile):
    report = helm.lint(CHART, PROFILES[profile], strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == [] and report["errors"] == []
    # Only informational notes remain (Helm recommends an icon).
    assert {m["error"] for m in report["messages"]} <= {"icon is recommended"}


# --- the Ray cluster serves the config ---------------------------------------------------


def test_worker_groups_fit_the_models_they_host(profile, tmp_path):
    docs = render(PROFILES[profile])
    _, cfg = _serve_config(docs, tmp_path)
    hosted: set[str] = set()
    gpus_total = {"min": 0, "max": 0}
    for group in ray_cluster(docs)["workerGroupSpecs"]:
        template = group["template"]
        accelerator = template["metadata"]["annotations"]["kvpilot.io/accelerator"]
        models = [cfg.model(n) for n in template["metadata"]["annotations"]["kvpilot.io/models"].split(",")]
        (container,) = template["spec"]["containers"]
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        gpus = int(limits["nvidia.com/gpu"])
        assert int(requests["nvidia.com/gpu"]) == gpus
        # One pod holds one replica's whole tensor × pipeline parallel group.
        assert gpus == max(m.tensor_parallel_size * m.pipeline_parallel_size for m in models)
        ray_type = CATALOG[accelerator].ray_type
        advertised = ray_resources(group["rayStartParams"])
        assert advertised == ({f"accelerator_type:{ray_type}": 1} if ray_type else {})
        for m in models:
            assert m.accelerator == accelerator
            plan = plan_model(m, accelerator=accelerator)
            assert plan.fits, f"{m.name} does not fit {accelerator}: short by {plan.shortfall_bytes} bytes"
            bundles = worker_bundles(m)  # what Serve asks Ray for, per replica
            for key in {k for b in bundles for k in b if k.startswith("accelerator_type:")}:
                assert key in advertised, f"{group['groupName']} does not advertise {key}"
            assert sum(b["GPU"] for b in bundles) <= gpus
            assert sum(b["CPU"] for b in bundles) <= int(limits["cpu"])
            hosted.add(m.name)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        gpus_total["min"] += group["minReplicas"] * gpus
        gpus_total["max"] += group["maxReplicas"] * gpus
    assert hosted == {m.name for m in cfg.models}
    # Enough GPU pods for every model's min_replicas, and room for its max_replicas.
    assert gpus_total["max"] >= sum(m.max_replicas * m.world_size for m in cfg.models)
    rc = ray_cluster(docs)
    started = sum(g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
                  for g in rc["workerGroupSpecs"])
    assert started >= sum(m.min_replicas * m.world_size for m in cfg.models)
    autoscales = any(m.min_replicas < m.max_replicas for m in cfg.models)
    explicit = PROFILES[profile].get("autoscaler", {}).get("enabled")
    assert rc["enableInTreeAutoscaling"] is (autoscales if explicit is None else explicit)


def test_head_runs_no_model_and_exposes_ray_ports():
    docs = render(PROFILES["default"])
    head = ray_cluster(docs)["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    (container,) = head["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"gcs-server": 6379, "dashboard": 8265, "client": 10001, "serve": 8000, "metrics": 8080}


def test_two_worker_groups_keep_their_own_scheduling():
    groups = {g["groupName"]: g for g in ray_cluster(render(PROFILES["two-groups"]))["workerGroupSpecs"]}
    assert set(groups) == {"a10g-on-demand", "a10g-spot"}
    on_demand, spot = groups["a10g-on-demand"], groups["a10g-spot"]
    assert (on_demand["replicas"], on_demand["minReplicas"], on_demand["maxReplicas"]) == (1, 1, 1)
    assert (spot["replicas"], spot["minReplicas"], spot["maxReplicas"]) == (0, 0, 2)
    assert on_demand["template"]["spec"]["nodeSelector"]["node.kubernetes.io/lifecycle"] == "on-demand"
    assert spot["template"]["spec"]["nodeSelector"]["node.kubernetes.io/lifecycle"] == "spot"
    assert {"key": "spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"} in spot["template"]["spec"]["tolerations"]
    assert on_demand["template"]["spec"]["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert spot["template"]["metadata"]["labels"]["example.com/capacity"] == "spot"
    for g in (on_demand, spot):
        (c,) = g["template"]["spec"]["containers"]
        assert c["resources"]["limits"]["memory"] == "96Gi"  # workerDefaults
        assert g["template"]["metadata"]["labels"]["kvpilot.io/worker-group"] == g["groupName"]


TWO_GPU_TYPES = {
    "applications": [
        {"name": "other", "import_path": "somewhere.else:app", "args": {}},
        {
            "name": "kvpilot",
            "route_prefix": "/",
            "import_path": APP_IMPORT_PATH,
            "args": {
                "models": [
                    {"name": "llama-70b", "source": "TheBloke/Llama-2-70B-AWQ", "quantization": "awq",
                     "accelerator": "A10G", "tensor_parallel_size": 2, "gpu_memory_utilization": 0.95,
                     "max_model_len": 4096, "max_num_seqs": 64, "min_replicas": 1, "max_replicas": 3},
                    {"name": "mistral", "source": "TheBloke/Mistral-7B-Instruct-v0.2-GPTQ", "quantization": "gptq",
                     "accelerator": "L4", "max_model_len": 16384, "cpus_per_worker": 3},
                ]
            },
        },
    ]
}


def test_models_on_two_gpu_types_get_a_group_each(tmp_path):
    chart = CHART
    values = {"serveConfig": yaml.safe_dump(TWO_GPU_TYPES, sort_keys=False), **IMAGE,
              "workerGroups": [{"name": "a10g", "models": ["llama-70b"]}, {"name": "l4", "accelerator": "L4"}]}
    docs = render(values, chart)
    _, cfg = _serve_config(docs, tmp_path)  # the second application is kvpilot's
    assert [m.name for m in cfg.models] == ["llama-70b", "mistral"]
    assert crd_errors(only(docs, "RayService"), "ray.io_rayservices.yaml") == []
    groups = {g["groupName"]: g for g in ray_cluster(docs)["workerGroupSpecs"]}
    a10g, l4 = groups["a10g"], groups["l4"]
    assert ray_resources(a10g["rayStartParams"]) == {"accelerator_type:A10G": 1}
    assert ray_resources(l4["rayStartParams"]) == {"accelerator_type:L4": 1}
    res = {n: g["template"]["spec"]["containers"][0]["resources"]["limits"] for n, g in groups.items()}
    assert (res["a10g"]["nvidia.com/gpu"], res["l4"]["nvidia.com/gpu"]) == ("2", "1")
    # Serve may scale llama to 3 replicas of 2 GPUs: the autoscaler may add pods up to that.
    assert (a10g["replicas"], a10g["minReplicas"], a10g["maxReplicas"]) == (1, 1, 3)
    assert ray_cluster(docs)["enableInTreeAutoscaling"] is True
    # CPUs: what one full pod's bundles reserve (cpus_per_worker per GPU + the replica actor) + 2 for Ray.
    assert res["l4"]["cpu"] == str(3 * 1 + 1 + 2)
    assert res["a10g"]["cpu"] == str(1 * 2 + 1 + 2)

    # One group for both GPU types cannot advertise both: refused, naming the group.
    with pytest.raises(Exception, match=r"workerGroups\[0\] \(gpu\) hosts models on A10G and L4"):
        render_files({**values, "workerGroups": [{"name": "gpu"}]}, chart)
    # Every model needs a group.
    with pytest.raises(Exception, match=r"model mistral \(accelerator L4\).*is hosted by no worker group"):
        render_files({**values, "workerGroups": [{"name": "a10g", "accelerator": "A10G"}]}, chart)


def test_cpu_config_is_refused_naming_the_field():
    # The laptop configs run on accelerator cpu; the chart's worker groups are GPU pods.
    with pytest.raises(helm.HelmRenderError, match=r'serveConfig: applications\[0\]\.args\.models\[0\]\.accelerator: "cpu" is not one of T4, '):
        render_files({"serveConfig": (CONFIGS / "local-cpu.yaml").read_text(), **IMAGE})


def test_gpus_per_pod_override_may_split_pipeline_stages(tmp_path):
    doc = yaml.safe_load((CONFIGS / "llama70b-awq.yaml").read_text())
    doc["applications"][0]["args"]["models"][0].update(pipeline_parallel_size=2, accelerator="L4", quantization="awq")
    chart = CHART
    base = {"serveConfig": yaml.safe_dump(doc), **IMAGE}
    (group,) = ray_cluster(render({**base, "workerGroups": [{"name": "gpu"}]}, chart))["workerGroupSpecs"]
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "4"
    # Two pods of two GPUs: each holds one pipeline stage's tensor-parallel pair.
    (group,) = ray_cluster(render({**base, "workerGroups": [{"name": "gpu", "gpusPerPod": 2}]}, chart))["workerGroupSpecs"]
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert group["replicas"] == 2


# --- endpoint, secrets, volumes ----------------------------------------------------------


def test_openai_endpoint_service_and_ingress():
    docs = render(PROFILES["ingress"])
    svc = only(docs, "RayService")["spec"]["serveService"]
    assert svc["metadata"]["name"] == FULLNAME
    assert svc["spec"]["ports"] == [{"name": "serve", "port": 8000, "targetPort": 8000, "protocol": "TCP"}]
    assert svc["metadata"]["annotations"] == {"example.com/team": "llm"}
    ingress = only(docs, "Ingress")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "llm.example.com"
    (path,) = rule["http"]["paths"]
    assert path["backend"]["service"] == {"name": FULLNAME, "port": {"name": "serve"}}
    assert ingress["spec"]["tls"] == [{"secretName": "llm-example-com-tls", "hosts": ["llm.example.com"]}]
    assert not [d for d in render(PROFILES["default"]) if d["kind"] == "Ingress"]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_secrets_reach_every_ray_container():
    docs = render(PROFILES["ingress"])
    secret = only(docs, "Secret")
    assert secret["metadata"]["name"] == f"{FULLNAME}-secrets"
    assert base64.b64decode(secret["data"]["KVPILOT_API_KEYS"]).decode() == "sk-test-one,sk-test-two"
    assert set(secret["data"]) == {"KVPILOT_API_KEYS"}  # HF_TOKEN comes from the user's own Secret
    for group, template in pod_templates(docs).items():
        env = _env(template["spec"]["containers"][0])
        assert env["KVPILOT_API_KEYS"]["valueFrom"]["secretKeyRef"] == {"name": f"{FULLNAME}-secrets", "key": "KVPILOT_API_KEYS"}, group
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-credentials", "key": "token"}, group
        assert template["spec"]["imagePullSecrets"] == [{"name": "registry-credentials"}]
    plain = render(PROFILES["default"])
    assert not [d for d in plain if d["kind"] == "Secret"]
    for template in pod_templates(plain).values():
        assert {"KVPILOT_API_KEYS", "HF_TOKEN"}.isdisjoint(_env(template["spec"]["containers"][0]))


def _volume(template: dict, mount_path: str) -> dict:
    (container,) = template["spec"]["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == mount_path]
    (volume,) = [v for v in template["spec"]["volumes"] if v["name"] == mount["name"]]
    return volume


@pytest.mark.parametrize("name", ["default", "ingress"])
def test_shared_memory_and_model_cache(name):
    templates = pod_templates(render(PROFILES[name]))
    for group, template in templates.items():
        shm = _volume(template, "/dev/shm")["emptyDir"]
        assert shm["medium"] == "Memory" and shm["sizeLimit"], group
        hf_home = _env(template["spec"]["containers"][0])["HF_HOME"]["value"]
        assert hf_home == "/data/huggingface"
        if group == "head" and name == "default":
            continue  # the head loads no weights; mounted there only with mountOnHead
        cache = _volume(template, hf_home)
        if name == "ingress":
            assert cache["persistentVolumeClaim"] == {"claimName": "hf-cache"}
        else:
            assert cache["emptyDir"] == {"sizeLimit": "200Gi"}
    assert _volume(templates["gpu"], "/dev/shm")["emptyDir"]["sizeLimit"] == "16Gi"
    assert _volume(templates["head"], "/dev/shm")["emptyDir"]["sizeLimit"] == "2Gi"


# --- monitoring and dashboards -----------------------------------------------------------


def _pod_labels(docs: list[dict]) -> list[dict[str, str]]:
    return [t["metadata"]["labels"] for t in pod_templates(docs).values()]


def _metrics_ports_declared(docs: list[dict]) -> None:
    for group, template in pod_templates(docs).items():
        ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
        assert ports["metrics"] == 8080, group


def test_pod_monitor_scrapes_every_ray_pod():
    docs = render(PROFILES["monitoring"])
    pm = only(docs, "PodMonitor")
    assert pm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert pm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    selector = pm["spec"]["selector"]["matchLabels"]
    for labels in _pod_labels(docs):
        assert selector.items() <= labels.items()
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"], endpoint["interval"]) == ("metrics", "/metrics", "30s")
    _metrics_ports_declared(docs)
    assert not [d for d in docs if d["kind"] == "ServiceMonitor"]


def test_service_monitor_scrapes_every_ray_pod_through_a_metrics_service():
    docs = render(PROFILES["servicemonitor"])
    sm = only(docs, "ServiceMonitor")
    (metrics_svc,) = [d for d in docs if d["kind"] == "Service"]
    assert sm["spec"]["selector"]["matchLabels"].items() <= metrics_svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert [e["port"] for e in sm["spec"]["endpoints"]] == ["metrics"]
    assert metrics_svc["spec"]["ports"] == [{"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}]
    for labels in _pod_labels(docs):
        assert metrics_svc["spec"]["selector"].items() <= labels.items()
    _metrics_ports_declared(docs)


def test_monitors_are_off_by_default():
    kinds = {d["kind"] for d in render(PROFILES["default"])}
    assert kinds.isdisjoint(MONITOR_KINDS)


def _dashboard_files() -> list[Path]:
    files = sorted((CHART / "dashboards").glob("*.json"))
    assert files, "no dashboard in helm/kvpilot/dashboards/"
    return files


@pytest.mark.parametrize("name", ["default", "servicemonitor"])
def test_dashboards_are_configmaps_for_the_grafana_sidecar(name):
    values = PROFILES[name]
    maps = {d["metadata"]["name"]: d for d in render(values) if d["kind"] == "ConfigMap"}
    namespace = values.get("grafana", {}).get("dashboards", {}).get("namespace") or NAMESPACE
    assert len(maps) == len(_dashboard_files())
    for path in _dashboard_files():
        cm = maps[f"{FULLNAME}-dashboard-{path.stem}"]
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert cm["metadata"]["namespace"] == namespace
        assert json.loads(cm["data"][path.name]) == json.loads(path.read_text())
    off = render({**PROFILES["default"], "grafana": {"dashboards": {"enabled": False}}})
    assert not [d for d in off if d["kind"] == "ConfigMap"]


@pytest.mark.parametrize("path", _dashboard_files(), ids=lambda p: p.name)
def test_dashboard_json_uses_a_prometheus_datasource_variable(path):
    dash = json.loads(path.read_text())
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = dash["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        for obj in [panel, *panel.get("targets", [])]:
            assert obj["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel.get("targets", []):
            assert target["expr"].strip(), panel["title"]


def test_notes_tell_how_to_reach_the_endpoint():
    notes = render_files(PROFILES["default"])["kvpilot/templates/NOTES.txt"]
    assert f"port-forward svc/{FULLNAME} 8000:8000" in notes
    assert "gpu: llama-2-70b-awq on A10G, 2 nvidia.com/gpu per pod" in notes
