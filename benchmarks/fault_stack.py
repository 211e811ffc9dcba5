"""A local kvpilot stack for the hardening scripts (fault_kill, fault_burst, soak, fuzz_long): its own Ray.

``ray.init(address="local")`` always starts a new Ray instance, so a script never attaches to
(or stops) a cluster someone else started on the machine. The stack's processes (GCS, raylet,
Serve controller, proxy, ingress, replicas, vLLM engine cores, Ray's agents) are this process's
Ray node's and their descendants.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model(name: str = "tiny", replicas: int = 1, **overrides: Any) -> dict[str, Any]:
    """The fp16 tiny fixture on the CPU engine (``make setup`` builds it)."""
    return {"name": name, "source": str(ROOT / ".fixtures/tiny-none"), "dtype": "float16", "accelerator": "cpu",
            "cpu_kv_cache_space_gib": 0.5, "max_model_len": 1024, "max_num_seqs": 16,
            "min_replicas": replicas, "max_replicas": replicas, **overrides}


class LocalStack:
    """Ray + Serve on a free loopback port + kvpilot's app from config ``args``."""

    def __init__(self, args: dict[str, Any], num_cpus: int = 4, app: str = "kvpilot"):
        self.args, self.num_cpus, self.app = args, num_cpus, app
        self.url = ""

    def start(self) -> str:
        import ray
        from ray import serve

        from deployments.app import build_app

        os.chdir(ROOT)
        for attempt in range(3):  # on a loaded machine the GCS can miss its start-up deadline
            try:
                ray.init(address="local", num_cpus=self.num_cpus, include_dashboard=False, log_to_driver=False)
                break
            except Exception:
                ray.shutdown()
                if attempt == 2:
                    raise
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(self.args), name=self.app, route_prefix="/")
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    def redeploy(self, args: dict[str, Any]) -> None:
        """Deploy an edited config over the running app (Serve's in-place update, as ``serve deploy`` does)."""
        from ray import serve

        from deployments.app import build_app

        self.args = args
        serve.run(build_app(args), name=self.app, route_prefix="/")

    def stop(self) -> None:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()

    def hard_kill(self) -> list[int]:
        """What a crash or an OOM kill leaves: SIGKILL to every Ray process of the stack at once (as killing
        its process group, then ``ray stop --force``, do), none to vLLM's engine processes, nor this driver."""
        import signal

        me = os.getpid()
        victims = [p for p in self.processes() if p.pid != me and not is_engine(p)]
        for p in victims:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(victims, timeout=10)
        return [p.pid for p in victims]

    # --- looking inside -------------------------------------------------------

    def replicas(self, model: str) -> list[dict[str, Any]]:
        """Live replica actors of ``model``'s deployment: name, pid, actor id."""
        from cluster.serving.placement import deployment_name

        return self.deployment_replicas(deployment_name(model))

    def deployment_replicas(self, deployment: str) -> list[dict[str, Any]]:
        """Live replica actors of one of the app's deployments (a model's, or ``ingress``)."""
        from ray._private import state

        cls = f"ServeReplica:{self.app}:{deployment}"
        return [{"name": a["Name"], "pid": a["Pid"], "actor_id": a["ActorID"]}
                for a in state.actors().values() if a["ActorClassName"] == cls and a["State"] == "ALIVE"]

    def running_replicas(self, model: str) -> int:
        from ray import serve

        from cluster.serving.placement import deployment_name

        status = serve.status().applications[self.app].deployments[deployment_name(model)]
        return int(status.replica_states.get("RUNNING", 0))

    def kill_replica(self, name: str) -> None:
        import ray

        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)

    def processes(self) -> list[psutil.Process]:
        """Every process of the stack: this driver, the GCS, the raylet and all their descendants."""
        import ray

        node = ray._private.worker._global_node
        roots = [psutil.Process()]
        for infos in node.all_processes.values():
            for info in infos:
                try:
                    roots.append(psutil.Process(info.process.pid))
                except psutil.NoSuchProcess:
                    pass
        seen: dict[int, psutil.Process] = {}
        for root in roots:
            for p in [root, *root.children(recursive=True)]:
                seen.setdefault(p.pid, p)
        return list(seen.values())

    def logs_dir(self) -> Path:
        import ray

        return Path(ray._private.worker._global_node.get_logs_dir_path())


