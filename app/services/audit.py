"""Audit log writer, sealer, verifier and readers (SPEC 6; docs/ARCHITECTURE.md "Audit log").

`record` is called inside the transaction of the state change it records. It only inserts
the event into `audit_pending` — no lock, so audited writers never wait for each other. After
that transaction commits, `seal` moves pending events into the hash chain (`audit_events`) in
sequence order: one sealer at a time (PostgreSQL: a transaction-scoped advisory try-lock;
SQLite: BEGIN IMMEDIATE already serializes writers), each batch one short transaction that
appends the events, deletes their staging rows and advances `audit_head`. The committing
thread waits (briefly, bounded) until its own events are sealed, so it reads its own events
in the chain; the worker's housekeeping and the web app seal as a backstop.

Readers (console, API, export) show sealed events only; `pending_summary` tells them how many
recorded events are not sealed yet.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
import sqlalchemy.orm as so

from app.db.models import AuditEvent, AuditHead, AuditPending
from app.db.session import DEFER_SEAL, after_commit, is_sqlite
from app.domain.audit_chain import (
    COPY_COLUMNS,
    EVENT_FIELDS,
    GENESIS_HASH,
    ChunkResult,
    VerifyResult,
    chain_hash,
    join_chunks,
    verify_copy_lines,
    verify_rows,
)

from .clock import utcnow

log = logging.getLogger(__name__)

SEALER_LOCK_KEY = 0x61756469745F73  # pg advisory lock: one sealer at a time ("audit_s")
SEAL_BATCH = 1000
SEAL_WAIT_SECONDS = 2.0  # how long a committer waits for another sealer to seal its events
BACKSTOP_SECONDS = 10.0  # the web app's backstop: at most one seal per process this often

_PENDING = AuditPending.__table__
_EVENTS = AuditEvent.__table__
_HEAD = AuditHead.__table__
_EVENT_COLUMNS = EVENT_FIELDS[1:]  # every hashed field but the id the sealer gives
_RECORDED = "recon_audit_recorded"
_TRY_LOCK = sa.select(sa.func.pg_try_advisory_xact_lock(SEALER_LOCK_KEY))
_LOCK = sa.select(sa.func.pg_advisory_xact_lock(SEALER_LOCK_KEY))
_LOCK_SHARED = sa.select(sa.func.pg_advisory_xact_lock_shared(SEALER_LOCK_KEY))
_PENDING_WITH_HEAD = sa.text(
    "SELECT h.last_id, h.last_hash, p.seq, "
    + ", ".join(f"p.{name}" for name in _EVENT_COLUMNS)
    + " FROM audit_pending p CROSS JOIN audit_head h WHERE h.id = 1 ORDER BY p.seq LIMIT :batch"
).columns(_HEAD.c.last_id, _HEAD.c.last_hash, _PENDING.c.seq, *(_PENDING.c[name] for name in _EVENT_COLUMNS))
_SEAL_COPY_PG = sa.text(
    "WITH moved AS (INSERT INTO audit_events (id, occurred_at, actor, action, subject_type, subject_id, "
    "from_state, to_state, reason, reason_code, details, prev_hash, hash, seq) "
    "SELECT v.id, p.occurred_at, p.actor, p.action, p.subject_type, p.subject_id, p.from_state, "
    "p.to_state, p.reason, p.reason_code, p.details, v.prev_hash, v.hash, p.seq "
    "FROM unnest(CAST(:seqs AS bigint[]), CAST(:ids AS integer[]), CAST(:prevs AS varchar[]), "
    "CAST(:hashes AS varchar[])) AS v(seq, id, prev_hash, hash) "
    "JOIN audit_pending p ON p.seq = v.seq ORDER BY v.id RETURNING 1) "
    "UPDATE audit_head SET last_id = :last_id, last_hash = :last_hash "
    "WHERE id = 1 AND (SELECT count(*) FROM moved) = :n"
)
_SEAL_DELETE_PG = sa.text("DELETE FROM audit_pending WHERE seq = ANY(CAST(:seqs AS bigint[]))")


# --- writing -------------------------------------------------------------------------------------


def _event_values(
    actor: str,
    action: str,
    subject_type: str,
    subject_id: str | int,
    from_state: str | None,
    to_state: str | None,
    reason: str | None,
    reason_code: str | None,
    details: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "occurred_at": utcnow(),
        "actor": actor,
        "action": action,
        "subject_type": subject_type,
        "subject_id": str(subject_id),
        "from_state": from_state,
        "to_state": to_state,
        "reason": reason,
        "reason_code": reason_code,
        "details": details or {},
    }


def record(
    session: so.Session,
    *,
    actor: str,
    action: str,
    subject_type: str,
    subject_id: str | int,
    from_state: str | None = None,
    to_state: str | None = None,
    reason: str | None = None,
    reason_code: str | None = None,
    details: dict[str, Any] | None = None,
) -> AuditPending:
    """Record one event in the caller's transaction (no lock). It enters the chain when the
    transaction has committed (`seal`, run right after the commit); a rollback drops it."""
    event = AuditPending(
        **_event_values(
            actor, action, subject_type, subject_id, from_state, to_state, reason, reason_code, details
        )
    )
    session.add(event)
    _note(session, event)
    return event


def _pending_statement() -> sa.Insert:
    prefix = "audit_event__"
    return (
        sa.insert(_PENDING)
        .values({name: sa.bindparam(prefix + name, type_=_PENDING.c[name].type) for name in _EVENT_COLUMNS})
        .returning(_PENDING.c.seq)
    )


# `record` as one Core INSERT … RETURNING seq with bound parameters (`pending_params`), built
# once: for a hot path that writes its rows in one statement (intake). The caller executes it
# in the use case's transaction and hands the returned seq to `note_recorded`, which seals it
# after the commit as `record` does.
PENDING_INSERT = _pending_statement()
PENDING_TABLE = _PENDING
PENDING_COLUMNS = _EVENT_COLUMNS  # the columns PENDING_INSERT writes (`pending_params` names them)


def pending_params(
    *,
    actor: str,
    action: str,
    subject_type: str,
    subject_id: str | int,
    from_state: str | None = None,
    to_state: str | None = None,
    reason: str | None = None,
    reason_code: str | None = None,
    details: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The parameters of PENDING_INSERT for one event."""
    values = _event_values(
        actor, action, subject_type, subject_id, from_state, to_state, reason, reason_code, details
    )
    return {f"audit_event__{name}": value for name, value in values.items()}


