"""Throughput of intake (HTTP API under gunicorn, as deployed) and of delivery (worker → FHIR
adapter → simulator), each beside anchors measured in the same run:

* intake: a bare Flask JSON endpoint under the same gunicorn, and a bare psycopg loop doing the
  same inserts (message, payload, identifiers, attempt, outbox, audit event) and commit over the
  same number of connections — the floor of what the database allows (PostgreSQL only);
* delivery: bare RQ no-op jobs on the same Redis.

The HTTP load comes from a minimal client (raw sockets, one request per connection as gunicorn's
sync workers answer): a general-purpose client in this process would cost more CPU than a bare
Flask request and hide the server.

Size: RECON_BENCH_INTAKE_MESSAGES (default 2,000; RECON_BENCH_QUICK=1: 400).
"""

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import httpx

from tests.perf.conftest import Timer, percentile, quiesce_postgres, report
from tests.samples import medication_request, message_body

MESSAGES = 400  # delivered by the delivery benchmark
CLIENT_THREADS = 8
# README's deployment on PostgreSQL: `gunicorn -w $(nproc)`, one sync worker per core. Intake is one
# round trip per request, so a worker is rarely blocked; on this 2-core machine -w 4 measured
# ~650/s against ~880/s for -w 2 (more processes than cores: context switches and cold caches).
GUNICORN_WORKERS = os.cpu_count() or 1
INTAKE_TARGET_PER_S = 600
INTAKE_TARGET_RATIO_TO_PSYCOPG = 0.5
INTAKE_TARGET_P99_MS = 50


