"""SPEC 2: a worker killed mid-delivery (real process, SIGKILL). The item comes back as
unknown_outcome through the lease reaper; nothing is re-sent without a human decision."""

import os
import signal
import subprocess
import sys
import time

import sqlalchemy as sa

from app.db.models import Attempt, ExceptionItem, Replay, User
from app.db.session import transaction
from app.services.exceptions import DecisionInput, decide
from tests.conftest import PASSWORD
from tests.samples import medication_request, message_body

LEASE = 2


def start_worker(database_url, redis_url, queue_name, *extra):
    env = dict(
        os.environ,
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        RECON_QUEUE=queue_name,
        RECON_LEASE_SECONDS=str(LEASE),
    )
    return subprocess.Popen(
        [sys.executable, "-m", "app.cli", "worker", *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def in_flight(sessions, **where) -> bool:
    with transaction(sessions) as s:
        return (
            s.scalar(sa.select(sa.func.count()).select_from(Attempt).filter_by(outcome="in_flight", **where))
            > 0
        )


def run_burst(database_url, redis_url, queue_name):
    proc = start_worker(database_url, redis_url, queue_name, "--burst")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out.decode()


def test_worker_killed_mid_delivery_leaves_unknown_outcome_and_sends_nothing_more(
    client, users, fhir_connection, sessions, database_url, redis_url, queue_name, sim_control
):
    tenant = fhir_connection.tenant
    sim_control.set_profile(tenant, latency_ms=4000)
    r = client.post(
        "/api/v1/messages",
        json=message_body("mercy-epic", medication_request(21)),
        headers={"Authorization": f"Bearer {users['svc_token']}", "Idempotency-Key": "kill-1"},
    )
    worker = start_worker(database_url, redis_url, queue_name)
    try:
        assert wait_for(lambda: in_flight(sessions)), "the worker never started the call"
        assert wait_for(lambda: sim_control.deliveries(tenant)), "the create never reached the EHR"
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=10)
    finally:
        if worker.poll() is None:
            worker.kill()
    time.sleep(LEASE + 0.5)
    sim_control.set_profile(tenant, preset="default")
    run_burst(database_url, redis_url, queue_name)  # the reaper runs; nothing is re-sent
    time.sleep(4.5)  # let the simulator finish the slow request the dead worker started

    with transaction(sessions) as s:
        item = s.scalar(sa.select(ExceptionItem).where(ExceptionItem.message_id == r.json["id"]))
        attempts = s.scalars(sa.select(Attempt).where(Attempt.message_id == r.json["id"])).all()
    assert item.category == "unknown_outcome" and item.state == "open"
    assert [a.outcome for a in attempts] == ["unknown"]
    assert sim_control.deliveries(tenant) == {"urn:recon:idempotency:svc|kill-1": 1}


def test_worker_killed_mid_replay_reopens_as_unknown_outcome(
    client, users, fhir_connection, sessions, database_url, redis_url, queue_name, sim_control, run_worker
):
    tenant = fhir_connection.tenant
    sim_control.set_profile(tenant, rate_reject=1.0)
    r = client.post(
        "/api/v1/messages",
        json=message_body("mercy-epic", medication_request(22)),
        headers={"Authorization": f"Bearer {users['svc_token']}", "Idempotency-Key": "kill-2"},
    )
    run_worker()
    with transaction(sessions) as s:
        exc_id = s.scalar(sa.select(ExceptionItem.id).where(ExceptionItem.message_id == r.json["id"]))
        decide(s, exc_id, s.get(User, users["rita"].id), DecisionInput("resubmit", reason="EHR fixed"))
    with transaction(sessions) as s:
        decide(
            s, exc_id, s.get(User, users["lena"].id), DecisionInput("approve", reason="ok", password=PASSWORD)
        )
    sim_control.set_profile(tenant, latency_ms=4000)
    worker = start_worker(database_url, redis_url, queue_name)
    try:
        before = sim_control.requests(tenant)["all_requests"]
        assert wait_for(lambda: in_flight(sessions, trigger="replay:1")), "the replay never started"
        assert wait_for(lambda: sim_control.requests(tenant)["all_requests"] > before), (
            "no request reached the EHR"
        )
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=10)
    finally:
        if worker.poll() is None:
            worker.kill()
    time.sleep(LEASE + 0.5)
    run_burst(database_url, redis_url, queue_name)
    with transaction(sessions) as s:
        item = s.get(ExceptionItem, exc_id)
        replay = s.scalar(sa.select(Replay).where(Replay.exception_id == exc_id))
        assert (item.state, item.category) == ("open", "unknown_outcome")
        assert replay.state == "lost"
