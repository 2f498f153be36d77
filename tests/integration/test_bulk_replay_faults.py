"""Bulk replay against the real simulator (issue 6): 500 items with 10% commit-then-drop are each
applied once, cancel mid-way stops the rest, progress adds up; a Redis restart mid-run loses
nothing (the database holds the schedule); the EHR sees the pace."""

from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa
from rq import SimpleWorker

from app.adapters.queue import relay_outbox
from app.db.bulk_replay_models import BulkReplay, BulkReplayItem
from app.db.models import Attempt, Connection, ExceptionItem, Message, User
from app.db.session import transaction
from app.domain.bulk_replay import Pace
from app.services import bulk_replay
from tests.conftest import PASSWORD
from tests.integration.bulk_helpers import rejected_orders
from tests.integration.test_liveness import OwnRedis
from tests.integration.workers import POLICY, start_worker, stop, wait_for, wait_until_alive

SYSTEM = "urn:recon:idempotency:svc"


def approved_batch(sessions, users, ids, pace: Pace, requester="rita", approver="lena") -> int:
    with transaction(sessions) as s:
        batch = bulk_replay.request_batch(
            s, s.get(User, users[requester].id), [(i, None) for i in ids], "EHR fixed its code table", pace
        )
    with transaction(sessions) as s:
        bulk_replay.decide_batch(s, batch.id, s.get(User, users[approver].id), "approve", password=PASSWORD)
    return batch.id


def progress(sessions, batch_id):
    with transaction(sessions, read_only=True) as s:
        return bulk_replay.progress(s, batch_id), s.get(BulkReplay, batch_id).state


def keys_of(sessions, ids) -> dict[int, str]:
    with transaction(sessions, read_only=True) as s:
        return dict(
            s.execute(
                sa.select(ExceptionItem.id, Message.idempotency_key)
                .join(Message, Message.id == ExceptionItem.message_id)
                .where(ExceptionItem.id.in_(ids))
            ).all()
        )


def test_bulk_replay_of_500_with_dropped_responses_applies_each_once_and_cancel_stops_the_rest(
    users, fhir_connection, sessions, runtime, queue, sim, sim_control, run_worker
):
    # A tenant of a fixed name: the simulator draws each fault from (tenant, delivery identifier,
    # attempt, seed), so the same creates are dropped in every run (a fresh random tenant made the
    # number of drops among the 51 released a coin toss: fewer than 2 in ~3% of runs).
    tenant = "bulk-500-dropped-responses"
    ids = rejected_orders(sessions, users["svc"], 500, prefix="bulk")
    with transaction(sessions) as s:  # a replay after a dropped response waits out this window
        connection = s.get(Connection, fhir_connection.id)
        connection.read_timeout = 1.0
        connection.endpoint = sim.tenant_url(tenant)
    # 10% of creates are committed and then the connection drops; the EHR ignores If-None-Exist.
    sim_control.set_profile(tenant, rate_commit_then_drop=0.1, ignore_if_none_exist=True, seed="bulk-500")
    first = approved_batch(sessions, users, ids, Pace(500, 1.0))

    # The pacing step releases the first 0.1 s worth (500/s); a worker runs 25 of them...
    released = bulk_replay.release_due(sessions, horizon_seconds=0.1).released
    assert released == 51  # slots 0, 2, 4 ... 100 ms
    relay_outbox(runtime, queue)
    from jobs.delivery import install_runtime

    install_runtime(runtime)
    try:
        SimpleWorker([queue], connection=queue.connection).work(
            burst=True, max_jobs=25, logging_level="WARNING"
        )
    finally:
        install_runtime(None)
    mid, _ = progress(sessions, first)
    # some done, some still in flight
    assert mid.delivered + mid.failed == 25 and mid.released == released - 25
    # ...and a reviewer cancels mid-way: every held item stops, the released ones finish.
    with transaction(sessions) as s:
        bulk_replay.decide_batch(s, first, s.get(User, users["rita"].id), "cancel", reason="wrong code table")
    run_worker()
    bulk_replay.release_due(sessions)  # settles the last ones
    done, state = progress(sessions, first)
    assert state == "cancelled"
    assert done.adds_up and done.total == 500
    assert (done.held, done.released) == (0, 0)
    assert done.delivered + done.failed == released and done.cancelled == 500 - released
    assert 2 <= done.failed <= 15, done  # the drops really bit (10% of 51; 1 s timeouts add to them)

    keys = keys_of(sessions, ids)
    with transaction(sessions, read_only=True) as s:
        items = s.execute(
            sa.select(BulkReplayItem.exception_id, BulkReplayItem.state).where(
                BulkReplayItem.bulk_replay_id == first
            )
        ).all()
    cancelled_keys = {f"{SYSTEM}|{keys[i]}" for i, state in items if state == "cancelled"}
    applied = sim_control.deliveries(tenant, "applied")
    assert not cancelled_keys & set(applied)  # nothing held was sent after the cancel
    assert set(applied.values()) == {1}  # and what was sent was applied once
    assert len(applied) == released  # a dropped response was still applied (committed) — once

    # The failed ones (unknown outcome: the response was dropped) in one more batch: the identifier
    # search finds each applied, so none is sent again.
    with transaction(sessions, read_only=True) as s:
        unknown = s.scalars(
            sa.select(ExceptionItem.id)
            .where(ExceptionItem.state == "open", ExceptionItem.category == "unknown_outcome")
            .order_by(ExceptionItem.id)
        ).all()
    assert len(unknown) == done.failed
    second = approved_batch(sessions, users, unknown, Pace(1000, 1.0), requester="ravi", approver="leo")
    run_worker()
    bulk_replay.release_due(sessions)
    after, state = progress(sessions, second)
    assert (state, after.delivered, after.adds_up) == ("completed", len(unknown), True)
    with transaction(sessions, read_only=True) as s:
        outcome = dict(
            s.execute(sa.select(ExceptionItem.id, ExceptionItem.state).where(ExceptionItem.id.in_(ids))).all()
        )
    cancelled_ids = {i for i, state in items if state == "cancelled"}
    assert {outcome[i] for i in ids if i not in cancelled_ids} == {"resolved"}
    assert {outcome[i] for i in cancelled_ids} == {"open"}  # back in the queue, never sent
    expected = {f"{SYSTEM}|{keys[i]}": 1 for i in ids if i not in cancelled_ids}
    assert sim_control.deliveries(tenant, "applied") == expected  # each applied exactly once


