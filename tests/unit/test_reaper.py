"""deployments/reaper.py: a child armed with die_with_parent ends when its parent is SIGKILLed."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from deployments import reaper

ROOT = Path(__file__).resolve().parents[2]
CHILD = "import os, time; from deployments.reaper import die_with_parent; die_with_parent(os.getppid()); time.sleep(120)"


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # re-parented, dead, not yet reaped
    except psutil.NoSuchProcess:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_child_dies_when_its_parent_is_sigkilled():
    parent_code = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', {CHILD!r}]); "
                   "print(p.pid, flush=True); time.sleep(120)")
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        child = int(parent.stdout.readline())
        time.sleep(1.0)  # armed by now
        assert not _gone(child)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 5
        while not _gone(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(child), "the child outlived its SIGKILLed parent"
    finally:
        parent.kill()
        parent.wait()


def test_a_child_whose_parent_is_already_gone_ends_at_once():
    code = "from deployments.reaper import die_with_parent; import time; die_with_parent(2 ** 22 + 7); time.sleep(60)"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=30)
    assert r.returncode == -signal.SIGKILL


def test_install_swaps_vllm_targets_for_picklable_wrappers():
    from vllm.v1.engine.core import EngineCoreProc
    from vllm.v1.executor.multiproc_executor import WorkerProc

    saved = {k: v for k, v in (("run_engine_core", EngineCoreProc.__dict__["run_engine_core"]),
                               ("worker_main", WorkerProc.__dict__["worker_main"]))}
    originals = dict(reaper._ORIGINALS)
    try:
        reaper.install()
        reaper.install()  # idempotent: the originals stay vLLM's
        target = EngineCoreProc.run_engine_core
        assert target.func is reaper._engine_core_main and target.args == (os.getpid(),)
        assert reaper._ORIGINALS["engine_core"] is saved["run_engine_core"].__func__
        assert WorkerProc.worker_main.func is reaper._worker_main
        # spawn pickles the target by name: the child imports deployments.reaper, not a closure
        again = pickle.loads(pickle.dumps(target))
        assert again.func is reaper._engine_core_main and again.args == (os.getpid(),)
    finally:
        EngineCoreProc.run_engine_core = saved["run_engine_core"]
        WorkerProc.worker_main = saved["worker_main"]
        reaper._ORIGINALS.clear()
        reaper._ORIGINALS.update(originals)
