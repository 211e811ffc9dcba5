"""A user's file refused naming the field; upgrades, drains and the model cache as rendered."""

from __future__ import annotations

import http.server
import re
import subprocess
import threading
import time

import helm_python as helm
import pytest
import yaml

from cluster.config import ClusterConfig, ConfigError
from cluster.serving.placement import graceful_shutdown_s
from tests.helm.conftest import CONFIGS, PROFILES, crd_errors, only, pod_templates, ray_cluster, render, render_files
from tests.helm.test_chart import GPU_CONFIGS, IMAGE, MY_GROUPS, MY_MODELS

pytestmark = pytest.mark.helm

NOTES = "kvpilot/templates/NOTES.txt"


# --- a bad file is refused at `helm install`, naming the field ---------------------------

BAD_FILES = [
    pytest.param("tensor_parallel_size: 2", "tensor_paralel_size: 2", r"models\[1\]\.tensor_paralel_size: unknown field", id="typo"),
    pytest.param("tensor_parallel_size: 2", "tensor_parallel_size: two", r"models\[1\]\.tensor_parallel_size: \"two\" is a string, want integer", id="wrong-type"),
    pytest.param("accelerator: A10G", "accelerator: A100", r"models\[1\]\.accelerator: \"A100\" is not one of T4, ", id="unknown-gpu"),
    pytest.param("max_model_len: 4096", "max_model_len: 8", r"models\[1\]\.max_model_len: 8 is below the minimum 16", id="below-minimum"),
    pytest.param("gpu_memory_utilization: 0.95", "gpu_memory_utilization: 1.5", r"models\[1\]\.gpu_memory_utilization: 1.5 is above the maximum 1", id="above-maximum"),
]


@pytest.mark.parametrize(("good", "bad", "says"), BAD_FILES)
def test_a_bad_serve_config_file_is_refused_naming_the_field(good, bad, says, tmp_path):
    text = MY_MODELS.replace(good, bad)
    assert text != MY_MODELS
    path = tmp_path / "my-models.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError):  # kvpilot validate refuses it too
        ClusterConfig.from_serve_yaml(path)
    with pytest.raises(helm.HelmRenderError, match=r"serveConfig: applications\[1\]\.args\." + says):
        render_files({**IMAGE, "serveConfig": text, "workerGroups": MY_GROUPS})


def test_model_without_max_model_len_is_refused():
    text = MY_MODELS.replace("          max_model_len: 4096\n", "")
    with pytest.raises(helm.HelmRenderError, match=r"applications\[1\]\.args\.models\[1\]\.max_model_len: required field is missing"):
        render_files({**IMAGE, "serveConfig": text, "workerGroups": MY_GROUPS})


def test_neither_file_nor_args_says_how_to_give_one():
    with pytest.raises(helm.HelmRenderError, match=r"--set-file serveConfig=my-models.yaml"):
        render_files(IMAGE)


# --- upgrades ------------------------------------------------------------------------------

INCREMENTAL = {"strategy": "NewClusterWithIncrementalUpgrade",
               "incremental": {"gatewayClassName": "istio", "stepSizePercent": 20, "intervalSeconds": 30, "maxSurgePercent": 50}}


@pytest.mark.parametrize("strategy", ["NewCluster", "None"])
def test_plain_strategies_render_as_kubray_types(strategy):
    docs = render({**PROFILES["default"], "upgrade": {"strategy": strategy}})
    rs = only(docs, "RayService")
    assert rs["spec"]["upgradeStrategy"] == {"type": strategy}
    assert crd_errors(rs, "ray.io_rayservices.yaml") == []