def test_the_ehr_sees_the_pace_each_replay_waits_for_its_slot(
    users, fhir_connection, sessions, sim_control, run_worker
):
    ids = rejected_orders(sessions, users["svc"], 10, prefix="paced")
    batch = approved_batch(sessions, users, ids, Pace(5, 1.0))
    run_worker()
    done, state = progress(sessions, batch)
    assert (state, done.delivered) == ("completed", 10)
    with transaction(sessions, read_only=True) as s:
        rows = s.execute(
            sa.select(BulkReplayItem.release_at, Attempt.started_at)
            .join(Attempt, Attempt.replay_id == BulkReplayItem.replay_id)
            .where(BulkReplayItem.bulk_replay_id == batch)
            .order_by(BulkReplayItem.position)
        ).all()
    slots = [slot for slot, _ in rows]
    assert all(b - a >= timedelta(milliseconds=200) for a, b in zip(slots, slots[1:], strict=False))
    assert all(started >= slot for slot, started in rows)  # no call to the EHR before its slot
    assert rows[-1][1] - rows[0][0] >= timedelta(milliseconds=1800)  # 10 at 5/s: not in one burst


def test_redis_restarted_mid_run_loses_nothing(
    users, fhir_connection, sessions, database_url, queue_name, sim_control, tmp_path
):
    tenant = fhir_connection.tenant
    ids = rejected_orders(sessions, users["svc"], 40, prefix="redis")
    own = OwnRedis(tmp_path).start()
    worker = start_worker(database_url, own.url, queue_name)
    try:
        import redis

        probe = redis.Redis.from_url(own.url)
        wait_until_alive(probe, queue_name, worker)
        probe.close()
        batch = approved_batch(sessions, users, ids, Pace(5, 1.0))  # 8 s of releases
        assert wait_for(lambda: progress(sessions, batch)[0].delivered >= 3, timeout=30)
        own.kill()  # mid-run: the queued jobs are gone with it
        mid, _ = progress(sessions, batch)
        own.start()  # empty
        finished = wait_for(
            lambda: progress(sessions, batch)[1] == "completed", timeout=POLICY.bound_seconds + 30
        )
        alive = worker.poll() is None
    finally:
        log = stop(worker)
        own.kill()
    assert mid.held > 0, mid  # the restart really came mid-run
    assert alive and finished, log
    done, _ = progress(sessions, batch)
    assert done.as_dict() == {
        "total": 40,
        "held": 0,
        "released": 0,
        "delivered": 40,
        "failed": 0,
        "cancelled": 0,
    }
    assert sim_control.deliveries(tenant, "applied") == {f"{SYSTEM}|redis-{n:04d}": 1 for n in range(40)}
