"""The ingress's readiness probe without a Ray cluster: a loading model is one pending call, no traceback.

``Ingress._probe`` runs on a stand-in for the ingress with a handle whose ``ready`` call
answers when the test says so, as Serve's queue does for a model that is still loading.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from types import SimpleNamespace

import pytest

pytest.importorskip("ray.serve")

import deployments.ingress as ingress_mod  # noqa: E402


class _Handle:
    def __init__(self) -> None:
        self.calls: list[asyncio.Future] = []
        self.fail_with: Exception | None = None  # the next calls fail at once (the replica died)

    @property
    def ready(self) -> SimpleNamespace:
        def remote() -> asyncio.Future:
            f = asyncio.get_running_loop().create_future()
            if self.fail_with is not None:
                f.set_exception(self.fail_with)
            self.calls.append(f)
            return f

        return SimpleNamespace(remote=remote)


def _ingress(handle: _Handle) -> SimpleNamespace:
    return SimpleNamespace(_calls={"tiny": handle}, _probes={}, _starting_since={})


def _probe(ing: SimpleNamespace) -> str:
    return ingress_mod.Ingress.func_or_class._probe(ing, "tiny")


def test_a_loading_model_is_one_pending_call_and_one_log_line(monkeypatch, caplog):
    monkeypatch.setattr(ingress_mod, "HEALTH_PROBE_TIMEOUT_S", 0.05)
    handle, errors = _Handle(), []

    async def main() -> list[str]:
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
        ing = _ingress(handle)
        states = [await _probe(ing) for _ in range(5)]  # the model loads: every probe waits on the same call
        assert len(handle.calls) == 1 and not handle.calls[0].cancelled()
        handle.calls[0].set_result(True)  # a replica answers
        states.append(await _probe(ing))
        handle.fail_with = RuntimeError("replica died")
        states.append(await _probe(ing))  # asks again: a ready replica can die
        assert len(handle.calls) == 2
        return states

    with caplog.at_level(logging.INFO, logger="kvpilot.ingress"):
        states = asyncio.run(main())
    gc.collect()
    assert states == ["unavailable"] * 5 + ["ready", "unavailable"]
    lines = [r.getMessage() for r in caplog.records]
    assert sum("no replica answers yet" in m for m in lines) == 1, lines
    assert sum("a replica answers" in m for m in lines) == 1, lines
    assert sum("readiness probe failed: RuntimeError: replica died" in m for m in lines) == 1, lines
    assert not any(r.exc_info for r in caplog.records)
    assert errors == []  # no "Task exception was never retrieved"