def role(p: psutil.Process) -> str:
    """A readable name for one process of the stack."""
    try:
        name = p.name()
        cmd = " ".join(p.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "gone"
    for key in ("ServeReplica", "ServeController", "ProxyActor", "EngineCore", "raylet", "gcs_server",
                "dashboard_agent", "runtime_env_agent", "log_monitor", "ray::IDLE"):
        if key in name or key in cmd:
            if key == "ServeReplica":
                return cmd.split()[0] if cmd else name
            return key
    return name


ENGINE_MARKERS = ("VLLM", "EngineCore")  # VLLM::EngineCore, VLLM::Worker (vLLM's process titles)


def is_engine(p: psutil.Process) -> bool:
    try:
        return any(m in p.name() for m in ENGINE_MARKERS) and p.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


class EngineWatch:
    """Every vLLM engine process the stack ever had (``see`` it often), and which outlived the stack.

    The machine may run other stacks: an orphan is one of *this* stack's engine processes still
    alive (not a zombie) once its replica or the whole stack is gone, whatever it was re-parented to.
    ``machine_orphans()`` is the wider view: engine processes with parent 1 on the whole machine.
    """

    def __init__(self) -> None:
        self.seen: dict[int, psutil.Process] = {}

    def see(self, processes: list[psutil.Process]) -> int:
        for p in processes:
            if p.pid not in self.seen and is_engine(p):
                self.seen[p.pid] = p
        return len(self.seen)

    def alive(self, among: set[int] | None = None) -> list[dict[str, Any]]:
        out = []
        for pid, p in self.seen.items():
            if among is not None and pid not in among:
                continue
            try:
                if p.is_running() and is_engine(p):  # is_running: the same process, not a reused pid
                    out.append({"pid": pid, "name": p.name(), "ppid": p.ppid()})
            except psutil.NoSuchProcess:
                pass
        return out

    def orphans(self, among: set[int] | None = None, within_s: float = 15.0) -> list[dict[str, Any]]:
        """Engine processes still alive ``within_s`` after their replica or stack died (must be [])."""
        deadline = time.monotonic() + within_s
        while (left := self.alive(among)) and time.monotonic() < deadline:
            time.sleep(0.25)
        return left


def machine_orphans() -> list[int]:
    """Engine processes with parent 1 anywhere on this machine (other users' included)."""
    out = []
    for p in psutil.process_iter(["name", "ppid"]):
        if p.info["ppid"] == 1 and is_engine(p):
            out.append(p.pid)
    return out


def engines_under(pid: int) -> list[psutil.Process]:
    """The vLLM engine processes below one process (a replica's engine core and its workers)."""
    try:
        return [p for p in psutil.Process(pid).children(recursive=True) if is_engine(p)]
    except psutil.NoSuchProcess:
        return []


def is_openai_error(text: str) -> bool:
    """An OpenAI error object: ``{"error": {"message", "type", "param", "code"}}``."""
    try:
        return set(json.loads(text)["error"]) == {"message", "type", "param", "code"}
    except (ValueError, KeyError, TypeError):
        return False


def wait_for(predicate: Any, timeout_s: float, period_s: float = 0.5) -> float | None:
    """Seconds until ``predicate()`` held, or None after ``timeout_s``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if predicate():
            return time.monotonic() - started
        time.sleep(period_s)
    return None


def add_fault_args(p: argparse.ArgumentParser, stream_timeout: float, num_cpus: int, recover: bool = True) -> None:
    """The options every fault script shares: when a stream counts as hung, how long recovery may take,
    Ray's logical CPUs and the results folder."""
    p.add_argument("--stream-timeout", type=float, default=stream_timeout,
                   help="a stream not ended by then counts as hung")
    if recover:
        p.add_argument("--recover-timeout", type=float, default=600.0)
    p.add_argument("--num-cpus", type=int, default=num_cpus)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")


def timestamp() -> str:
    """Now as ``YYYYmmdd-HHMMSS``: the suffix of every result file the scripts write."""
    return f"{datetime.now():%Y%m%d-%H%M%S}"


def start_stack(stack: LocalStack) -> None:
    """Start ``stack`` and print how long it took and where it listens."""
    started = time.monotonic()
    stack.start()
    print(f"stack up in {time.monotonic() - started:.0f} s at {stack.url}", flush=True)


def provenance() -> dict[str, str]:
    """What produced a result: the command line and the checkout's commit (``-dirty`` with uncommitted changes)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    commit = git("rev-parse", "HEAD") or "unknown (not a git checkout)"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += "-dirty"
    return {"commit": commit, "command": " ".join([Path(sys.executable).name, *sys.argv])}


def write_result(out: Path, name: str, ns: argparse.Namespace, **fields: Any) -> Path:
    """``OUT/NAME-<time>.json``: what produced it, the script's arguments, ``fields`` and the load average."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}-{timestamp()}.json"
    path.write_text(json.dumps({**provenance(), "args": {k: str(v) for k, v in vars(ns).items()}, **fields,
                                "load_average": os.getloadavg()}, indent=2))
    print(f"wrote {path}")
    return path