def note_recorded(session: so.Session, seqs: list[int]) -> None:
    """Events inserted by PENDING_INSERT in this session's transaction: sealed after commit."""
    for seq in seqs:
        _note(session, seq)


def _note(session: so.Session, event: AuditPending | int) -> None:
    recorded = session.info.setdefault(_RECORDED, [])
    recorded.append(event)
    if len(recorded) == 1:
        hook = _hand_to_sealer if session.info.get(DEFER_SEAL) else _seal_after_commit
        after_commit(session, "audit.seal", lambda factory: hook(factory, recorded))


def seal_committed(factory: so.sessionmaker, seqs: list[int], *, in_background: bool) -> None:
    """Events inserted by PENDING_INSERT's columns in a transaction that has committed outside
    `transaction()` (intake's one-statement path): sealed as `transaction()` seals a unit of
    work's — by the process's background sealer, or before this returns."""
    (_hand_to_sealer if in_background else _seal_after_commit)(factory, list(seqs))


def _hand_to_sealer(factory: so.sessionmaker, recorded: list[AuditPending | int]) -> None:
    """A deferring unit of work (the intake API): the background sealer seals its events."""
    from app.services import sealer

    seqs = [e if isinstance(e, int) else e.seq for e in recorded]
    seqs = [seq for seq in seqs if seq is not None]
    if seqs:
        sealer.for_factory(factory).request(max(seqs))


