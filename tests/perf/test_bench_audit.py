"""Audit chain (issue 6): append rate through record()+seal, concurrent appends, and at a large
chain (1M events on PostgreSQL) `recon audit verify` and `recon audit export --format jsonl`
as the operator runs them (their own processes), each beside an anchor measured in the same
run on the same data: `sha256sum` of the table's rows and a plain `COPY … TO STDOUT` of
them. Meanwhile this process keeps writing audited transactions and reports how long they
waited. RSS of the export process.

Size: RECON_BENCH_AUDIT_EVENTS (default 1,000,000 on PostgreSQL, 100,000 on SQLite);
RECON_BENCH_QUICK=1 for 50,000.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import sqlalchemy as sa

from app.db.session import get_engine, transaction
from app.services import audit
from tests.audit_data import fill_chain
from tests.perf.conftest import Timer, percentile, quiesce_postgres, report

APPEND_EVENTS = 20_000
WRITE_EVERY_SECONDS = 0.02


def _size(is_postgres: bool) -> int:
    if os.environ.get("RECON_BENCH_QUICK") == "1":
        return 50_000
    default = 1_000_000 if is_postgres else 100_000
    return int(os.environ.get("RECON_BENCH_AUDIT_EVENTS", default))


def _append(sessions, batches: int, per_transaction: int, tag: str) -> None:
    for batch in range(batches):
        with transaction(sessions) as s:
            for i in range(per_transaction):
                audit.record(
                    s,
                    actor="bench",
                    action="decision.comment",
                    subject_type="exception",
                    subject_id=f"{tag}-{batch}-{i}",
                    reason="benchmark note",
                    details={"n": i, "text": "x" * 40},
                )


class Writer:
    """Audited writes, one every WRITE_EVERY_SECONDS, each timed from begin to sealed. On
    PostgreSQL the write runs with lock_timeout 50 ms: `lock_timeouts` counts writes that had to
    wait longer than that for a lock (CPU contention on this 2-core machine shows in the times,
    not there)."""

    def __init__(self, sessions):
        self.sessions, self.waits, self.lock_timeouts = sessions, [], 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(30)

    def _loop(self):
        n = 0
        while not self._stop.is_set():
            began = time.perf_counter()
            try:
                with transaction(self.sessions) as s:
                    if s.get_bind().dialect.name == "postgresql":
                        s.execute(sa.text("SET LOCAL lock_timeout = '50ms'"))
                    audit.record(s, actor="bench", action="bench.write", subject_type="bench", subject_id=n)
            except sa.exc.OperationalError:
                self.lock_timeouts += 1
            self.waits.append(time.perf_counter() - began)
            n += 1
            self._stop.wait(WRITE_EVERY_SECONDS)


def _cli(database_url: str, *args: str) -> tuple[float, str, int]:
    """Run `recon …` in its own process: wall seconds, stdout, peak RSS in KB.

    The peak is the process's own (VmHWM): getrusage's ru_maxrss survives exec, so in a child
    of this test process it reported this process's peak (the pytest run's, 120–180 MB)
    whenever that was higher than the command's."""
    code = (
        "import sys\n"
        "from app.cli import main\n"
        "try:\n"
        f"    main({list(args)!r}, standalone_mode=False)\n"
        "finally:\n"
        "    with open('/proc/self/status') as status:\n"
        "        peak = next(line.split()[1] for line in status if line.startswith('VmHWM:'))\n"
        "    print('RSS_KB', peak, file=sys.stderr)\n"
    )
    env = dict(os.environ, DATABASE_URL=database_url)
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - began
    assert done.returncode == 0, done.stderr[-2000:]
    rss = int(done.stderr.rsplit("RSS_KB", 1)[1].split()[0])
    return seconds, done.stdout, rss


def _anchors(engine, folder: Path) -> tuple[float, float, Path]:
    """A plain dump of the same rows (COPY on PostgreSQL, the driver's fetch on SQLite) to a
    file, and `sha256sum` of that file: (dump seconds, sha256sum seconds, file)."""
    dump = folder / "audit_events.txt"
    with Timer() as copy, engine.connect() as conn, dump.open("wb") as out:
        raw = conn.connection.driver_connection
        if engine.dialect.name == "postgresql":
            with (
                raw.cursor() as cur,
                cur.copy("COPY (SELECT * FROM audit_events ORDER BY id) TO STDOUT") as cp,
            ):
                for block in cp:
                    out.write(block)
        else:
            for row in raw.execute("SELECT * FROM audit_events ORDER BY id"):
                out.write(("\t".join(map(str, row)) + "\n").encode())
    with Timer() as digest:
        subprocess.run(["sha256sum", str(dump)], check=True, capture_output=True)
    return copy.seconds, digest.seconds, dump


