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


def canonical_value(value: Any) -> str:
    """One JSON value in canonical form (sorted keys, no whitespace, UTF-8 kept): exactly the
    text `canonical_json` embeds for it. A string holding a lone surrogate cannot be stored as
    UTF-8; it is written with ASCII escapes instead (same value, and verify falls back to
    parsing it)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return text


def canonical_json(event: Mapping[str, Any]) -> str:
    """Sorted keys, no whitespace, UTF-8 kept: the byte form that is hashed."""
    body = {}
    for name in EVENT_FIELDS:
        value = event.get(name)
        if isinstance(value, datetime):
            value = format_timestamp(value)
        body[name] = value
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def _digest(text: str) -> str:
    # surrogatepass: a lone surrogate (only ever inside details) hashes instead of raising.
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def chain_hash(prev_hash: str, event: Mapping[str, Any]) -> str:
    return _digest(prev_hash + canonical_json(event))


# --- verification over plain rows ------------------------------------------------------------

# A stored row as verify and export read it, in this column order: occurred_at as the stored
# timestamp's text (see `timestamp_text`), details as the stored JSON text.
ROW_COLUMNS = (
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
    "prev_hash",
    "hash",
)
Row = tuple  # (id, occurred_at text, actor, ..., details text, prev_hash, hash)

_esc = json.encoder.encode_basestring  # what json.dumps(ensure_ascii=False) uses for a str


def _opt(value: str | None) -> str:
    return "null" if value is None else _esc(value)


def timestamp_text(stored: str) -> str:
    """A stored timestamp's text ('YYYY-MM-DD HH:MM:SS[.f…]' as PostgreSQL prints it, trailing
    zeros dropped, or as SQLite stores it) in `format_timestamp`'s form."""
    if len(stored) == 27 and stored[10] == "T" and stored[26] == "Z":
        return stored
    text = stored.replace(" ", "T", 1)
    if len(text) == 19:
        return text + ".000000Z"
    return text + "0" * (26 - len(text)) + "Z"


def canonical_json_of_row(row: Row) -> str:
    """canonical_json of a stored row, built from its text columns without parsing details.

    Equal to canonical_json(event) whenever the stored details text is canonical (the sealer
    writes it so); callers compare the resulting hash and, on a mismatch, retry with
    `canonical_json_parsed` before calling the event broken — so this is only ever a shortcut.
    """
    (
        id_,
        occurred_at,
        actor,
        action,
        subject_type,
        subject_id,
        from_state,
        to_state,
        reason,
        reason_code,
        details,
        *_,
    ) = row
    return (
        f'{{"action":{_esc(action)},"actor":{_esc(actor)},"details":{details},'
        f'"from_state":{_opt(from_state)},"id":{id_},"occurred_at":{_esc(timestamp_text(occurred_at))},'
        f'"reason":{_opt(reason)},"reason_code":{_opt(reason_code)},"subject_id":{_esc(subject_id)},'
        f'"subject_type":{_esc(subject_type)},"to_state":{_opt(to_state)}}}'
    )


def row_event(row: Row) -> dict:
    """A stored row as the event mapping `canonical_json` hashes (details parsed, time as text)."""
    event = dict(zip(ROW_COLUMNS, row, strict=True))
    if isinstance(event["details"], str):
        event["details"] = json.loads(event["details"])
    when = event["occurred_at"]
    if isinstance(when, str):
        try:
            event["occurred_at"] = datetime.fromisoformat(when.removesuffix("Z").replace(" ", "T"))
        except ValueError:
            pass  # hashed as it is: it will not match
    return event


def row_hash_ok(prev_hash: str, row: Row) -> bool:
    """Does the row's stored hash match its content chained onto prev_hash?"""
    if _digest(prev_hash + canonical_json_of_row(row)) == row[12]:
        return True
    try:
        return chain_hash(prev_hash, row_event(row)) == row[12]
    except ValueError:  # details that are not JSON at all
        return False


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    count: int
    head: str
    broken_id: int | None = None
    problem: str = ""


@dataclass(frozen=True)
class ChunkResult:
    """One contiguous run of rows checked on its own: its first row's id and stored prev_hash,
    its last row's id and hash, how many rows passed, and the first failure in it (if any)."""

    first_id: int | None
    first_prev: str | None
    last_id: int | None
    last_hash: str | None
    count: int
    broken_id: int | None = None
    problem: str = ""


