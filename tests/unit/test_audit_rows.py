"""SPEC 6 verification over plain rows: the text shortcut equals the canonical form, and a chain
checked in independent chunks names the same first broken event as one pass."""

from datetime import datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from app.domain.audit_chain import (
    GENESIS_HASH,
    canonical_json,
    canonical_json_of_row,
    canonical_value,
    chain_hash,
    format_timestamp,
    join_chunks,
    row_event,
    row_hash_ok,
    verify_chain,
    verify_rows,
)

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=8,
)


def make_rows(n: int) -> list[tuple]:
    """Stored rows as verify reads them, chained with the domain's chain_hash."""
    rows, prev = [], GENESIS_HASH
    for i in range(1, n + 1):
        event = {
            "id": i,
            "occurred_at": datetime(2026, 1, 1, 0, 0, i % 60, 1000 * i),
            "actor": "rita",
            "action": "decision.comment",
            "subject_type": "exception",
            "subject_id": str(i),
            "from_state": "open",
            "to_state": None,
            "reason": f'note {i} — "café"\n',
            "reason_code": None,
            "details": {"z": i, "a": ["x", None]},
        }
        digest = chain_hash(prev, event)
        rows.append(
            (
                i,
                format_timestamp(event["occurred_at"]),
                *(event[k] for k in ("actor", "action", "subject_type", "subject_id", "from_state")),
                *(event[k] for k in ("to_state", "reason", "reason_code")),
                canonical_value(event["details"]),
                prev,
                digest,
            )
        )
        prev = digest
    return rows


@settings(max_examples=200)
@given(
    actor=text,
    reason=st.none() | text,
    from_state=st.none() | text,
    details=st.dictionaries(text, json_values, max_size=4),
    micro=st.integers(0, 999_999),
)
def test_row_form_is_the_canonical_form(actor, reason, from_state, details, micro):
    when = datetime(2026, 3, 4, 5, 6, 7, micro)
    event = {
        "id": 42,
        "occurred_at": when,
        "actor": actor,
        "action": "a.b",
        "subject_type": "exception",
        "subject_id": "7",
        "from_state": from_state,
        "to_state": None,
        "reason": reason,
        "reason_code": "x",
        "details": details,
    }
    row = (42, format_timestamp(when), actor, "a.b", "exception", "7", from_state, None, reason, "x")
    row += (canonical_value(details), GENESIS_HASH, chain_hash(GENESIS_HASH, event))
    assert canonical_json_of_row(row) == canonical_json(event)
    assert row_hash_ok(GENESIS_HASH, row)


def test_non_canonical_stored_text_still_verifies_by_parsing():
    [row] = make_rows(1)
    # Details written by an older release (default json.dumps, keys unsorted): same event,
    # different text — the shortcut misses, parsing confirms.
    reordered = list(row)
    reordered[10] = '{"z": 1, "a": ["x", null]}'
    assert canonical_json_of_row(tuple(reordered)) != canonical_json(row_event(row))
    assert row_hash_ok(GENESIS_HASH, tuple(reordered))
    assert not row_hash_ok(GENESIS_HASH, tuple(reordered[:10]) + ('{"z": 2, "a": ["x", null]}',) + row[11:])


def test_a_lone_surrogate_in_details_is_stored_escaped_and_hashes():
    value = {"s": "\ud800"}
    stored = canonical_value(value)
    assert stored == '{"s":"\\ud800"}'
    event = {"id": 1, "occurred_at": datetime(2026, 1, 1), "details": value}
    assert len(chain_hash(GENESIS_HASH, event)) == 64


def test_rows_verify_like_events():
    rows = make_rows(30)
    result = join_chunks([verify_rows(rows)])
    assert result.ok and result.count == 30 and result.head == rows[-1][12]


@given(st.integers(0, 29), st.integers(1, 6), st.sampled_from(["content", "link", "delete", "swap"]))
def test_chunked_verification_names_the_same_first_broken_event(index, chunks, damage):
    rows = make_rows(30)
    if damage == "content":
        rows[index] = rows[index][:8] + ("rewritten",) + rows[index][9:]
    elif damage == "link":
        rows[index] = rows[index][:11] + ("f" * 64,) + rows[index][12:]
    elif damage == "delete":
        del rows[index]
    else:  # two events' contents exchanged (ids stay)
        other = (index + 1) % 30
        a, b = rows[index], rows[other]
        rows[index], rows[other] = (a[0], *b[1:]), (b[0], *a[1:])
    events = [row_event(r) | {"occurred_at": datetime.fromisoformat(r[1][:-1])} for r in rows]
    expected = verify_chain(events)
    # Chunks by id range, as `recon audit verify --jobs` splits them.
    edges = [1 + 30 * k // chunks for k in range(chunks)] + [31]
    parts = [[r for r in rows if edges[k] <= r[0] < edges[k + 1]] for k in range(chunks)]
    result = join_chunks(verify_rows(p, prev_hash=None, first_id=None) for p in parts)
    one_pass = join_chunks([verify_rows(rows)])
    assert (result.ok, result.broken_id) == (one_pass.ok, one_pass.broken_id)
    assert (one_pass.ok, one_pass.broken_id) == (expected.ok, expected.broken_id)
    # Only the last event's removal leaves a valid (shorter) chain: the head comparison catches it.
    assert not result.ok or (damage == "delete" and index == 29)


def test_chunks_must_start_at_event_one_on_the_genesis_hash():
    rows = make_rows(10)
    result = join_chunks([verify_rows(rows[3:], prev_hash=None, first_id=None)])
    assert not result.ok and result.broken_id == 4 and "gap" in result.problem
