"""Audit chain: append rate, full verification rate, and a streamed export in constant memory."""

import tracemalloc

from app.db.session import transaction
from app.services import audit
from app.services.audit_export import stream_export
from tests.perf.conftest import Timer, report

EVENTS = 20_000


def test_bench_audit_chain(sessions):
    with Timer() as write:
        for batch in range(EVENTS // 500):
            with transaction(sessions) as s:
                for i in range(500):
                    audit.record(
                        s,
                        actor="bench",
                        action="decision.comment",
                        subject_type="exception",
                        subject_id=str(batch * 500 + i),
                        reason="benchmark note",
                        details={"n": i, "text": "x" * 40},
                    )
    report(
        "audit_append",
        {"events": EVENTS, "events_per_s": f"{EVENTS / write.seconds:.0f}"},
        "≥ 2,000 events/s (500 per transaction)",
        EVENTS / write.seconds >= 2000,
    )

    with Timer() as check, transaction(sessions) as s:
        result = audit.verify(s)
    assert result.ok and result.count == EVENTS
    rate = EVENTS / check.seconds
    report(
        "audit_verify",
        {"events": EVENTS, "events_per_s": f"{rate:.0f}", "seconds": f"{check.seconds:.2f}"},
        "≥ 20,000 events/s",
        rate >= 20_000,
    )

    tracemalloc.start()
    lines = 0
    with Timer() as export:
        for _ in stream_export(sessions, "jsonl", actor="bench"):
            lines += 1
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert lines == EVENTS + 2  # every event, the export's own event, the chain-head line
    peak_mb = peak / 1e6
    report(
        "audit_export_jsonl",
        {"lines": lines, "seconds": f"{export.seconds:.2f}", "peak_mb": f"{peak_mb:.1f}"},
        "peak traced memory ≤ 20 MB for 20k events (constant: batches of 500)",
        peak_mb <= 20,
    )