def _intake_messages() -> int:
    if os.environ.get("RECON_BENCH_QUICK") == "1":
        return 400
    return int(os.environ.get("RECON_BENCH_INTAKE_MESSAGES", 2000))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(command: list[str], env: dict, ready_url: str, *, ready=lambda response: True, tries: int = 200):
    """`command` in a process of its own, waited for until `ready_url` answers (and `ready` accepts
    the answer); terminated on the way out."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(tries):
            try:
                if ready(httpx.get(ready_url, timeout=1)):
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@contextlib.contextmanager
def gunicorn(app: str, env: dict, workers: list[str]):
    """`app` served by gunicorn as in production, in its own processes: the benchmark's HTTP
    clients do not share its interpreter lock."""
    port = _free_port()
    command = [sys.executable, "-m", "gunicorn", *workers, "-b", f"127.0.0.1:{port}", app]
    with serving(command, env, f"http://127.0.0.1:{port}/healthz", ready=lambda r: r.status_code == 200):
        yield port


def _requests(token: str, connection: str, prefix: str, count: int) -> list[bytes]:
    """Every request's bytes, built before the clock starts."""
    out = []
    for n in range(count):
        body = json.dumps(message_body(connection, medication_request(n))).encode()
        out.append(
            (
                "POST /api/v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                f"Authorization: Bearer {token}\r\nIdempotency-Key: {prefix}-{n}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
            + body
        )
    return out


def _post(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _hammer(port: int, requests: list[bytes]) -> tuple[float, list[float]]:
    """All requests from CLIENT_THREADS connections at once; (seconds, latencies in ms)."""
    latencies: list[float] = []
    failures: list[bytes] = []
    lock = threading.Lock()
    numbers = iter(range(len(requests)))

    def client_loop():
        while True:
            with lock:
                n = next(numbers, None)
            if n is None:
                return
            t0 = time.perf_counter()
            answer = _post(port, requests[n])
            took = (time.perf_counter() - t0) * 1000
            with lock:
                latencies.append(took)
                if not answer.startswith(b"HTTP/1.1 202"):
                    failures.append(answer[:500])

    with Timer() as t:
        threads = [threading.Thread(target=client_loop) for _ in range(CLIENT_THREADS)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    assert not failures, failures[0]
    return t.seconds, latencies


def _bare_psycopg_rate(database_url: str, client_id: int, connection_id: int, count: int) -> float:
    """The database's floor for intake: CLIENT_THREADS connections, each inserting what one
    accepted message writes (message, payload version, identifiers, attempt, outbox row, audit
    event) and committing, with plain psycopg — no web stack, no ORM, no hashing."""
    import psycopg

    url = database_url.replace("postgresql+psycopg://", "postgresql://")
    payload = json.dumps(medication_request(0)).encode()
    numbers = iter(range(count))
    lock = threading.Lock()
    run = uuid.uuid4().hex[:8]

    def loop():
        with psycopg.connect(url) as conn:
            while True:
                with lock:
                    n = next(numbers, None)
                if n is None:
                    return
                mid = str(uuid.uuid4())
                with conn.transaction():
                    conn.execute(
                        "INSERT INTO messages (id, client_id, idempotency_key, request_fingerprint, "
                        "response_json, connection_id, message_type, content_type, patient_ref, clinical_risk, "
                        "status, delivery_system, control_id, created_at, updated_at) VALUES "
                        "(%s, %s, %s, 'f', %s, %s, 'MedicationRequest', 'application/fhir+json', 'Patient/1', "
                        "'normal', 'queued', 'urn:x', %s, now(), now())",
                        (
                            mid,
                            client_id,
                            f"anchor-{run}-{n}",
                            json.dumps({"id": mid}),
                            connection_id,
                            f"c{n}",
                        ),
                    )
                    pid = conn.execute(
                        "INSERT INTO payload_versions (message_id, version, raw, text, encoding, sha256, "
                        "created_by_id, reason, created_at) VALUES (%s, 1, %s, %s, 'utf-8', 'x', %s, "
                        "'intake', now()) RETURNING id",
                        (mid, payload, payload.decode(), client_id),
                    ).fetchone()[0]
                    conn.execute("UPDATE messages SET current_payload_id = %s WHERE id = %s", (pid, mid))
                    conn.execute(
                        "INSERT INTO message_identifiers (message_id, kind, value) VALUES (%s, 'patient', 'p1'), "
                        "(%s, 'order', %s)",
                        (mid, mid, f"o{n}"),
                    )
                    aid = conn.execute(
                        "INSERT INTO attempts (message_id, payload_version_id, trigger, started_at, "
                        "request_summary, response_excerpt, outcome, detail, issues, latency_ms) VALUES "
                        "(%s, %s, 'intake', now(), '', '', 'anchor', '', '[]', 0) RETURNING id",
                        (mid, pid),
                    ).fetchone()[0]
                    conn.execute(
                        "INSERT INTO outbox (kind, ref_id, job_id, created_at, relayed_at) VALUES "
                        "('anchor', %s, %s, now(), now())",
                        (str(aid), f"anchor-{aid}"),
                    )
                    conn.execute(
                        "INSERT INTO audit_pending (occurred_at, actor, action, subject_type, subject_id, "
                        "to_state, details) VALUES (now(), 'anchor', 'anchor.receive', 'message', %s, "
                        "'queued', '{}')",
                        (mid,),
                    )

    with Timer() as t:
        threads = [threading.Thread(target=loop) for _ in range(CLIENT_THREADS)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    return count / t.seconds


def _bare_rq_rate(redis_url: str, jobs: int) -> float:
    """The anchor for delivery throughput: no-op jobs through one RQ SimpleWorker in burst mode."""
    from redis import Redis
    from rq import Queue, SimpleWorker

    conn = Redis.from_url(redis_url)
    queue = Queue(f"bench-noop-{uuid.uuid4().hex[:8]}", connection=conn)
    for _ in range(jobs):
        queue.enqueue(noop)
    worker = SimpleWorker([queue], connection=conn)
    with Timer() as t:
        worker.work(burst=True, logging_level="WARNING")
    return jobs / t.seconds


def noop() -> None:
    return None


def _workers(database_url: str) -> list[str]:
    # SQLite has one writer at a time: several processes would sleep-poll its file lock, so the
    # embedded defaults run one process with threads (as `recon web` does); PostgreSQL runs the
    # README's deployment. The anchor runs under the same configuration.
    if database_url.startswith("postgresql"):
        return ["-w", str(GUNICORN_WORKERS)]
    return ["-w", "1", "--threads", "8"]


def test_bench_intake(database_url, redis_url, users, fhir_connection, sessions):
    env = dict(os.environ, DATABASE_URL=database_url, REDIS_URL=redis_url)
    is_pg = database_url.startswith("postgresql")
    db = "PostgreSQL" if is_pg else "SQLite"
    workers = _workers(database_url)
    count = _intake_messages()
    token = users["svc_token"]
    if is_pg:
        print(f"\nintake benchmark: {quiesce_postgres(database_url)}")
    with gunicorn("tests.perf.bare_app:app", env, workers) as port:
        _hammer(port, _requests("x", "mercy-epic", "warm", 200))
        bare_seconds, _ = _hammer(port, _requests("x", "mercy-epic", "bare", count))
    flask_rate = count / bare_seconds
    with gunicorn("app:create_app()", env, workers) as port:
        _hammer(port, _requests(token, "mercy-epic", "warm", 200))
        requests = _requests(token, "mercy-epic", "bench", count)
        seconds, latencies = _hammer(port, requests)
    rate = count / seconds
    p99 = percentile(latencies, 99)
    figures = {
        "db": db,
        "gunicorn": " ".join(workers),
        "connections": CLIENT_THREADS,
        "messages": count,
        "msg_per_s": f"{rate:.0f}",
        "p50_ms": f"{percentile(latencies, 50):.1f}",
        "p99_ms": f"{p99:.1f}",
        "anchor_bare_flask_per_s": f"{flask_rate:.0f}",
        "ratio_to_bare_flask": f"{rate / flask_rate:.3f}",
    }
    ok = rate >= INTAKE_TARGET_PER_S and p99 <= INTAKE_TARGET_P99_MS
    if is_pg:
        from app.db.session import transaction
        from app.services import connections

        with transaction(sessions) as s:
            connection_id = connections.by_name(s, "mercy-epic").id
        psycopg_rate = _bare_psycopg_rate(database_url, users["svc"].id, connection_id, count)
        figures["anchor_bare_psycopg_per_s"] = f"{psycopg_rate:.0f}"
        figures["ratio_to_bare_psycopg"] = f"{rate / psycopg_rate:.3f}"
        ok = ok and rate / psycopg_rate >= INTAKE_TARGET_RATIO_TO_PSYCOPG
    report(
        "intake",
        figures,
        f"≥ {INTAKE_TARGET_PER_S} msg/s, ≥ {INTAKE_TARGET_RATIO_TO_PSYCOPG}× bare psycopg and p99 ≤ "
        f"{INTAKE_TARGET_P99_MS} ms (issue 6, PostgreSQL, 8 connections)",
        ok,
    )
