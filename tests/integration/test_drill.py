"""Issue 9: the operator's chaos drill, small (40 orders, 30 s of worker kills, one Redis and one web
kill), end to end with real processes — every order applied exactly once, nothing left waiting at a
hand-off, nothing older than the bound once the faults stop, the audit chain intact. `make drill`
runs the full-size scenario (400 orders, 150 s of kills)."""

from __future__ import annotations

import argparse
import json
import os

import pytest

from tests.chaos.drill import Drill


@pytest.mark.slow
def test_small_drill_applies_every_order_exactly_once():
    pg = os.environ.get("TEST_DATABASE_URL")
    args = argparse.Namespace(
        orders=40,
        runs=1,
        postgres=pg,  # on PostgreSQL the drill creates and drops a database of its own there
        seed="ci",
        tail=240,
        chaos_seconds=30,
        keep=False,
    )
    drill = Drill(args, 1)
    try:
        result = drill.execute()
    finally:
        drill.teardown()
    assert result["passed"], json.dumps(result)
    assert result["worker_kills"] >= 5 and result["redis_kills"] == 1 and result["web_kills"] == 1