def _seal_after_commit(factory: so.sessionmaker, recorded: list[AuditPending | int]) -> None:
    seqs = [e if isinstance(e, int) else e.seq for e in recorded]
    seqs = [seq for seq in seqs if seq is not None]
    if seqs:
        seal(factory, wait_for=max(seqs))


def seal(
    factory: so.sessionmaker,
    *,
    wait_for: int | None = None,
    timeout: float | None = None,
    batch: int = SEAL_BATCH,
) -> int:
    """Seal committed pending events into the chain, batch by batch, until none is left or
    another sealer holds the lock. Returns how many this call sealed.

    wait_for: a seq this caller recorded. If another sealer is at work, wait until it is done
    (at most `timeout` seconds, default SEAL_WAIT_SECONDS) — a shared lock on the sealer's key,
    granted by PostgreSQL the moment the holder commits, so nothing polls and waiters do not
    queue behind each other — then look: normally the holder took our events in its batch and
    we are done; if we committed after it read, we seal (waiting for the lock if need be).
    No wake-up is lost: every committer seals after its commit (its rows are visible to it) or
    waits for the sealer ahead of it and then looks; what a timeout leaves is sealed by the next
    seal or a backstop.
    """
    sealed = 0
    timeout = SEAL_WAIT_SECONDS if timeout is None else timeout
    deadline = time.monotonic() + timeout
    waited = False
    while True:
        wait = max(deadline - time.monotonic(), 0.0) if waited else 0.0
        done = _seal_batch(factory, batch, wait=wait)
        if done is None:  # another sealer holds the lock
            if wait_for is None:
                return sealed
            if not waited:
                waited = True
                still_pending = _wait_for_sealer(factory, wait_for, max(deadline - time.monotonic(), 0.0))
                if still_pending is False:
                    return sealed
                if still_pending:
                    continue
            log.warning("audit event %s not sealed after %.1f s; a backstop will seal it", wait_for, timeout)
            return sealed
        count, newest = done
        sealed += count
        # A short batch took everything committed; a full one that reached our own events is
        # enough for this caller (it does not seal everyone else's backlog on its request).
        if count < batch or (wait_for is not None and newest >= wait_for):
            return sealed


def _wait_for_sealer(factory: so.sessionmaker, seq: int, timeout: float) -> bool | None:
    """Wait (at most `timeout` s) until the sealer holding the lock commits, then: is event
    `seq` still pending? None if the sealer held on for longer than that."""
    from app.db.session import transaction

    if timeout <= 0:
        return None
    try:
        with transaction(factory) as s:
            conn = s.connection()
            if conn.dialect.name == "postgresql":
                conn.execute(sa.text(f"SET LOCAL lock_timeout = '{max(int(timeout * 1000), 1)}ms'"))
                conn.execute(_LOCK_SHARED)  # granted when the exclusive holder commits
            # A new statement, a new snapshot: it sees what the holder sealed.
            return conn.execute(sa.select(_PENDING.c.seq).where(_PENDING.c.seq == seq)).first() is not None
    except sa.exc.OperationalError as exc:
        if "lock timeout" in str(exc.orig):
            return None
        raise