def verify_rows(
    rows: Iterable[Row], *, prev_hash: str | None = GENESIS_HASH, first_id: int | None = 1
) -> ChunkResult:
    """Check a run of stored rows in id order: consecutive ids, each prev_hash the hash before it,
    each hash its content. prev_hash/first_id None: take them from the run's first row (a chunk
    in the middle of the chain; the caller joins chunks with `join_chunks`).

    The loop is `canonical_json_of_row` and `row_hash_ok` inlined (this is the hot path of
    `recon audit verify`): a hash that misses on the stored text is re-checked by parsing."""
    prev, expected_id = prev_hash, first_id
    start_id = start_prev = None
    count = 0
    sha256, esc, stamp = hashlib.sha256, _esc, timestamp_text

    def failed(row_id: int, problem: str) -> ChunkResult:
        return ChunkResult(start_id, start_prev, row_id, prev, count, row_id, problem)

    for row in rows:
        (row_id, at, actor, action, s_type, s_id, from_s, to_s, reason, code, details, row_prev, row_hash) = (
            row
        )
        if start_id is None:
            start_id, start_prev = row_id, row_prev
            if prev is None:
                prev = row_prev
            if expected_id is None:
                expected_id = row_id
        if row_id != expected_id:
            return failed(row_id, f"gap: expected event {expected_id}")
        if row_prev != prev:
            return failed(row_id, "prev_hash does not match the previous event")
        text = (
            f'{prev}{{"action":{esc(action)},"actor":{esc(actor)},"details":{details},"from_state":'
            f'{"null" if from_s is None else esc(from_s)},"id":{row_id},"occurred_at":'
            f'{esc(at.replace(" ", "T", 1) + "Z" if len(at) == 26 else stamp(at))},"reason":'
            f'{"null" if reason is None else esc(reason)},"reason_code":'
            f'{"null" if code is None else esc(code)},"subject_id":{esc(s_id)},"subject_type":'
            f'{esc(s_type)},"to_state":{"null" if to_s is None else esc(to_s)}}}'
        )
        try:
            data = text.encode()
        except UnicodeEncodeError:  # a lone surrogate in details: hashed as `_digest` does
            data = text.encode("utf-8", "surrogatepass")
        if sha256(data).hexdigest() != row_hash and not row_hash_ok(prev, row):
            return failed(row_id, "hash does not match the event's content")
        prev = row_hash
        count += 1
        expected_id = row_id + 1
    return ChunkResult(start_id, start_prev, expected_id - 1 if expected_id else None, prev, count)


# --- verification over PostgreSQL COPY text lines ---------------------------------------------

# The columns of a COPY line, in this order (details last), as `recon audit verify` reads them:
# `COPY (SELECT <COPY_COLUMNS> …) TO STDOUT WITH (NULL E'\x0b')`, DateStyle ISO.
COPY_COLUMNS = ("id", "prev_hash", "hash", *EVENT_FIELDS[1:])
COPY_NULL = b"\x0b"  # a raw vertical tab: COPY writes one in the data as the escape \v
_STAMP_PAD = {19: b".000000Z", **{n: b"0" * (26 - n) + b"Z" for n in range(21, 27)}}


def copy_row(line: bytes) -> Row:
    """One COPY text line (COPY_COLUMNS, trailing newline allowed) as a stored row in
    ROW_COLUMNS order: fields split on tabs (COPY escapes a tab in the data), COPY's backslash
    escapes undone, COPY_NULL as None."""
    import codecs

    fields = line.rstrip(b"\n").split(b"\t")
    if len(fields) != len(COPY_COLUMNS):
        raise ValueError(f"a COPY line with {len(fields)} fields, not {len(COPY_COLUMNS)}")
    values = [None if f == COPY_NULL else codecs.escape_decode(f)[0].decode("utf-8") for f in fields]
    (id_, prev, hash_, at, actor, action, s_type, s_id, from_s, to_s, reason, code, details) = values
    return (int(id_), at, actor, action, s_type, s_id, from_s, to_s, reason, code, details, prev, hash_)