def test_incremental_upgrade_renders_clusterupgradeoptions_the_crd_accepts():
    values = {**PROFILES["monitoring"], "upgrade": INCREMENTAL}  # llama3-8b-fp8 autoscales 1..4
    files = render_files(values)
    rs = only(render(values), "RayService")
    assert rs["spec"]["upgradeStrategy"] == {
        "type": "NewClusterWithIncrementalUpgrade",
        "clusterUpgradeOptions": {"gatewayClassName": "istio", "stepSizePercent": 20, "intervalSeconds": 30, "maxSurgePercent": 50},
    }
    assert rs["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    assert crd_errors(rs, "ray.io_rayservices.yaml") == []
    assert "up to 50% extra capacity, traffic moved 20% every 30 s" in files[NOTES]
    assert "get gateway,httproute" in files[NOTES]
    # The CRD itself requires the three options KubeRay's operator reads.
    del rs["spec"]["upgradeStrategy"]["clusterUpgradeOptions"]["intervalSeconds"]
    assert any("intervalSeconds" in e for e in crd_errors(rs, "ray.io_rayservices.yaml"))


# --- drains -------------------------------------------------------------------------------


def _drain_values() -> list:
    cases = [pytest.param({**IMAGE, "serveConfig": MY_MODELS, "workerGroups": MY_GROUPS}, id="my-models")]
    cases += [pytest.param({**IMAGE, "serveConfig": (CONFIGS / c).read_text()}, id=c) for c in GPU_CONFIGS]
    return cases


@pytest.mark.parametrize("values", _drain_values())
def test_drain_times_are_graceful_shutdown_s_of_the_models_they_host(values, tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(values["serveConfig"])
    drain = {m.name: graceful_shutdown_s(m) for m in ClusterConfig.from_serve_yaml(path).models}
    files = render_files(values)
    docs = [d for name, text in files.items() if not name.endswith("NOTES.txt") for d in yaml.safe_load_all(text) if d]
    rs = only(docs, "RayService")
    assert rs["spec"]["rayClusterDeletionDelaySeconds"] == max(drain.values())
    templates = pod_templates(docs)
    for group in ray_cluster(docs)["workerGroupSpecs"]:
        hosted = group["template"]["metadata"]["annotations"]["kvpilot.io/models"].split(",")
        longest = max(drain[m] for m in hosted)
        spec = templates[group["groupName"]]["spec"]
        assert spec["terminationGracePeriodSeconds"] == longest + 30
        (command,) = [c["lifecycle"]["preStop"]["exec"]["command"][2] for c in spec["containers"]]
        assert f" {longest} http://127.0.0.1:8080/metrics; ray stop" in command
        assert f"{group['groupName']} pods: preStop waits up to {longest} s for in-flight requests, terminationGracePeriodSeconds {longest + 30}" in files[NOTES]
    assert templates["head"]["spec"]["terminationGracePeriodSeconds"] == max(drain.values()) + 30
    for name, seconds in drain.items():
        assert re.search(rf"{re.escape(name)}: longest stream \d+ tokens x 100 ms \+ 30 s = graceful shutdown {seconds} s", files[NOTES])


def test_notes_show_the_derived_drain_of_the_user_model():
    notes = render_files({**IMAGE, "serveConfig": MY_MODELS, "workerGroups": MY_GROUPS})[NOTES]
    # qwen-7b: limits.max_tokens 2048 < max_model_len 16384 -> 205 + 30 s; llama-70b: 4096 tokens -> 410 + 30 s.
    assert "qwen-7b: longest stream 2048 tokens x 100 ms + 30 s = graceful shutdown 235 s" in notes
    assert "llama-70b: longest stream 4096 tokens x 100 ms + 30 s = graceful shutdown 440 s" in notes
    assert "head pod: preStop up to 440 s, terminationGracePeriodSeconds 470" in notes


class _Metrics(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(type(self).body)

    def log_message(self, *args):
        pass


def _prestop_script(deadline_s: int, url: str) -> list[str]:
    """The rendered preStop command, pointed at `url`, without its final `ray stop`."""
    spec = pod_templates(render(PROFILES["default"]))["gpu"]["spec"]
    (command,) = [c["lifecycle"]["preStop"]["exec"]["command"] for c in spec["containers"]]
    shell = command[2].replace(" 440 http://127.0.0.1:8080/metrics; ray stop", f" {deadline_s} {url}")
    assert shell != command[2]
    return [command[0], command[1], shell]


@pytest.mark.parametrize(("body", "waits"), [
    (b'ray_serve_num_ongoing_http_requests{node="a"} 0.0\nray_serve_replica_processing_queries{replica="r"} 0.0\n', False),
    (b'ray_serve_replica_processing_queries{replica="r",model="m"} 2.0\n', True),
    (b'ray_serve_num_ongoing_http_requests 1\n', True),
])
def test_prestop_waits_only_while_requests_are_in_flight(body, waits):
    _Metrics.body = body
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        started = time.monotonic()
        subprocess.run(_prestop_script(3, f"http://127.0.0.1:{server.server_port}/metrics"), check=True, timeout=30)
        took = time.monotonic() - started
    finally:
        server.shutdown()
    assert (took >= 3) is waits, f"preStop took {took:.1f} s"


# --- model cache ------------------------------------------------------------------------------


def _cache(values: dict) -> tuple[dict, list[dict]]:
    docs = render({**PROFILES["default"], "modelCache": values})
    spec = pod_templates(docs)["gpu"]["spec"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == "model-cache"]
    return volume, docs


def test_cache_on_a_claim_the_chart_creates_and_keeps():
    volume, docs = _cache({"type": "persistentVolumeClaim", "persistentVolumeClaim": {"storageClassName": "efs", "size": "300Gi"}})
    assert volume["persistentVolumeClaim"] == {"claimName": "demo-kvpilot-model-cache"}
    pvc = only(docs, "PersistentVolumeClaim")
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert pvc["spec"] == {"accessModes": ["ReadWriteMany"], "storageClassName": "efs", "resources": {"requests": {"storage": "300Gi"}}}
    volume, docs = _cache({"type": "persistentVolumeClaim", "persistentVolumeClaim": {"existingClaim": "mine"}})
    assert volume["persistentVolumeClaim"] == {"claimName": "mine"}
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]


def test_cache_on_the_node_is_handed_to_the_ray_user():
    volume, docs = _cache({"type": "hostPath", "hostPath": {"path": "/mnt/nvme/hf"}})
    assert volume["hostPath"] == {"path": "/mnt/nvme/hf", "type": "DirectoryOrCreate"}
    spec = pod_templates(docs)["gpu"]["spec"]
    (init,) = spec["initContainers"]
    assert init["command"][-1] == "chown 1000:100 /data/huggingface"
    assert init["volumeMounts"] == [{"name": "model-cache", "mountPath": "/data/huggingface"}]
    assert "initContainers" not in pod_templates(docs)["head"]["spec"]
    assert crd_errors(only(docs, "RayService"), "ray.io_rayservices.yaml") == []
