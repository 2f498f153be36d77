"""Issue 6 `make drill`, small: 40 messages (a quarter HL7 v2 over MLLP), 25 s of worker kills, one
Redis and one web kill, the simulator's bursts of 503 and 429 (with Retry-After) and resets on both
protocols on top of its random commit-then-drop, rejections and late commits, the human queue worked
through the API — end to end with real processes: every message applied exactly once by the
simulator's own count, nothing held or open at the end, nothing waiting at a hand-off, nothing older
than the bound once the faults stop, the audit chain intact. `make drill` runs the full-size scenario
(400 messages, 150 s of kills)."""

from __future__ import annotations

import argparse
import json
import os

import pytest

from tests.chaos.drill import Drill, table


@pytest.mark.slow
def test_small_drill_applies_every_message_exactly_once():
    pg = os.environ.get("TEST_DATABASE_URL")
    args = argparse.Namespace(
        orders=40,
        runs=1,
        postgres=pg,  # on PostgreSQL the drill creates and drops a database of its own there
        seed="ci",
        tail=240,
        chaos_seconds=25,
        rate=7,
        hl7_share=0.25,
        review_every=2,  # the people look often: the run is short
        slow_commit_seconds=8,  # late commits land after 8 s (the FHIR read timeout follows: 10 s)
        json=False,
        keep=False,
    )
    drill = Drill(args, 1)
    try:
        result = drill.execute()
    finally:
        drill.teardown()
    assert result["passed"], table(result) + "\n" + json.dumps(result)
    assert (result["duplicates"], result["lost"]) == (0, 0)
    assert result["submitted_hl7"] > 0 and result["hl7_lookups"], "no HL7 message needed a person"
    assert result["worker_kills"] >= 3 and result["redis_kills"] == 1 and result["web_kills"] == 1