def verify_copy_lines(
    lines: Iterable[bytes], *, prev_hash: str | None = GENESIS_HASH, first_id: int | None = 1
) -> ChunkResult:
    """`verify_rows` over COPY text lines (COPY_COLUMNS, each with its newline), without decoding
    them: the hot path of `recon audit verify` on PostgreSQL.

    The fast path hashes bytes built straight from the line. When the line holds no backslash
    (so COPY escaped nothing: every field is its value's UTF-8 verbatim, and COPY_NULL is NULL)
    and no double quote before details, each value is its own JSON string body, so those bytes
    are exactly `canonical_json_of_row` of the row — except for a value holding a raw control
    character, which JSON would escape: then the bytes are no canonical JSON text at all and
    cannot match a stored hash. Any row that misses the fast path, or whose hash misses on it,
    is decoded (`copy_row`) and checked by `row_hash_ok`, as `verify_rows` would check it. So a
    row passes exactly when `verify_rows` would pass it; a hash match proves the bytes equal
    those that were sealed."""
    prev = None if prev_hash is None else prev_hash.encode()
    expected_id = first_id
    start_id = start_prev = None
    count = 0
    sha256, null, q, null_json = hashlib.sha256, COPY_NULL, b'"', b"null"

    def failed(row_id: int, problem: str) -> ChunkResult:
        return ChunkResult(
            start_id, start_prev, row_id, prev.decode() if prev else None, count, row_id, problem
        )

    for line in lines:
        fields = line.split(b"\t")
        if len(fields) != 13 or b"\\" in line:
            row = copy_row(line)
            row_id, row_prev, row_hash = row[0], row[11].encode(), row[12].encode()
            text = None
        else:
            (i, row_prev, row_hash, at, actor, action, s_type, s_id, from_s, to_s, reason, code, details) = (
                fields
            )
            row_id = int(i)
            if line.find(q, 0, len(line) - len(details)) >= 0:
                text = None
            else:
                # timestamp_text in bytes: 'YYYY-MM-DD HH:MM:SS[.f…]' (PostgreSQL drops
                # trailing zeros) to 'YYYY-MM-DDTHH:MM:SS.ffffffZ'.
                pad = _STAMP_PAD.get(len(at))
                at = at[:10] + b"T" + at[11:] + pad if pad else timestamp_text(at.decode()).encode()
                text = b"".join(
                    (
                        row_prev,
                        b'{"action":"',
                        action,
                        b'","actor":"',
                        actor,
                        b'","details":',
                        details[:-1],
                        b',"from_state":',
                        null_json if from_s == null else q + from_s + q,
                        b',"id":',
                        i,
                        b',"occurred_at":"',
                        at,
                        b'","reason":',
                        null_json if reason == null else q + reason + q,
                        b',"reason_code":',
                        null_json if code == null else q + code + q,
                        b',"subject_id":"',
                        s_id,
                        b'","subject_type":"',
                        s_type,
                        b'","to_state":',
                        null_json if to_s == null else q + to_s + q,
                        b"}",
                    )
                )
        if start_id is None:
            start_id, start_prev = row_id, row_prev.decode()
            if prev is None:
                prev = row_prev
            if expected_id is None:
                expected_id = row_id
        if row_id != expected_id:
            return failed(row_id, f"gap: expected event {expected_id}")
        if row_prev != prev:
            return failed(row_id, "prev_hash does not match the previous event")
        if (text is None or sha256(text).hexdigest().encode() != row_hash) and not row_hash_ok(
            prev.decode(), copy_row(line)
        ):
            return failed(row_id, "hash does not match the event's content")
        prev = row_hash
        count += 1
        expected_id = row_id + 1
    return ChunkResult(
        start_id, start_prev, expected_id - 1 if expected_id else None, prev.decode() if prev else None, count
    )


def join_chunks(chunks: Iterable[ChunkResult]) -> VerifyResult:
    """Chunks of consecutive id ranges, in order, into one result naming the first broken event:
    the first chunk must start at event 1 on the genesis hash, and each chunk must start at the
    event after the previous chunk's last, on that event's hash."""
    prev, expected_id, count = GENESIS_HASH, 1, 0
    for chunk in chunks:
        if chunk.first_id is None:  # an empty range
            if chunk.broken_id is None:
                continue
        elif chunk.first_id != expected_id:
            return VerifyResult(False, count, prev, chunk.first_id, f"gap: expected event {expected_id}")
        elif chunk.first_prev != prev:
            return VerifyResult(
                False, count, prev, chunk.first_id, "prev_hash does not match the previous event"
            )
        if chunk.broken_id is not None:
            return VerifyResult(
                False, count + chunk.count, chunk.last_hash or prev, chunk.broken_id, chunk.problem
            )
        count += chunk.count
        prev, expected_id = chunk.last_hash, chunk.last_id + 1
    return VerifyResult(True, count, prev)


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