def _seal_batch(factory: so.sessionmaker, batch: int, *, wait: float = 0.0) -> tuple[int, int] | None:
    """One short transaction: the oldest `batch` committed pending events, chained onto the head.
    Returns how many and the newest seq sealed; None when another sealer holds the lock
    (PostgreSQL; with `wait`, for longer than that many seconds). Round trips on PostgreSQL: the
    lock, the pending rows with the head, one INSERT that also moves the head, one DELETE."""
    from app.db.session import transaction

    try:
        with transaction(factory) as s:
            conn = s.connection()
            pg = conn.dialect.name == "postgresql"
            # PostgreSQL: the lock is taken before anything is read, so READ COMMITTED then sees
            # every event the previous holder sealed (it committed before releasing the lock).
            if pg and not conn.execute(_TRY_LOCK).scalar():
                if wait <= 0:
                    return None
                conn.execute(sa.text(f"SET LOCAL lock_timeout = '{max(int(wait * 1000), 1)}ms'"))
                conn.execute(_LOCK)  # woken when the holder commits; LockNotAvailable after `wait`
                conn.execute(sa.text("SET LOCAL lock_timeout = 0"))
            rows = conn.execute(_PENDING_WITH_HEAD, {"batch": batch}).all()
            if not rows:
                return 0, 0
            last_id, prev = rows[0].last_id, rows[0].last_hash
            events = []
            for row in rows:
                last_id += 1
                event = {name: getattr(row, name) for name in _EVENT_COLUMNS}
                event["id"] = last_id
                event["seq"] = row.seq
                event["prev_hash"] = prev
                event["hash"] = prev = chain_hash(prev, event)
                events.append(event)
            seqs = [row.seq for row in rows]
            if pg:
                # The staging rows are copied as stored (time and canonical details text exactly);
                # only id, prev_hash and hash travel, as four arrays. The head moves in the same
                # statement, and only if every row was copied.
                moved = conn.execute(
                    _SEAL_COPY_PG,
                    {
                        "seqs": seqs,
                        "ids": [e["id"] for e in events],
                        "prevs": [e["prev_hash"] for e in events],
                        "hashes": [e["hash"] for e in events],
                        "n": len(events),
                        "last_id": last_id,
                        "last_hash": prev,
                    },
                ).rowcount
                if moved != 1:
                    raise RuntimeError(f"sealer could not copy all {len(events)} pending audit events")
                # Accepted by the trigger only because each row's sealed twin now exists.
                conn.execute(_SEAL_DELETE_PG, {"seqs": seqs})
            else:
                conn.execute(sa.insert(_EVENTS), events)
                conn.execute(sa.delete(_PENDING).where(_PENDING.c.seq.in_(seqs)))
                conn.execute(sa.update(_HEAD).where(_HEAD.c.id == 1).values(last_id=last_id, last_hash=prev))
            return len(rows), seqs[-1]
    except sa.exc.OperationalError as exc:
        if wait > 0 and "lock timeout" in str(exc.orig):
            return None
        raise


_backstop_lock = threading.Lock()
_backstop_last = 0.0


def seal_if_due(factory: so.sessionmaker, every: float = BACKSTOP_SECONDS) -> int:
    """The web app's backstop: at most one look per process every `every` seconds, never two at
    once, never waiting for another sealer; it takes no write lock unless something is pending
    (a request's teardown must not queue behind a writer when there is nothing to do)."""
    global _backstop_last
    now = time.monotonic()
    if now - _backstop_last < every or not _backstop_lock.acquire(blocking=False):
        return 0
    try:
        _backstop_last = now
        from app.db.session import transaction

        with transaction(factory, read_only=True) as s:
            if s.execute(sa.select(_PENDING.c.seq).limit(1)).first() is None:
                return 0
        return seal(factory)
    finally:
        _backstop_lock.release()


@dataclass(frozen=True)
class PendingSummary:
    count: int
    oldest_at: datetime | None


def pending_summary(session: so.Session) -> PendingSummary:
    """Recorded events not sealed yet (normally none, or the last few milliseconds' worth)."""
    count, oldest = session.execute(sa.select(sa.func.count(), sa.func.min(_PENDING.c.occurred_at))).one()
    return PendingSummary(count, oldest)


def sealed_event_for(session: so.Session, pending: AuditPending) -> AuditEvent | None:
    """The chain event a recorded (now committed) event was sealed as, if it is sealed."""
    return session.scalar(sa.select(AuditEvent).where(AuditEvent.seq == pending.seq))


