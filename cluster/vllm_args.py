"""The one thing ``cluster/`` asks vLLM: the field names of its ``EngineArgs``.

An adapter module (allow-listed in ``tests/unit/test_purity.py``): ``cluster/config.py``
checks a model's ``engine_kwargs`` against these names where vLLM is installed and
skips the check where it is not, so the config itself never imports vLLM.
"""

from __future__ import annotations

import dataclasses
import importlib.util


def engine_arg_names() -> list[str] | None:
    """EngineArgs field names when vLLM is installed; None (no check) where it is not."""
    if importlib.util.find_spec("vllm") is None:
        return None
    from vllm.engine.arg_utils import EngineArgs

    return [f.name for f in dataclasses.fields(EngineArgs)]
