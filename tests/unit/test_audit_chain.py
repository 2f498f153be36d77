"""SPEC 6: the hash chain and its verification, without a database."""

from datetime import datetime

from hypothesis import given
from hypothesis import strategies as st

from app.domain.audit_chain import GENESIS_HASH, canonical_json, chain_hash, verify_chain


def make_chain(n: int) -> list[dict]:
    events, prev = [], GENESIS_HASH
    for i in range(1, n + 1):
        e = {
            "id": i,
            "occurred_at": datetime(2026, 1, 1, 0, 0, i % 60),
            "actor": "rita",
            "action": "decision.comment",
            "subject_type": "exception",
            "subject_id": str(i),
            "from_state": "open",
            "to_state": "open",
            "reason": f"note {i} — café",
            "reason_code": None,
            "details": {"b": 1, "a": [1, 2]},
            "prev_hash": prev,
        }
        e["hash"] = chain_hash(prev, e)
        prev = e["hash"]
        events.append(e)
    return events


def test_canonical_json_ignores_key_order_and_keeps_unicode():
    a = {"id": 1, "details": {"x": 1, "y": 2}, "reason": "Zoë"}
    b = {"reason": "Zoë", "details": {"y": 2, "x": 1}, "id": 1}
    assert canonical_json(a) == canonical_json(b)
    assert "Zoë" in canonical_json(a)


def test_intact_chain_verifies():
    events = make_chain(20)
    result = verify_chain(events)
    assert result.ok and result.count == 20 and result.head == events[-1]["hash"]


@given(st.integers(min_value=0, max_value=9), st.sampled_from(["reason", "actor", "to_state", "details"]))
def test_any_altered_event_is_named(index, field):
    events = make_chain(10)
    events[index][field] = {"tampered": True} if field == "details" else "tampered"
    result = verify_chain(events)
    assert not result.ok and result.broken_id == events[index]["id"]


def test_deleted_event_is_detected():
    events = make_chain(5)
    del events[2]
    result = verify_chain(events)
    assert not result.ok and result.broken_id == 4
