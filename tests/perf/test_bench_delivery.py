"""Throughput of delivery (real `recon worker` processes → FHIR adapter → simulator), each figure
beside its anchor measured in the same run on the same Redis:

* simulator at 0 ms, 1 worker — anchor: bare RQ no-op jobs, 1 SimpleWorker process;
* simulator at 0 ms, 4 workers — anchor: bare RQ no-op jobs, 4 SimpleWorker processes
  (issue 6: ≥ 0.5×);
* simulator at 100 ms, 4 workers — target ≥ 200 deliveries/s (issue 6; needs concurrent calls
  per connection: RECON_DELIVERY_CONCURRENCY).

The simulator runs as `recon sim` in a process of its own. Messages are accepted through the API
(gunicorn); their jobs are handed to RQ once every worker process is up;
a rate is counted from the first claim to the last settled attempt (the database's timestamps),
an anchor from its first job's start to its last job's end (RQ's timestamps): neither counts
process start-up. Size: RECON_BENCH_DELIVERY_MESSAGES (default 1,000; RECON_BENCH_QUICK=1: 400).
Worker settings per line: RECON_BENCH_FAST_BATCH / _CONCURRENCY (0 ms), RECON_BENCH_SLOW_BATCH /
_CONCURRENCY (100 ms).
Statements per delivery: a line counting every SQL statement of an in-process burst worker
(delivery and housekeeping) per delivered message (RECON_BENCH_STATEMENTS_MESSAGES, default 200).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import types
import uuid

import pytest
import sqlalchemy as sa

from tests.perf.conftest import report
from tests.perf.test_bench_pipeline import _free_port, _hammer, _requests, _workers, gunicorn, serving

FAST_TARGET_RATIO = 0.5
SLOW_TARGET_PER_S = 200
SLOW_LATENCY_MS = 100
ONE_WORKER_TARGET_PER_S = 40
FAST_BATCH, FAST_CONCURRENCY = 20, 4  # RECON_DELIVERY_BATCH / _CONCURRENCY for the 0 ms lines
SLOW_BATCH, SLOW_CONCURRENCY = 32, 16  # and for the 100 ms line


def _messages() -> int:
    if os.environ.get("RECON_BENCH_QUICK") == "1":
        return 400
    return int(os.environ.get("RECON_BENCH_DELIVERY_MESSAGES", 1000))


def noop() -> None:
    return None


def _spawn(code: str, env: dict, count: int) -> list[subprocess.Popen]:
    """Processes whose output goes to a file each (a full pipe would stall a chatty worker)."""
    procs = []
    for _ in range(count):
        log = tempfile.TemporaryFile()  # noqa: SIM115 (closed with the process, in _reap)
        proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=log, stderr=subprocess.STDOUT)
        proc.log = log
        procs.append(proc)
    return procs


def _output(proc) -> str:
    proc.log.seek(0)
    return proc.log.read().decode(errors="replace")[-3000:]


def _reap(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if hasattr(proc, "log"):
            proc.log.close()


def _bare_rq_rate(redis_url: str, jobs: int, workers: int) -> float:
    """No-op jobs through `workers` RQ SimpleWorker processes in burst mode on the same Redis."""
    from redis import Redis
    from rq import Queue
    from rq.job import Job
    from rq.utils import str_to_date

    conn = Redis.from_url(redis_url)
    name = f"bench-noop-{uuid.uuid4().hex[:8]}"
    queue = Queue(name, connection=conn)
    ids = [queue.enqueue(noop, result_ttl=600).id for _ in range(jobs)]
    code = (
        "from redis import Redis; from rq import Queue, SimpleWorker; "
        f"c = Redis.from_url({redis_url!r}); "
        f"SimpleWorker([Queue({name!r}, connection=c)], connection=c).work(burst=True, logging_level='WARNING')"
    )
    procs = _spawn(code, dict(os.environ), workers)
    for proc in procs:
        proc.wait(timeout=300)
    with conn.pipeline(transaction=False) as pipe:
        for job_id in ids:
            pipe.hmget(Job.key_for(job_id), "started_at", "ended_at", "status")
        rows = pipe.execute()
    assert all(row[2] == b"finished" for row in rows), "bare RQ: not every job finished"
    started = min(str_to_date(row[0]) for row in rows)
    ended = max(str_to_date(row[1]) for row in rows)
    queue.delete(delete_jobs=True)
    return jobs / (ended - started).total_seconds()


def _submit(port: int, token: str, prefix: str, count: int, connection: str = "mercy-epic") -> None:
    seconds, _ = _hammer(port, _requests(token, connection, prefix, count))
    assert seconds > 0


@contextlib.contextmanager
def _own_simulator(env: dict):
    """`recon sim` in a process of its own, as deployed: the workers' calls do not compete with
    the test process (gunicorn's client, the polling) for one interpreter lock."""
    fhir_port, mllp_port = _free_port(), _free_port()
    command = [
        sys.executable,
        "-m",
        "app.cli",
        "sim",
        "--fhir-port",
        str(fhir_port),
        "--mllp-port",
        str(mllp_port),
    ]
    sim = types.SimpleNamespace(base_url=f"http://127.0.0.1:{fhir_port}")
    sim.tenant_url = lambda tenant: f"{sim.base_url}/fhir/{tenant}"
    with serving(command, env, f"{sim.base_url}/fhir/ping/metadata", tries=300):
        yield sim


def _hold_outbox(sessions) -> list:
    """Take the accepted messages' outbox rows (marked relayed, so the workers' own relay leaves
    them): `_release` enqueues their jobs once every worker is up."""
    from app.db.models import OutboxEntry
    from app.services.clock import utcnow

    with sessions() as s, s.begin():
        rows = s.execute(
            sa.update(OutboxEntry)
            .where(OutboxEntry.relayed_at.is_(None))
            .values(relayed_at=utcnow())
            .returning(OutboxEntry.kind, OutboxEntry.ref_id, OutboxEntry.job_id)
        ).all()
    return sorted(rows, key=lambda r: int(r.ref_id))


def _release(queue, rows) -> None:
    from app.adapters.queue import JOB_FUNCTIONS, JOB_TIMEOUT

    with queue.connection.pipeline() as pipe:
        for row in rows:
            queue.enqueue_call(
                JOB_FUNCTIONS[row.kind],
                args=(int(row.ref_id),),
                job_id=f"{queue.name}-{row.job_id}",
                timeout=JOB_TIMEOUT,
                result_ttl=600,
                pipeline=pipe,
            )
        pipe.execute()


def _delivered_window(sessions, first_attempt_id: int) -> tuple[int, float]:
    """(delivered attempts, seconds from the first claim to the last settle) since an attempt id."""
    from app.db.models import Attempt

    with sessions() as s:
        count, first, last = s.execute(
            sa.select(
                sa.func.count(), sa.func.min(Attempt.started_at), sa.func.max(Attempt.finished_at)
            ).where(Attempt.id > first_attempt_id, Attempt.outcome == "delivered")
        ).one()
    return count, (last - first).total_seconds() if count else 0.0


def _last_attempt_id(sessions) -> int:
    from app.db.models import Attempt

    with sessions() as s:
        return s.scalar(sa.select(sa.func.coalesce(sa.func.max(Attempt.id), 0)))


def _deliver(env, sessions, queue, workers: int, expected: int, first_attempt_id: int) -> float:
    """Start `workers` real `recon worker` processes; once every one is up (has beaten), hand them
    the held jobs and wait until every message is delivered."""
    held = _hold_outbox(sessions)
    code = "from app.cli import main; main(['worker'])"
    # housekeeping (relay, re-queue) is not what is measured: every job is handed over at once
    procs = _spawn(code, dict(env, RECON_HOUSEKEEPING_SECONDS="30"), workers)
    try:
        keys = [f"recon:worker-alive:{queue.name}:recon-{socket.gethostname()}-{p.pid}" for p in procs]
        deadline = time.monotonic() + 120
        while not all(queue.connection.exists(k) for k in keys) and time.monotonic() < deadline:
            dead = [p for p in procs if p.poll() is not None]
            assert not dead, _output(dead[0])
            time.sleep(0.05)
        _release(queue, held)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            count, _ = _delivered_window(sessions, first_attempt_id)
            if count >= expected:
                break
            dead = [p for p in procs if p.poll() is not None]
            assert not dead, _output(dead[0])
            time.sleep(0.2)
    finally:
        output = _output(procs[0])
        _reap(procs)
    count, seconds = _delivered_window(sessions, first_attempt_id)
    if count != expected:
        from app.db.models import Attempt

        with sessions() as s:
            outcomes = s.execute(
                sa.select(Attempt.outcome, sa.func.count())
                .where(Attempt.id > first_attempt_id)
                .group_by(Attempt.outcome)
            ).all()
        pytest.fail(f"{count} of {expected} delivered; attempts {outcomes}; worker: {output}")
    return count / seconds


@pytest.mark.postgres
@pytest.mark.timeout(900)
def test_bench_delivery(database_url, redis_url, queue_name, queue, users, sessions):
    from tests.conftest import SimControl, add_fhir_connection

    count = _messages()
    env = dict(os.environ, DATABASE_URL=database_url, REDIS_URL=redis_url, RECON_QUEUE=queue_name)
    env.pop("RECON_FAULT_INJECT", None)
    with _own_simulator(env) as sim:
        tenant = f"bench{uuid.uuid4().hex[:8]}"
        add_fhir_connection(sessions, sim.tenant_url(tenant), customer="Bench Health")
        _bench(
            env, sessions, queue, users["svc_token"], tenant, SimControl(sim), count, redis_url, database_url
        )


def _bench(env, sessions, queue, token, tenant, sim_control, count, redis_url, database_url) -> None:
    # The worker settings of each line (RECON_DELIVERY_BATCH / _CONCURRENCY, printed in it): larger
    # batches than the defaults (5 / 5) at 0 ms, wide concurrency for the slow EHR at 100 ms.
    fast = {
        "delivery_batch": int(os.environ.get("RECON_BENCH_FAST_BATCH", FAST_BATCH)),
        "delivery_concurrency": int(os.environ.get("RECON_BENCH_FAST_CONCURRENCY", FAST_CONCURRENCY)),
    }
    slow = {
        "delivery_batch": int(os.environ.get("RECON_BENCH_SLOW_BATCH", SLOW_BATCH)),
        "delivery_concurrency": int(os.environ.get("RECON_BENCH_SLOW_CONCURRENCY", SLOW_CONCURRENCY)),
    }
    runs = [
        ("delivery_0ms_1_worker", 0, 1, max(count // 2, 200), fast),
        ("delivery_0ms_4_workers", 0, 4, count, fast),
        ("delivery_100ms_4_workers", SLOW_LATENCY_MS, 4, count, slow),
    ]
    only = os.environ.get("RECON_BENCH_DELIVERY_ONLY")  # e.g. "0ms_4" to run the matching lines
    runs = [run for run in runs if not only or any(o in run[0] for o in only.split(","))]
    delivered_before = 0
    with gunicorn("app:create_app()", env, _workers(database_url)) as port:
        for name, latency, workers, messages, settings in runs:
            sim_control.set_profile(tenant, latency_ms=latency)
            first = _last_attempt_id(sessions)
            _submit(port, token, f"{name}-{uuid.uuid4().hex[:6]}", messages)
            run_env = dict(
                env,
                RECON_DELIVERY_BATCH=str(settings["delivery_batch"]),
                RECON_DELIVERY_CONCURRENCY=str(settings["delivery_concurrency"]),
            )
            rate = _deliver(run_env, sessions, queue, workers, messages, first)
            delivered_before += messages
            assert sim_control.applied(tenant)["total"] == delivered_before
            figures = {
                "db": "PostgreSQL",
                "messages": messages,
                "workers": workers,
                "latency_ms": latency,
                "batch": settings["delivery_batch"],
                "concurrency": settings["delivery_concurrency"],
            }
            figures["deliveries_per_s"] = f"{rate:.0f}"
            if latency == 0:
                anchor = _bare_rq_rate(redis_url, messages, workers)
                figures["anchor_bare_rq_noop_per_s"] = f"{anchor:.0f}"
                figures["ratio_to_bare_rq"] = f"{rate / anchor:.3f}"
                if workers == 1:
                    target, ok = (
                        f"≥ {ONE_WORKER_TARGET_PER_S} deliveries/s, one worker",
                        (rate >= ONE_WORKER_TARGET_PER_S),
                    )
                else:
                    target = f"≥ {FAST_TARGET_RATIO}× bare RQ no-op jobs, {workers} SimpleWorkers (issue 6)"
                    ok = rate / anchor >= FAST_TARGET_RATIO
            else:
                figures["anchor_one_call_per_worker_per_s"] = f"{workers * 1000 / latency:.0f}"
                target = f"≥ {SLOW_TARGET_PER_S} deliveries/s (issue 6)"
                ok = rate >= SLOW_TARGET_PER_S
            report(name, figures, target, ok)


def test_bench_delivery_statements(database_url, users, fhir_connection, run_worker, sessions, sim_control):
    """SQL statements per delivered message, the in-process burst worker's whole run."""
    from app.db.session import get_engine

    messages = int(os.environ.get("RECON_BENCH_STATEMENTS_MESSAGES", 200))
    env = dict(os.environ, DATABASE_URL=database_url)
    with gunicorn("app:create_app()", env, _workers(database_url)) as port:
        _submit(port, users["svc_token"], f"stmts-{uuid.uuid4().hex[:6]}", messages)
    counted = {"statements": 0, "commits": 0}

    def statement(*_args):
        counted["statements"] += 1

    def commit(*_args):
        counted["commits"] += 1

    engine = get_engine(database_url)
    sa.event.listen(engine, "before_cursor_execute", statement)
    sa.event.listen(engine, "commit", commit)
    try:
        if os.environ.get("RECON_BENCH_PROFILE"):  # a file name: cProfile stats of the worker's thread
            import cProfile

            profile = cProfile.Profile()
            profile.runcall(run_worker)
            profile.dump_stats(os.environ["RECON_BENCH_PROFILE"])
        else:
            run_worker()
    finally:
        sa.event.remove(engine, "before_cursor_execute", statement)
        sa.event.remove(engine, "commit", commit)
    assert sim_control.applied(fhir_connection.tenant)["total"] == messages
    report(
        "delivery_statements",
        {
            "db": "PostgreSQL" if database_url.startswith("postgresql") else "SQLite",
            "messages": messages,
            "statements_per_delivery": f"{counted['statements'] / messages:.1f}",
            "commits_per_delivery": f"{counted['commits'] / messages:.2f}",
        },
        "fewer round trips per delivery (informational)",
        True,
    )
