"""Discrete-event simulator of vLLM replicas behind a router (pure Python: no Ray, no vLLM).

``make_setup`` plans the replica and fits its step model, ``load_trace`` reads a
trace, ``simulate`` replays it under one routing policy of ``cluster.routing.policies``.
"""

from cluster.sim.simulator import Setup, make_setup, simulate
from cluster.sim.workload import Workload, load_trace

__all__ = ["Setup", "Workload", "load_trace", "make_setup", "simulate"]
