"""GPU memory of a replica's engine, read through NVML (``nvidia-ml-py``).

A replica's GPUs are those on which its engine's processes run: the replica
itself, its child processes, and the Ray actors in its placement group (vLLM's
Ray workers). NVML sees only this node's GPUs, so a replica spread over nodes
(``PACK``) reports the GPUs on its own node. Without NVML (a CPU machine, no
driver, no ``nvidia-ml-py``) ``sample()`` returns nothing and one log line says why.
"""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger("kvpilot.gpu")


class GpuMemoryProbe:
    def __init__(self, enabled: bool = True):
        self._nvml: Any = None
        if not enabled:
            logger.info("GPU memory metrics absent: this replica runs on the CPU engine")
            return
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as e:  # ImportError, NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded, ...
            logger.warning("GPU memory metrics absent: NVML unavailable (%s: %s)", type(e).__name__, e)
            return
        self._nvml = pynvml

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def sample(self) -> list[tuple[int, int, int]]:
        """(NVML index, used bytes, total bytes) of each local GPU this replica's engine uses."""
        if self._nvml is None:
            return []
        nvml = self._nvml
        pids = _engine_pids()
        out = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            procs = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
            if any(p.pid in pids for p in procs):
                mem = nvml.nvmlDeviceGetMemoryInfo(handle)
                out.append((index, int(mem.used), int(mem.total)))
        return out


def _engine_pids() -> set[int]:
    import psutil

    me = psutil.Process(os.getpid())
    pids = {me.pid} | {c.pid for c in me.children(recursive=True)}
    try:
        import ray
        from ray.util.placement_group import get_current_placement_group
        from ray.util.state import list_actors

        pg = get_current_placement_group()
        if pg is not None and ray.is_initialized():
            for actor in list_actors(filters=[("placement_group_id", "=", pg.id.hex())], detail=True):
                if actor.pid:
                    pids.add(int(actor.pid))
    except Exception as e:  # the state API is best effort: local processes still count
        logger.debug("placement group actors not listed: %s", e)
    return pids
