"""The web layer's per-request shortcuts give what the general code they replace gives: the input
guard's one-pass JSON scan (depth and NULs) and the log formatter's own format()."""

from __future__ import annotations

import logging
import sys

from hypothesis import given, settings
from hypothesis import strategies as st
from pythonjsonlogger.json import JsonFormatter as LibraryJsonFormatter

from app.logs import JsonFormatter
from app.web.input_guard import MAX_JSON_DEPTH, PAYLOAD_FIELDS, scan_json

# --- the input guard: the two walks it replaced, kept here as the reference ----------------------


def reference_depth(value) -> int:
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, depth + 1)
            if depth + 1 > MAX_JSON_DEPTH:
                break
            stack.extend((child, depth + 1) for child in item)
    return deepest


def reference_has_nul(value, depth: int = 0) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if depth > 20:
        return False
    if isinstance(value, dict):
        return any(
            k not in PAYLOAD_FIELDS and (reference_has_nul(k) or reference_has_nul(v, depth + 1))
            for k, v in value.items()
        )
    if isinstance(value, list):
        return any(reference_has_nul(v, depth + 1) for v in value)
    return False


def reference_scan(body) -> tuple[bool, bool]:
    if reference_depth(body) > MAX_JSON_DEPTH:
        return True, False
    return False, reference_has_nul(body)


def expected(body) -> tuple[bool, bool]:
    too_deep, nul = reference_scan(body)
    return (True, None) if too_deep else (False, nul)


def got(body) -> tuple[bool, bool]:
    too_deep, nul = scan_json(body)
    return (True, None) if too_deep else (False, nul)


texts = st.sampled_from(["", "a", "\x00", "x\x00y", "payload", "error", "ok"]) | st.text(max_size=4)
keys = st.sampled_from(["payload", "error", "a", "b", "\x00", "k\x00"]) | st.text(max_size=3)
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts
json_values = st.recursive(
    scalars, lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=4)
)


@settings(max_examples=600)
@given(json_values)
def test_one_pass_scan_matches_the_depth_and_nul_walks(body):
    assert got(body) == expected(body)


def nest(depth: int, leaf, key: str = "a", lists: bool = False):
    """`leaf` inside `depth` containers (alternating dicts and lists when lists is set)."""
    value = leaf
    for level in range(depth):
        value = [value] if lists and level % 2 else {key: value}
    return value


def test_scan_at_the_depth_limits():
    for depth in range(0, MAX_JSON_DEPTH + 4):
        for leaf in ("x", "\x00", {"payload": "\x00"}, [], {}):
            for key in ("a", "payload"):
                for lists in (False, True):
                    body = nest(depth, leaf, key, lists)
                    assert got(body) == expected(body), (depth, leaf, key, lists)
    # A NUL beside a too-deep branch: the depth wins, as before.
    body = {"a": "\x00", "b": nest(MAX_JSON_DEPTH + 1, "x")}
    assert scan_json(body)[0] is True and expected(body) == (True, None)


def test_scan_of_an_intake_body():
    body = {"connection": "c", "message_type": "Patient", "content_type": "x", "payload": "\x00"}
    assert scan_json(body) == (False, False)
    assert scan_json({**body, "connection": "c\x00"}) == (False, True)


# --- the log formatter: its format() against the library's ------------------------------------------


def library_format(formatter: JsonFormatter, record: logging.LogRecord) -> str:
    return LibraryJsonFormatter.format(formatter, record)


def records():
    def make(msg="%s %s %s", args=("POST", "/api/v1/messages", 202), exc_info=None, extra=None, **kw):
        logger = logging.getLogger("recon.access")
        record = logger.makeRecord("recon.access", logging.INFO, __file__, 1, msg, args, exc_info, "f", extra)
        for k, v in kw.items():
            setattr(record, k, v)
        return record

    access = {
        "request_id": "abc",
        "path": "/api/v1/messages",
        "status": 202,
        "actor": None,
        "duration_ms": 1.5,
        "idempotency_key": "k-1",
        "message_id": None,
    }
    yield make(extra=access)
    yield make(extra={"path": "/x/Patient/123", "detail": "PID|1||MRN^^^X\rPV1|1", "obj": object()})
    yield make(msg="rejected Patient/abc123", args=None)
    yield make(msg="plain", args=(), extra={"ts": "mine", "level": "loud", "when": b"bytes"})
    try:
        raise ValueError("boom Patient/42")
    except ValueError:
        yield make(msg="failed", args=(), exc_info=sys.exc_info())
    yield make(msg="cached", args=(), exc_text="Traceback: earlier")
    yield make(msg="stack", args=(), stack_info="Stack (most recent call last):\n  here")
    yield make(msg="no exception", args=(), exc_info=(None, None, None))
    yield make(msg={"message": "a dict", "name": "n", "exc_info": "given"}, args=None)
    yield make(extra={"_private": 1, "unicode": "é ü", "n": 3.25})


def test_format_matches_the_librarys():
    formatter = JsonFormatter()
    for record in records():
        ours = formatter.format(record)
        assert ours == library_format(formatter, record), ours


def test_format_time_matches_strftime_across_seconds():
    import time

    formatter = JsonFormatter()
    record = logging.LogRecord("recon", logging.INFO, __file__, 1, "m", None, None)
    for created in (
        0.0,
        0.999,
        1.0,
        1_780_000_000.0004,
        1_780_000_000.9996,
        1_780_000_001.5,
        1_780_000_000.25,
    ):
        record.created, record.msecs = created, (created - int(created)) * 1000
        expected = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(record.msecs):03d}Z"
        assert formatter.formatTime(record) == expected


# --- request ids ----------------------------------------------------------------------------------


@given(st.binary(min_size=16, max_size=16))
def test_request_ids_are_uuid4_hex(random):
    import uuid

    from app.web.request_log import new_request_id

    assert new_request_id(random) == uuid.UUID(bytes=random, version=4).hex


def test_fresh_request_ids_are_uuid4():
    import uuid

    from app.web.request_log import new_request_id

    ids = {new_request_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(uuid.UUID(hex=i).version == 4 and uuid.UUID(hex=i).hex == i for i in ids)


def test_format_matches_the_librarys_when_an_exception_formats_empty():
    class Blank(JsonFormatter):
        def formatException(self, ei):  # noqa: N802 - logging's name
            return ""

    formatter = Blank()
    for exc_text in (None, "earlier"):
        record = logging.LogRecord("recon", logging.ERROR, __file__, 1, "m", None, (None, None, None))
        record.exc_text = exc_text
        assert formatter.format(record) == library_format(formatter, record)