# --- reading -------------------------------------------------------------------------------------


def iter_events(
    session: so.Session,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    actor: str | None = None,
    action: str | None = None,
    subject_type: str | None = None,
    subject_id: str | None = None,
    after_id: int = 0,
    limit: int | None = None,
    batch: int = 500,
) -> Iterator[AuditEvent]:
    """Sealed events oldest first, fetched in keyset batches (the API's pages; exports use
    `app.services.audit_export`, which streams plain rows)."""
    yielded = 0
    last = after_id
    while True:
        stmt = sa.select(AuditEvent).where(AuditEvent.id > last)
        if since:
            stmt = stmt.where(AuditEvent.occurred_at >= since)
        if until:
            stmt = stmt.where(AuditEvent.occurred_at < until)
        if actor:
            stmt = stmt.where(AuditEvent.actor == actor)
        if action:
            stmt = stmt.where(AuditEvent.action == action)
        if subject_type:
            stmt = stmt.where(AuditEvent.subject_type == subject_type)
        if subject_id:
            stmt = stmt.where(AuditEvent.subject_id == str(subject_id))
        size = batch if limit is None else min(batch, limit - yielded)
        rows = session.scalars(stmt.order_by(AuditEvent.id).limit(size)).all()
        for row in rows:
            yield row
            session.expunge(row)
        yielded += len(rows)
        if len(rows) < size or (limit is not None and yielded >= limit):
            return
        last = rows[-1].id


# Plain rows in verify's column order (app.domain.audit_chain.ROW_COLUMNS): the timestamp and
# details as stored text, so the canonical form is assembled without parsing anything.
_ROW_SQL = {
    "postgresql": (
        "SELECT id, occurred_at::text, actor, action, subject_type, subject_id, from_state, to_state, "
        "reason, reason_code, details::text, prev_hash, hash FROM audit_events"
    ),
    "sqlite": (
        "SELECT id, occurred_at, actor, action, subject_type, subject_id, from_state, to_state, "
        "reason, reason_code, details, prev_hash, hash FROM audit_events"
    ),
}
FETCH_ROWS = 5000


def stream_rows(
    conn: sa.Connection, where: str = "", params: dict | None = None, *, name: str = "audit_rows"
) -> Iterator[tuple]:
    """Sealed events as plain tuples in id order, straight from the driver (PostgreSQL: a
    server-side cursor; SQLite streams by itself). `where` uses :name parameters."""
    dialect = conn.dialect.name
    sql = _ROW_SQL[dialect] + (f" WHERE {where}" if where else "") + " ORDER BY id"
    raw = conn.connection.driver_connection
    if dialect == "postgresql":
        sql = _pg_params(sql)
        cursor = raw.cursor(name=name)
        cursor.itersize = FETCH_ROWS
    else:
        cursor = raw.cursor()
    try:
        cursor.execute(sql, params or {})
        if dialect == "postgresql":
            yield from prefetched(lambda: cursor.fetchmany(FETCH_ROWS))
        else:
            while rows := cursor.fetchmany(FETCH_ROWS):
                yield from rows
    finally:
        cursor.close()


