"""Ray Serve LLM's OpenAI app on the CPU, for ``compare_servers.py`` (run with the benchmark venv's python).

Its own local Ray (``address="local"``: never someone else's cluster) with 8 logical CPUs
on a 2-core machine, so Serve's ingress and the LLM server both get scheduled; the engine
gets one CPU bundle instead of the default GPU bundle. Prints ``READY`` once the app is
deployed; SIGINT or SIGTERM shuts Serve and Ray down.

    /tmp/bench-venv/bin/python benchmarks/compare_rayllm_server.py --model-dir .fixtures/tiny-none \
        --port 8002 --dtype bfloat16 --max-model-len 2048 --max-num-seqs 64 --kv-cache-bytes 1073741824
"""

from __future__ import annotations

import argparse
import signal
import threading


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
    ns = p.parse_args()

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
