"""No vLLM engine process outlives its replica, however the replica dies (the vLLM adapter).

vLLM starts its engine core (``VLLM::EngineCore``) with multiprocessing from the replica,
and the engine core starts its workers (``VLLM::Worker``) the same way. vLLM's workers
watch a pipe to the engine core, but only once their model is loaded, and the engine
core watches nothing: when the replica's process is SIGKILLed (``ray stop --force``, the
process group killed, the OOM killer) the engine core is re-parented and keeps running,
with its memory (on a GPU, the card's) and its CPU.

``install()``, called in the replica before the ``AsyncLLM`` is built, swaps the targets
vLLM hands to ``multiprocessing`` (``EngineCoreProc.run_engine_core``, and inside the
engine core ``WorkerProc.worker_main``) for wrappers that first call
``die_with_parent``: the kernel sends SIGKILL to the child when its parent exits
(``PR_SET_PDEATHSIG``), and a watcher thread kills it too should its parent pid change
(the kernel's signal is tied to the thread that started the child; the watcher is the
fallback). The wrappers are module functions bound with ``functools.partial`` to the
parent's pid, so they pickle by name for vLLM's ``spawn`` start method.

The engine must be built on a thread that lives as long as the replica (the replica's
event loop): ``PR_SET_PDEATHSIG`` fires when the creating thread ends.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import signal
import sys
import threading
from typing import Any

logger = logging.getLogger("kvpilot.reaper")

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
WATCH_PERIOD_S = 1.0  # the watcher's poll; the kernel's signal itself is immediate
_ORIGINALS: dict[str, Any] = {}  # vLLM's own targets, in the process that swapped them


def die_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> bool:
    """Make this process get ``sig`` when ``parent_pid`` (its parent) exits; True if the kernel took it."""
    armed = False
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        armed = libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os.kill(os.getpid(), sig)

    def watch() -> None:
        while not _stop.wait(WATCH_PERIOD_S):
            if os.getppid() != parent_pid:
                os.kill(os.getpid(), sig)

    threading.Thread(target=watch, name="kvpilot-parent-watch", daemon=True).start()
    return armed


_stop = threading.Event()  # set only by tests


def _engine_core_main(parent_pid: int, *args: Any, **kwargs: Any) -> Any:
    """The engine core's multiprocessing target: dies with the replica, its workers die with it."""
    die_with_parent(parent_pid)
    from vllm.v1.engine.core import EngineCoreProc

    original = _ORIGINALS.get("engine_core", EngineCoreProc.run_engine_core)  # inherited only under fork
    _install_workers()
    return original(*args, **kwargs)


def _worker_main(parent_pid: int, *args: Any, **kwargs: Any) -> Any:
    """A vLLM worker's multiprocessing target: dies with its engine core."""
    die_with_parent(parent_pid)
    from vllm.v1.executor.multiproc_executor import WorkerProc

    return _ORIGINALS.get("worker", WorkerProc.worker_main)(*args, **kwargs)


def _swap(key: str, cls: type, name: str, wrapper: Any) -> None:
    current = cls.__dict__.get(name)
    target = getattr(current, "__func__", current)
    if isinstance(target, functools.partial) and target.func is wrapper and target.args == (os.getpid(),):
        return  # already swapped in this process
    if key not in _ORIGINALS:
        _ORIGINALS[key] = getattr(cls, name)
    setattr(cls, name, staticmethod(functools.partial(wrapper, os.getpid())))


def _install_workers() -> None:
    try:
        from vllm.v1.executor.multiproc_executor import WorkerProc
    except ImportError:  # pragma: no cover - a vLLM without the multiprocessing executor
        return
    _swap("worker", WorkerProc, "worker_main", _worker_main)


def install() -> None:
    """In the replica, before the engine starts: its engine core (and that one's workers) die with this process.

    ``KVPILOT_ENGINE_REAPER=0`` leaves vLLM's targets alone (only to measure what happens without).
    """
    if os.environ.get("KVPILOT_ENGINE_REAPER", "1") == "0":
        logger.warning("KVPILOT_ENGINE_REAPER=0: this replica's engine processes may outlive it")
        return
    from vllm.v1.engine.core import EngineCoreProc

    _swap("engine_core", EngineCoreProc, "run_engine_core", _engine_core_main)
    _install_workers()  # a uniproc engine in the replica itself (none today) would start workers from here
