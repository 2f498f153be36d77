"""Audit chain hashing (SPEC 6): hash = SHA-256(prev_hash ‖ canonical JSON of the event)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

GENESIS_HASH = "0" * 64

# The fields that are hashed, in the order exports present them.
EVENT_FIELDS = (
    "id",
    "occurred_at",
    "actor",
    "action",
    "subject_type",
    "subject_id",
    "from_state",
    "to_state",
    "reason",
    "reason_code",
    "details",
)


def format_timestamp(value: datetime) -> str:
    """UTC timestamps as ISO 8601 with microseconds and a Z (stored naive, always UTC)."""
    return value.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def canonical_json(event: Mapping[str, Any]) -> str:
    """Sorted keys, no whitespace, UTF-8 kept: the byte form that is hashed."""
    body = {}
    for name in EVENT_FIELDS:
        value = event.get(name)
        if isinstance(value, datetime):
            value = format_timestamp(value)
        body[name] = value
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def chain_hash(prev_hash: str, event: Mapping[str, Any]) -> str:
    return hashlib.sha256((prev_hash + canonical_json(event)).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    count: int
    head: str
    broken_id: int | None = None
    problem: str = ""


def verify_chain(events: Iterable[Mapping[str, Any]]) -> VerifyResult:
    """Recompute the chain in id order; report the first event whose link or hash is wrong."""
    prev = GENESIS_HASH
    count = 0
    expected_id = None
    for event in events:
        if expected_id is not None and event["id"] != expected_id:
            return VerifyResult(False, count, prev, event["id"], f"gap: expected event {expected_id}")
        if event["prev_hash"] != prev:
            return VerifyResult(
                False, count, prev, event["id"], "prev_hash does not match the previous event"
            )
        if chain_hash(prev, event) != event["hash"]:
            return VerifyResult(False, count, prev, event["id"], "hash does not match the event's content")
        prev = event["hash"]
        count += 1
        expected_id = event["id"] + 1
    return VerifyResult(True, count, prev)
