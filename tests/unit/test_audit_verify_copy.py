"""`recon audit verify` on PostgreSQL checks COPY text lines without decoding them
(audit_chain.verify_copy_lines): it must pass and fail exactly the rows `verify_rows` does, for
any content — quotes, backslashes, control characters, NULLs, empty strings, non-ASCII — and
name the same first broken event."""

from datetime import datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from app.domain.audit_chain import (
    COPY_COLUMNS,
    GENESIS_HASH,
    ROW_COLUMNS,
    canonical_value,
    chain_hash,
    copy_row,
    format_timestamp,
    join_chunks,
    verify_copy_lines,
    verify_rows,
)

_COPY_ESCAPES = {"\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v"}


def copy_field(value) -> bytes:
    """A value as PostgreSQL's COPY text format writes it (NULL as audit_chain.COPY_NULL)."""
    if value is None:
        return b"\x0b"
    return "".join(_COPY_ESCAPES.get(c, c) for c in str(value)).encode()


def pg_timestamp(text: str) -> str:
    """format_timestamp's form as PostgreSQL prints the stored timestamp (trailing zeros dropped)."""
    out = text.removesuffix("Z").replace("T", " ").rstrip("0")
    return out.removesuffix(".")


def copy_line(row: tuple) -> bytes:
    event = dict(zip(ROW_COLUMNS, row, strict=True))
    event["occurred_at"] = pg_timestamp(event["occurred_at"])
    return b"\t".join(copy_field(event[name]) for name in COPY_COLUMNS) + b"\n"


text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=8)
nasty = st.sampled_from(
    ["", '"', "\\", '\\"', "\n", "\\n", "\x01", "\x0b", "\t", "a\tb", "null", "é", "\x7f"]
)
field = nasty | text
json_values = st.recursive(
    st.none() | st.integers(-1000, 1000) | field,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(field, inner, max_size=3),
    max_leaves=6,
)
events = st.fixed_dictionaries(
    {
        "actor": field,
        "action": field,
        "subject_type": field,
        "subject_id": field,
        "from_state": st.none() | field,
        "to_state": st.none() | field,
        "reason": st.none() | field,
        "reason_code": st.none() | field,
        "details": st.dictionaries(field, json_values, max_size=3),
        "micros": st.sampled_from([0, 1, 10, 120_000, 999_999]),
    }
)


def chain(specs: list[dict]) -> list[tuple]:
    rows, prev = [], GENESIS_HASH
    for i, spec in enumerate(specs, 1):
        event = {k: v for k, v in spec.items() if k != "micros"}
        event["id"] = i
        event["occurred_at"] = datetime(2026, 1, 2, 3, 4, 5, spec["micros"])
        digest = chain_hash(prev, event)
        stored = dict(event, occurred_at=format_timestamp(event["occurred_at"]))
        stored["details"] = canonical_value(event["details"])
        rows.append(tuple(stored[name] for name in ROW_COLUMNS[:-2]) + (prev, digest))
        prev = digest
    return rows


def both(rows: list[tuple]):
    return verify_rows(rows), verify_copy_lines([copy_line(r) for r in rows])


@settings(max_examples=200, deadline=None)
@given(st.lists(events, min_size=1, max_size=6))
def test_copy_lines_verify_as_rows_do(specs):
    rows = chain(specs)
    by_rows, by_copy = both(rows)
    assert by_copy == by_rows and by_copy.broken_id is None and by_copy.count == len(rows)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(events, min_size=1, max_size=5),
    st.data(),
)
def test_a_tampered_row_is_named_as_rows_name_it(specs, data):
    rows = chain(specs)
    target = data.draw(st.integers(0, len(rows) - 1))
    column = data.draw(st.sampled_from(ROW_COLUMNS[1:11]))
    index = ROW_COLUMNS.index(column)
    old = rows[target][index]
    new = data.draw(
        field if column not in ("from_state", "to_state", "reason", "reason_code") else st.none() | field
    )
    if column == "details":
        new = canonical_value(data.draw(st.dictionaries(field, json_values, max_size=3)))
    elif column == "occurred_at":
        new = format_timestamp(datetime(2026, 1, 2, 3, 4, 5, data.draw(st.integers(0, 999_999))))
    row = list(rows[target])
    row[index] = new
    rows[target] = tuple(row)
    by_rows, by_copy = both(rows)
    assert by_copy == by_rows
    if new != old:
        assert by_copy.broken_id == target + 1


def test_copy_escapes_are_not_json_escapes():
    """A value holding a newline and one holding backslash-n, or a quote, differ: COPY and JSON
    both write some of them as backslash sequences, so the line must be decoded first."""
    for original, forged in [
        ("a\\nb", "a\nb"),
        ("a\nb", "a\\nb"),
        ('say "x"', 'say \\"x\\"'),
        ("\x0b", None),
    ]:
        spec = {
            "actor": "rita",
            "action": "decision.comment",
            "subject_type": "exception",
            "subject_id": "7",
            "from_state": None,
            "to_state": None,
            "reason": original,
            "reason_code": None,
            "details": {"note": original},
            "micros": 5,
        }
        rows = chain([spec, dict(spec, micros=6)])
        assert both(rows)[1].broken_id is None
        for index in (ROW_COLUMNS.index("reason"), ROW_COLUMNS.index("details")):
            tampered = list(rows[0])
            tampered[index] = (
                forged if index != ROW_COLUMNS.index("details") else canonical_value({"note": forged})
            )
            by_rows, by_copy = both([tuple(tampered), rows[1]])
            assert by_copy == by_rows and by_copy.broken_id == 1, (original, forged, index)


def test_copy_row_decodes_a_line():
    rows = chain(
        [
            {
                **dict.fromkeys(("actor", "action", "subject_type", "subject_id"), 'x\t"\\'),
                **dict.fromkeys(("from_state", "to_state", "reason", "reason_code")),
                "details": {"k": "\n"},
                "micros": 120_000,
            }
        ]
    )
    decoded = copy_row(copy_line(rows[0]))
    assert decoded[0] == rows[0][0] and decoded[2:] == rows[0][2:]
    assert decoded[1] == "2026-01-02 03:04:05.12"


def test_chunks_of_copy_lines_join_like_one_pass():
    rows = chain(
        [
            {
                **dict.fromkeys(("actor", "action", "subject_type", "subject_id"), "a"),
                **dict.fromkeys(("from_state", "to_state", "reason", "reason_code")),
                "details": {},
                "micros": n,
            }
            for n in range(9)
        ]
    )
    lines = [copy_line(r) for r in rows]
    parts = [lines[:3], lines[3:7], lines[7:]]
    assert join_chunks(verify_copy_lines(p, prev_hash=None, first_id=None) for p in parts) == join_chunks(
        [verify_rows(rows)]
    )
    broken = list(rows)
    broken[4] = broken[4][:5] + ("forged",) + broken[4][6:]
    lines = [copy_line(r) for r in broken]
    result = join_chunks(
        verify_copy_lines(p, prev_hash=None, first_id=None) for p in [lines[:3], lines[3:7], lines[7:]]
    )
    assert not result.ok and result.broken_id == 5
