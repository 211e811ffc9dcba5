"""GPU placement proven on a real Ray cluster whose nodes declare logical GPUs.

The deployment options are the ones `build_app` uses (cluster.serving.placement); a plain
actor per bundle stands in for vLLM's Ray workers, which is what vLLM's Ray
executor does inside the replica's placement group.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
from ray import serve
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.config import ClusterConfig, ModelConfig
from cluster.serving.placement import deployment_options

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.serve


@ray.remote
class _Worker:
    def where(self) -> tuple[str, list]:
        ctx = ray.get_runtime_context()
        return ctx.get_node_id(), [str(g) for g in ray.get_gpu_ids()]


class StandInReplica:
    """Starts one GPU worker per bundle of its placement group, as vLLM's Ray executor would."""

    def __init__(self, model: ModelConfig):
        pg = get_current_placement_group()
        assert pg is not None, "replica was not given a placement group"
        self._workers = [
            _Worker.options(
                num_gpus=1,
                num_cpus=model.cpus_per_worker,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
            ).remote()
            for i in range(model.world_size)
        ]
        self._node = ray.get_runtime_context().get_node_id()

    def placement(self) -> dict:
        return {"replica_node": self._node, "workers": ray.get([w.where.remote() for w in self._workers])}


def _deploy(model: ModelConfig, replicas: int) -> list[dict]:
    opts = deployment_options(model) | {"num_replicas": replicas}
    handle = serve.run(serve.deployment(StandInReplica).options(**opts).bind(model), name="placement",
                       route_prefix=None)
    seen: dict[str, dict] = {}
    for _ in range(50 * replicas):  # power-of-two routing reaches every replica soon enough
        p = handle.placement.remote().result()
        seen[p["replica_node"] + str(p["workers"])] = p
        if len(seen) == replicas:
            break
    return list(seen.values())


@pytest.fixture
def gpu_cluster():
    from ray.cluster_utils import Cluster

    made = []

    def make(nodes: int, gpus_per_node: int) -> None:
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0})
        for _ in range(nodes):
            c.add_node(num_cpus=8, num_gpus=gpus_per_node, resources={"accelerator_type:A10G": 1})
        ray.init(address=c.address, log_to_driver=False)
        made.append(c)

    yield make
    serve.shutdown()
    ray.shutdown()
    for c in made:
        c.shutdown()


def _llama70b(**update) -> ModelConfig:
    m = ClusterConfig.from_serve_yaml(ROOT / "configs/llama70b-awq.yaml").models[0]
    return m.model_copy(update=update)


def test_strict_pack_keeps_each_tp2_replica_on_one_node(gpu_cluster):
    gpu_cluster(nodes=2, gpus_per_node=2)
    placements = _deploy(_llama70b(placement_strategy="STRICT_PACK"), replicas=2)
    assert len(placements) == 2
    all_gpus = set()
    for p in placements:
        nodes = {node for node, _ in p["workers"]}
        assert nodes == {p["replica_node"]}, "a TP=2 replica under STRICT_PACK must sit on one node"
        gpus = [(node, g) for node, ids in p["workers"] for g in ids]
        assert len(gpus) == 2 and len(set(gpus)) == 2, "each worker gets its own GPU"
        all_gpus |= set(gpus)
    assert len(all_gpus) == 4  # two replicas, four distinct GPUs: the cluster is exactly full


def test_pack_lets_a_replica_span_nodes_when_it_must(gpu_cluster):
    gpu_cluster(nodes=2, gpus_per_node=1)
    (p,) = _deploy(_llama70b(placement_strategy="PACK"), replicas=1)
    assert len({node for node, _ in p["workers"]}) == 2
    assert p["workers"][0][0] == p["replica_node"]  # the replica actor shares the first worker's bundle
