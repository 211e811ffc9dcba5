"""The README's numbers come from the commands it shows: rerun each and compare what it prints."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
KVPILOT = Path(sys.executable).parent / "kvpilot"


def _console_runs() -> list[tuple[str, int, list[str]]]:
    """(command, expected exit status, printed lines) for every `$ kvpilot ...` in a console block."""
    runs = []
    for block in re.findall(r"```console\n(.*?)```", README, re.S):
        lines = block.replace("\\\n", " ").splitlines()
        for i, line in enumerate(lines):
            if not line.startswith("$ kvpilot "):
                continue
            command, _, comment = line[2:].partition("#")
            status = int(m.group(1)) if (m := re.search(r"exit status (\d+)", comment)) else 0
            printed = []
            for out in lines[i + 1:]:
                if out.startswith("$ "):
                    break
                if out.strip() and out.strip() != "...":
                    printed.append(out.rstrip())
            runs.append((command.strip(), status, printed))
    return runs


def test_readme_shows_plans():
    assert len(_console_runs()) >= 2


def test_every_readme_plan_is_what_the_command_prints():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    for command, status, printed in _console_runs():
        argv = [str(KVPILOT), *shlex.split(command)[1:]]
        out = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
        assert out.returncode == status, (command, out.stdout[-2000:], out.stderr[-2000:])
        got = [line.rstrip() for line in out.stdout.splitlines()]
        missing = [line for line in printed if line not in got]
        assert not missing, f"`{command}` no longer prints these README lines: {missing}\ngot:\n" + "\n".join(got)


def test_readme_config_example_validates():
    block = re.search(r"## A config\n\n```yaml\n(.*?)```", README, re.S).group(1)
    from cluster.config import ClusterConfig

    args = yaml.safe_load(block)["applications"][0]["args"]
    cfg = ClusterConfig.from_args(args)
    assert cfg.models[0].tensor_parallel_size == 2
