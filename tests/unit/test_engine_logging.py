"""vLLM's logging set-up must not break the replica's own log (Serve's buffered per-replica handler).

Run in a subprocess: vLLM's set-up (``logging.config.dictConfig``) closes every handler of the
process it runs in, pytest's own included.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import json, logging, logging.handlers, sys
from vllm.config.logging import LoggingConfig
from vllm.logger import configure_logging
from deployments.engine import log_handlers_kept

log_file, keep = sys.argv[1], sys.argv[2] == "keep"
handler = logging.handlers.MemoryHandler(1, target=logging.FileHandler(log_file))  # as Serve sets up a replica
serve_logger = logging.getLogger("ray.serve")
serve_logger.addHandler(handler)
serve_logger.setLevel(logging.INFO)
serve_logger.propagate = False
if keep:
    with log_handlers_kept():
        configure_logging(LoggingConfig())  # what building an engine's config does
else:
    configure_logging(LoggingConfig())
for i in range(100):
    serve_logger.info("CALL serve_http OK %d", i)
print(json.dumps({"buffered": len(handler.buffer), "has_target": handler.target is not None}))
"""


def _run(tmp_path: Path, mode: str) -> tuple[dict, list[str]]:
    log = tmp_path / f"{mode}.log"
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(log), mode], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, check=True)
    lines = log.read_text().splitlines() if log.exists() else []
    return json.loads(out.stdout.strip().splitlines()[-1]), lines


def test_vllm_logging_setup_keeps_the_replica_log_flowing(tmp_path):
    state, lines = _run(tmp_path, "keep")
    assert state == {"buffered": 0, "has_target": True}
    assert len(lines) == 100


def test_without_the_guard_vllm_setup_makes_the_buffer_keep_every_record(tmp_path):
    """The failure the guard prevents, as vLLM 0.32 behaves: nothing reaches the file, everything is kept."""
    state, lines = _run(tmp_path, "plain")
    assert state == {"buffered": 100, "has_target": False}
    assert lines == []