def prefetched(fetch: Callable[[], list], depth: int = 2) -> Iterator[tuple]:
    """The rows of successive `fetch()` batches (until an empty one), fetched one batch ahead
    by a thread: the database produces the next batch while the caller hashes or formats this
    one (the driver waits for the network without holding the interpreter lock). Stops the
    thread before returning, also when the caller stops early or fails."""
    batches: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def pump() -> None:
        try:
            while not stop.is_set():
                batch = fetch()
                if not batch:
                    break
                while not stop.is_set():
                    try:
                        batches.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # handed to the consumer
            batches.put(exc)
            return
        batches.put(done)

    thread = threading.Thread(target=pump, name="audit-prefetch", daemon=True)
    thread.start()
    try:
        while (item := batches.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield from item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a pump waiting to put, then let it finish its fetch
            try:
                batches.get(timeout=0.1)
            except queue.Empty:
                pass
        thread.join()


def _pg_params(sql: str) -> str:
    import re

    return re.sub(r"(?<!:):([a-z_]+)", r"%(\1)s", sql)


def db_time(conn: sa.Connection, value: datetime) -> Any:
    """A naive UTC datetime as the driver compares it with a stored timestamp."""
    if conn.dialect.name == "sqlite":  # stored as SQLAlchemy writes it
        return value.strftime("%Y-%m-%d %H:%M:%S.%f")
    return value


def reader(engine: sa.Engine) -> sa.Connection:
    """A connection for a long read that blocks no one: PostgreSQL REPEATABLE READ READ ONLY
    (one snapshot for the whole read, no locks beyond the table's share lock); SQLite a deferred
    BEGIN (a WAL snapshot from the first read; writers go on)."""
    if engine.dialect.name == "postgresql":
        return engine.connect().execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
    return engine.execution_options(recon_read_only=True).connect()


# --- verification --------------------------------------------------------------------------------


def verify(session: so.Session) -> VerifyResult:
    """Recompute the whole chain and compare its end with the stored head.

    PostgreSQL: in a REPEATABLE READ READ ONLY transaction of its own (one snapshot for the
    head and every event; it blocks no writer). SQLite: in the caller's transaction (a snapshot
    already, or the write lock)."""
    engine = session.get_bind()
    if is_sqlite(str(engine.url)):
        return _verify_on(session.connection())
    with reader(engine) as conn, conn.begin():
        return _verify_on(conn)


def verify_database(engine: sa.Engine, *, jobs: int = 1, min_chunk: int = 200_000) -> VerifyResult:
    """`recon audit verify`: like `verify`, and on PostgreSQL split over `jobs` processes that
    import the coordinator's snapshot and each check a range of ids (each row stores its
    predecessor's hash, so ranges are checked independently and joined at their edges)."""
    with reader(engine) as conn, conn.begin():
        if engine.dialect.name != "postgresql" or jobs <= 1:
            return _verify_on(conn)
        head = _head_row(conn)
        lo, hi = conn.execute(sa.text("SELECT min(id), max(id) FROM audit_events")).one()
        if hi is None or hi - lo + 1 < 2 * min_chunk:
            return _verify_on(conn, head=head)
        snapshot = conn.execute(sa.text("SELECT pg_export_snapshot()")).scalar()
        jobs = min(jobs, max((hi - lo + 1) // min_chunk, 1))
        # The first range starts at id 1: a chain whose first rows are gone is broken there.
        edges = [1] + [lo + (hi - lo + 1) * k // jobs for k in range(1, jobs)] + [hi + 1]
        ranges = [(edges[k], edges[k + 1] - 1) for k in range(jobs)]
        url = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        chunks = _in_processes(_verify_range, [(url, snapshot, a, b) for a, b in ranges])
        return _against_head(join_chunks(chunks), head)


def _in_processes(target: Callable[..., ChunkResult], calls: list[tuple]) -> list[ChunkResult]:
    """target(*args) for each args, each in a child process of its own; results in order.

    fork when this process runs one thread (the CLI): the child starts at once, with nothing to
    import. Otherwise spawn: a forked child of a threaded process (the web app, a worker with its
    housekeeping thread, the test suite) can inherit a lock some other thread held, and hang.
    A forked child never touches the parent's connections (it opens its own and leaves through
    os._exit, so nothing of the parent's is closed or finalised in it)."""
    import multiprocessing

    method = (
        "fork"
        if threading.active_count() == 1 and "fork" in multiprocessing.get_all_start_methods()
        else "spawn"
    )
    ctx = multiprocessing.get_context(method)
    children = []
    try:
        for args in calls:
            receive, send = ctx.Pipe(duplex=False)
            child = ctx.Process(target=_child, args=(send, target, args), daemon=True)
            child.start()
            send.close()
            children.append((child, receive))
        results = []
        for child, receive in children:
            try:
                ok, value = receive.recv()
            except EOFError:
                raise RuntimeError(
                    f"audit verify: a checking process died (exit code {child.exitcode})"
                ) from None
            if not ok:
                raise RuntimeError(f"audit verify: a checking process failed: {value}")
            results.append(value)
        return results
    finally:
        for child, receive in children:
            receive.close()
            if child.is_alive():
                child.join(5)
            if child.is_alive():
                child.kill()
                child.join()


def _child(send, target: Callable[..., ChunkResult], args: tuple) -> None:
    try:
        result = (True, target(*args))
    except BaseException as exc:  # reported to the parent, which raises
        result = (False, f"{type(exc).__name__}: {exc}")
    send.send(result)
    send.close()


# A range of the chain as COPY text lines (app.domain.audit_chain.COPY_COLUMNS, details last).
_COPY_RANGE = (
    "COPY (SELECT "
    + ", ".join(COPY_COLUMNS)
    + " FROM audit_events WHERE id BETWEEN {lo} AND {hi} ORDER BY id) "
    "TO STDOUT WITH (NULL E'\\x0b')"
)


def _verify_range(url: str, snapshot: str, lo: int, hi: int) -> ChunkResult:
    """A checking process: ids lo..hi in the exported snapshot, read with COPY (the server streams
    without waiting for the client; no row objects are built) and checked line by line."""
    import psycopg
    from psycopg import pq

    raw = psycopg.connect(url, autocommit=True)
    try:
        raw.execute("SET datestyle = 'ISO, YMD'")
        raw.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        raw.execute(f"SET TRANSACTION SNAPSHOT '{snapshot}'")
        pg = raw.pgconn
        pg.nonblocking = 0  # libpq's blocking calls from here on (sending, then each line)
        # libpq directly: one call per line (psycopg's Copy object costs several times that).
        # The connection is this process's own and is closed on the way out, also when the
        # check stops early in the middle of the COPY.
        pg.send_query(_COPY_RANGE.format(lo=int(lo), hi=int(hi)).encode())
        started = pg.get_result()
        if started is None or started.status != pq.ExecStatus.COPY_OUT:
            message = started.error_message.decode(errors="replace") if started is not None else ""
            raise RuntimeError(f"COPY did not start: {message}")

        def lines() -> Iterator[bytes]:
            get = pg.get_copy_data
            while True:
                size, data = get(0)
                if size < 0:
                    break
                yield bytes(data)
            done = pg.get_result()
            if done is None or done.status != pq.ExecStatus.COMMAND_OK:
                message = done.error_message.decode(errors="replace") if done is not None else ""
                raise RuntimeError(f"COPY failed: {message}")
            while pg.get_result() is not None:
                pass

        return verify_copy_lines(lines(), prev_hash=None, first_id=None)
    finally:
        raw.close()  # mid-COPY too: closing ends the read (nothing is committed or rolled back)


def _head_row(conn: sa.Connection) -> tuple[int, str] | None:
    return conn.execute(sa.select(_HEAD.c.last_id, _HEAD.c.last_hash).where(_HEAD.c.id == 1)).first()


def _verify_on(conn: sa.Connection, head: tuple[int, str] | None = None) -> VerifyResult:
    head = head or _head_row(conn)
    with contextlib.closing(stream_rows(conn, name="audit_verify")) as rows:
        chunk = verify_rows(rows, prev_hash=GENESIS_HASH, first_id=1)
    return _against_head(join_chunks([chunk]), head)


def _against_head(result: VerifyResult, head: tuple[int, str] | None) -> VerifyResult:
    if not result.ok or head is None:
        return result
    if head[0] != result.count or head[1] != result.head:
        return VerifyResult(
            False, result.count, result.head, head[0], "chain head does not match the last event"
        )
    return result


def head(session: so.Session) -> AuditHead:
    return session.get(AuditHead, 1)


# --- anchored checkpoints ------------------------------------------------------------------------

checkpoint_log = logging.getLogger("recon.audit.checkpoint")


@dataclass(frozen=True)
class Checkpoint:
    """The chain head at one moment, recorded outside the database (log stream, append-only
    file, exports): a later chain must still pass through (last_id, hash)."""

    at: str
    count: int
    last_id: int
    hash: str

    def as_dict(self) -> dict:
        return {"at": self.at, "count": self.count, "last_id": self.last_id, "hash": self.hash}


def current_checkpoint(sessions: so.sessionmaker) -> Checkpoint:
    """The sealed head, checked against the event it names (a head rewritten to point past or
    beside the chain is refused rather than anchored)."""
    from app.db.session import transaction
    from app.domain.audit_chain import format_timestamp

    with transaction(sessions, read_only=True) as s:
        conn = s.connection()
        head_row = _head_row(conn)
        last_id, last_hash = head_row if head_row else (0, GENESIS_HASH)
        if last_id:
            stored = conn.execute(sa.select(_EVENTS.c.hash).where(_EVENTS.c.id == last_id)).scalar()
            if stored != last_hash:
                raise RuntimeError(
                    f"audit head names event {last_id} with a hash the chain does not hold; not anchoring it"
                )
    count = last_id  # verify requires ids 1..n without gaps
    at = format_timestamp(utcnow().replace(microsecond=0)).replace(".000000Z", "Z")
    return Checkpoint(at=at, count=count, last_id=last_id, hash=last_hash)


def append_checkpoint(path, checkpoint: Checkpoint) -> None:
    """One JSON line appended (O_APPEND, fsync) to the operator's checkpoint file."""
    import json
    import os

    line = (json.dumps(checkpoint.as_dict(), sort_keys=True, separators=(",", ":")) + "\n").encode()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(sessions: so.sessionmaker, path) -> Checkpoint:
    """Seal what is pending, then anchor the head: one line in the JSON log stream (logger
    `recon.audit.checkpoint`) and one appended to `path`."""
    seal(sessions)
    checkpoint = current_checkpoint(sessions)
    checkpoint_log.info("audit checkpoint", extra={"audit_checkpoint": checkpoint.as_dict()})
    append_checkpoint(path, checkpoint)
    return checkpoint


def read_checkpoints(path) -> list[Checkpoint]:
    """The checkpoint file's lines (blank lines skipped; a line that is not a checkpoint raises).
    A JSONL export's trailer (`{"chain_head": {"id", "hash"}}`) is a checkpoint too, so an
    operator can append it to the file (`tail -n 1 export.jsonl >> audit-checkpoints.jsonl`)."""
    import json

    out = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                if set(data) == {"chain_head"}:  # a JSONL export's last line (audit_export.py)
                    head = data["chain_head"]
                    out.append(
                        Checkpoint(
                            f"export line {number}", int(head["id"]), int(head["id"]), str(head["hash"])
                        )
                    )
                    continue
                out.append(
                    Checkpoint(str(data["at"]), int(data["count"]), int(data["last_id"]), str(data["hash"]))
                )
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{number}: not a checkpoint line ({exc})") from None
    return out


def check_checkpoints(engine: sa.Engine, checkpoints: list[Checkpoint]) -> Checkpoint | None:
    """The first checkpoint (file order) whose (last_id, hash) is not on the current chain, or
    None. Run after a whole-chain verify succeeded: each stored row then links to genesis, so an
    event id holding the recorded hash means the chain still reaches that head."""
    with reader(engine) as conn, conn.begin():
        for cp in checkpoints:
            if cp.last_id == 0:
                continue
            stored = conn.execute(sa.select(_EVENTS.c.hash).where(_EVENTS.c.id == cp.last_id)).scalar()
            if stored != cp.hash:
                return cp
    return None
