"""Issue 6 'Faults': a crash between commit and enqueue loses nothing and sends nothing twice.

An approval commits its replay and an outbox row in one transaction; only the relay puts work into
RQ. Here 100 approvals are committed, then the relay process is SIGKILLed part-way through
enqueueing them (some jobs in Redis, no outbox row marked relayed). A worker then relays and runs
them: every one of the 100 replays is delivered, and each reaches the EHR once.
"""

from __future__ import annotations

import multiprocessing
import signal

import sqlalchemy as sa
from argon2 import PasswordHasher

from app.db.models import Attempt, ExceptionItem, OutboxEntry, Replay, User
from app.db.session import transaction
from app.services.exceptions import DecisionInput, decide
from app.services.intake import report_exception
from tests.conftest import PASSWORD
from tests.samples import medication_request, message_body

APPROVALS = 100
SURVIVES = 40  # the relay enqueues this many jobs, then dies before marking any row relayed


def _relay_then_die(database_url: str, redis_url: str, queue_name: str) -> None:
    """A worker's relay that is SIGKILLed as it is about to enqueue job SURVIVES + 1."""
    import os

    import redis
    from rq import Queue

    from app.adapters.queue import relay_outbox
    from app.db.session import session_factory
    from app.services.delivery import Runtime

    queue = Queue(queue_name, connection=redis.Redis.from_url(redis_url))
    enqueue, done = queue.enqueue_call, []

    def enqueue_until_killed(*args, **kwargs):
        if len(done) == SURVIVES:
            os.kill(os.getpid(), signal.SIGKILL)
        done.append(1)
        return enqueue(*args, **kwargs)

    queue.enqueue_call = enqueue_until_killed
    relay_outbox(Runtime(sessions=session_factory(database_url)), queue)


def test_a_relay_killed_between_commit_and_enqueue_still_delivers_100_approvals_once_each(
    client,
    users,
    sessions,
    database_url,
    redis_url,
    queue,
    queue_name,
    sim_connection,
    sim_control,
    run_worker,
):
    tenant = sim_connection("relay-fhir", customer="Relay Health")
    with transaction(sessions) as s:  # an interface engine reports 100 orders it could not send
        svc = s.get(User, users["svc"].id)
        for n in range(APPROVALS):
            body = message_body("relay-fhir", medication_request(n))
            report_exception(s, svc, f"relay-{n}", {**body, "error": "HTTP 422: dosage unit not recognised"})
    with transaction(sessions) as s:
        items = s.scalars(sa.select(ExceptionItem.id).where(ExceptionItem.state == "open")).all()
        for exc_id in items:
            decide(s, exc_id, s.get(User, users["rita"].id), DecisionInput("resubmit", reason="EHR fixed"))
        # The same argon2id check at the cheapest parameters: 100 approvals at the production cost
        # would take most of a minute on two cores, and the password is not what this test is about.
        s.get(User, users["lena"].id).password_hash = PasswordHasher(1, 8, 1).hash(PASSWORD)
    assert len(items) == APPROVALS
    for exc_id in items:  # each approval commits on its own, as the console's would
        with transaction(sessions) as s:
            approver = s.get(User, users["lena"].id)
            decide(s, exc_id, approver, DecisionInput("approve", reason="ok", password=PASSWORD))

    relay = multiprocessing.get_context("spawn").Process(
        target=_relay_then_die, args=(database_url, redis_url, queue_name)
    )
    relay.start()
    relay.join(timeout=120)
    assert relay.exitcode == -signal.SIGKILL
    assert queue.count == SURVIVES  # in Redis, but the database does not know it
    with transaction(sessions, read_only=True) as s:
        unrelayed = s.scalar(
            sa.select(sa.func.count())
            .select_from(OutboxEntry)
            .where(OutboxEntry.kind == "replay", OutboxEntry.relayed_at.is_(None))
        )
    assert unrelayed == APPROVALS

    run_worker()  # relays all 100 (the 40 already queued are not queued twice), runs them
    with transaction(sessions, read_only=True) as s:
        replays = s.execute(sa.select(Replay.state, sa.func.count()).group_by(Replay.state)).all()
        delivered = s.execute(
            sa.select(Attempt.message_id, sa.func.count())
            .where(Attempt.outcome == "delivered")
            .group_by(Attempt.message_id)
        ).all()
        still_open = s.scalar(
            sa.select(sa.func.count()).select_from(ExceptionItem).where(ExceptionItem.state != "resolved")
        )
    assert dict(replays) == {"succeeded": APPROVALS}
    assert len(delivered) == APPROVALS and {n for _, n in delivered} == {1}
    assert still_open == 0
    sent = sim_control.deliveries(tenant)  # creates received per delivery identifier
    assert len(sent) == APPROVALS and set(sent.values()) == {1}  # never sent twice
    applied = sim_control.deliveries(tenant, what="applied")
    assert len(applied) == APPROVALS and set(applied.values()) == {1}
