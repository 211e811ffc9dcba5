"""Unit tests never reach the network: hub ids resolve offline (the cache, else kvpilot's
shipped config.json copies). Tests of hub resolution run their own loopback hub server
in a subprocess with HF_ENDPOINT pointed at it (tests/hub_server.py)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
