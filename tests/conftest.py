"""Tests never reach the network: hub ids resolve offline (the cache, else kvpilot's
shipped config.json copies). Tests of hub resolution run their own loopback hub server
in a subprocess with HF_ENDPOINT pointed at it (tests/hub_server.py)."""

import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(autouse=True)
def _hub_offline(monkeypatch):
    """Also when huggingface_hub's constants were imported before this file set the variable
    (it reads HF_HUB_OFFLINE once, at import)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