def test_bench_audit_chain(sessions, database_url, is_postgres):
    engine = get_engine(database_url)

    with Timer() as write:
        _append(sessions, APPEND_EVENTS // 500, 500, "serial")
    report(
        "audit_append",
        {"events": APPEND_EVENTS, "events_per_s": f"{APPEND_EVENTS / write.seconds:.0f}"},
        "≥ 2,000 events/s (500 per transaction, sealed after each commit)",
        APPEND_EVENTS / write.seconds >= 2000,
    )

    # Many small audited transactions at once (the shape of intake): no lock is held across
    # a transaction, so on PostgreSQL they overlap; sealing batches what committed meanwhile.
    threads = [threading.Thread(target=_append, args=(sessions, 250, 2, f"t{t}")) for t in range(8)]
    with Timer() as concurrent:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    appended = 8 * 250 * 2
    with transaction(sessions, read_only=True) as s:
        left = audit.pending_summary(s).count
    report(
        "audit_append_concurrent",
        {
            "threads": 8,
            "transactions_per_s": f"{8 * 250 / concurrent.seconds:.0f}",
            "events_per_s": f"{appended / concurrent.seconds:.0f}",
            "pending_after": left,
        },
        "every event sealed when its transaction returns (pending_after = 0)",
        left == 0,
    )

    size = _size(is_postgres)
    existing = APPEND_EVENTS + appended
    with Timer() as generate:
        fill_chain(engine, size - existing)
    if is_postgres:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE audit_events")
    print(f"\ngenerated {size - existing} chained events in {generate.seconds:.1f} s (total {size})")
    if is_postgres:  # the million rows just written flushed first: the anchors and the CLIs alike
        print(f"audit benchmark: {quiesce_postgres(database_url)}")

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        copy_s, sha_s, dump = _anchors(engine, folder)
        dump_mb = dump.stat().st_size / 1e6
        dump.unlink()

        with Writer(sessions) as alone:  # the same writes with nothing else running
            time.sleep(2)
        startup_s, _, _ = _cli(database_url, "--help")  # interpreter and imports, for scale
        with Writer(sessions) as during_verify:
            verify_s, out, verify_rss = _cli(database_url, "audit", "verify")
        assert out.startswith("OK "), out
        verified = int(out.split()[1])
        with Writer(sessions) as during_export:
            export_s, _, export_rss = _cli(
                database_url, "audit", "export", "--format", "jsonl", "--out", str(folder / "export.jsonl")
            )
        exported = sum(1 for _ in (folder / "export.jsonl").open(encoding="utf-8")) - 1

    verify_rate, export_rate = verified / verify_s, exported / export_s
    sha_rate, copy_rate = size / sha_s, size / copy_s
    waits = during_verify.waits + during_export.waits
    lock_timeouts = during_verify.lock_timeouts + during_export.lock_timeouts
    report(
        "audit_verify",
        {
            "events": verified,
            "seconds": f"{verify_s:.2f}",
            "events_per_s": f"{verify_rate:.0f}",
            "of_which_startup_s": f"{startup_s:.2f}",
            "anchor_sha256sum_s": f"{sha_s:.2f} ({dump_mb:.0f} MB)",
            "ratio_to_sha256sum": f"{verify_rate / sha_rate:.2f}",
        },
        "≥ 300,000 events/s (`recon audit verify`, its own process, startup included)",
        verify_rate >= 300_000,
    )
    report(
        "audit_export_jsonl",
        {
            "events": exported,
            "seconds": f"{export_s:.2f}",
            "events_per_s": f"{export_rate:.0f}",
            "rss_mb": f"{export_rss / 1024:.0f}",
            "anchor_copy_s": f"{copy_s:.2f}",
            "ratio_to_copy": f"{export_rate / copy_rate:.2f}",
        },
        "≥ 150,000 events/s; RSS ≤ 150 MB",
        export_rate >= 150_000 and export_rss / 1024 <= 150,
    )
    report(
        "audit_write_during_verify_and_export",
        {
            "writes": len(waits),
            "lock_waits_over_50ms": lock_timeouts,
            "p50_ms": f"{percentile(waits, 50) * 1000:.1f}",
            "p99_ms": f"{percentile(waits, 99) * 1000:.1f}",
            "max_ms": f"{max(waits) * 1000:.1f}",
            "alone_p50_ms": f"{percentile(alone.waits, 50) * 1000:.1f}",
            "alone_max_ms": f"{max(alone.waits) * 1000:.1f}",
            "verify_rss_mb": f"{verify_rss / 1024:.0f}",
        },
        "a concurrent write waits ≤ 50 ms: no lock wait over 50 ms, and the median write (begin → "
        "sealed, on a CPU shared with verify and export) ≤ 50 ms",
        lock_timeouts == 0 and percentile(waits, 50) <= 0.05,
    )
