"""Several deliveries per job (issue 6, "Throughput"; app/services/delivery/batch.py): each attempt
still claimed by compare-and-set, each its own attempt row and audit event, never applied twice; a
batch stops sending once its own failures open the breaker; a result the reaper beat is kept as a
late result; a lost batch becomes unknown_outcome item by item, never re-sent."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import sqlalchemy as sa

from app.db.models import Attempt, AuditPending, Connection, ExceptionItem, Message
from app.db.session import transaction
from app.domain.delivery import AttemptOutcome, Category, Outcome
from app.services.clock import utcnow
from app.services.delivery import Runtime, deliver_batch, reap_expired_leases
from app.services.delivery.batch import claim_batch, settle_batch
from tests.samples import medication_request, message_body


def submit(client, token: str, connection: str, count: int, prefix: str = "batch") -> list[str]:
    ids = []
    for n in range(count):
        r = client.post(
            "/api/v1/messages",
            json=message_body(connection, medication_request(n)),
            headers={"Authorization": f"Bearer {token}", "Idempotency-Key": f"{prefix}-{n}"},
        )
        assert r.status_code == 202, r.get_data(as_text=True)
        ids.append(r.json["id"])
    return ids


def queued_attempts(sessions) -> list[int]:
    with transaction(sessions, read_only=True) as s:
        return list(s.scalars(sa.select(Attempt.id).where(Attempt.outcome == "queued").order_by(Attempt.id)))


def outcomes(sessions) -> dict[str, int]:
    with transaction(sessions, read_only=True) as s:
        return dict(s.execute(sa.select(Attempt.outcome, sa.func.count()).group_by(Attempt.outcome)).all())


class ScriptedEhr:
    """Answers every delivery with `answer(n)`; counts calls and the most calls in flight at once."""

    def __init__(self, answer, delay: float = 0.0):
        self.answer, self.delay = answer, delay
        self.calls = self.in_flight = self.most_in_flight = 0
        self.lock = threading.Lock()

    def deliver(self, envelope) -> Outcome:
        with self.lock:
            n = self.calls
            self.calls += 1
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        time.sleep(self.delay)
        with self.lock:
            self.in_flight -= 1
        return self.answer(n)

    def find_applied(self, envelope):
        return None

    def close(self) -> None:
        pass


def delivered(n: int) -> Outcome:
    return Outcome(AttemptOutcome.DELIVERED, None, status_code=201, resource_ref=f"MedicationRequest/{n}")


def unavailable(n: int) -> Outcome:
    return Outcome(
        AttemptOutcome.TRANSIENT,
        Category.EHR_UNAVAILABLE,
        status_code=503,
        provably_not_applied=True,
        detail="503 before processing",
    )


def test_one_job_delivers_a_batch_each_attempt_its_own_row_and_event_applied_once(
    client, users, sessions, fhir_connection, sim_control, run_worker, runtime
):
    runtime.delivery_batch, runtime.delivery_concurrency = 8, 4
    ids = submit(client, users["svc_token"], "mercy-epic", 20)
    counts = run_worker()
    assert sim_control.applied(fhir_connection.tenant)["total"] == 20
    assert all(n == 1 for n in sim_control.deliveries(fhir_connection.tenant).values())
    assert outcomes(sessions) == {"delivered": 20}
    # jobs of attempts another job's batch claimed were taken out of the queue: fewer than one each
    assert counts["jobs"] <= 20
    with transaction(sessions, read_only=True) as s:
        attempts = s.execute(
            sa.select(Attempt.message_id, sa.func.count()).group_by(Attempt.message_id)
        ).all()
        assert sorted(m for m, _ in attempts) == sorted(ids) and {n for _, n in attempts} == {1}
        events = s.scalars(
            sa.select(sa.literal_column("subject_id"))
            .select_from(sa.text("audit_events"))
            .where(sa.literal_column("action") == "message.deliver")
        ).all()
        pending = s.scalars(
            sa.select(AuditPending.subject_id).where(AuditPending.action == "message.deliver")
        ).all()
        assert sorted([*events, *pending]) == sorted(ids)
        assert set(s.scalars(sa.select(Message.status))) == {"delivered"}


def test_a_batch_claims_by_compare_and_set_and_a_duplicate_job_drains_the_rest(
    client, users, sessions, sim_connection
):
    sim_connection("batch-fhir", customer="Batch Health")
    ehr = ScriptedEhr(delivered)
    rt = Runtime(sessions=sessions, worker_name="b", adapter_factory=lambda conn: ehr, delivery_batch=5)
    submit(client, users["svc_token"], "batch-fhir", 8)
    first = queued_attempts(sessions)[0]
    claimed: list[list[int]] = []
    result = deliver_batch(rt, first, on_claimed=claimed.append)
    assert result.startswith("delivered (batch: 5 delivered")
    assert ehr.calls == 5 and outcomes(sessions) == {"delivered": 5, "queued": 3}
    assert len(claimed[0]) == 4 and first not in claimed[0]
    # The same job again (a duplicate): its own attempt is settled, it claims the three left.
    result = deliver_batch(rt, first)
    assert result.startswith("skipped: attempt already claimed (batch: 3 delivered")
    assert ehr.calls == 8 and outcomes(sessions) == {"delivered": 8}
    assert deliver_batch(rt, first) == "skipped: attempt already claimed"
    assert ehr.calls == 8


def test_two_claimers_never_share_an_attempt(client, users, sessions, sim_connection):
    sim_connection("claim-fhir", customer="Claim Health")
    rt = Runtime(sessions=sessions, worker_name="c", delivery_batch=4)
    submit(client, users["svc_token"], "claim-fhir", 10)
    ids = queued_attempts(sessions)
    with transaction(sessions) as s:
        conn = s.scalar(sa.select(Connection).where(Connection.name == "claim-fhir"))
        a = claim_batch(s, rt, conn, ids[0])
    with transaction(sessions) as s:
        b = claim_batch(s, rt, conn, ids[1])  # its own attempt is in the first batch
        c = claim_batch(s, rt, conn, ids[0])
    taken = [x.id for x in a + b + c]
    assert len(taken) == len(set(taken)) == 10
    assert [len(a), len(b), len(c)] == [4, 4, 2]
    assert outcomes(sessions) == {"in_flight": 10}


def test_calls_run_concurrently_up_to_the_setting(client, users, sessions, sim_connection):
    sim_connection("slow-fhir", customer="Slow Health")
    ehr = ScriptedEhr(delivered, delay=0.2)
    rt = Runtime(
        sessions=sessions,
        worker_name="s",
        adapter_factory=lambda conn: ehr,
        delivery_batch=12,
        delivery_concurrency=6,
    )
    submit(client, users["svc_token"], "slow-fhir", 12)
    started = time.monotonic()
    deliver_batch(rt, queued_attempts(sessions)[0])
    took = time.monotonic() - started
    assert ehr.calls == 12 and ehr.most_in_flight == 6
    assert took < 12 * 0.2 / 2, took  # two rounds of six, not twelve calls one after another
    assert outcomes(sessions) == {"delivered": 12}


def test_a_batch_stops_sending_when_its_failures_open_the_breaker(client, users, sessions, sim_connection):
    sim_connection(
        "down-fhir", customer="Down Health", circuit_failure_threshold=3, retry_backoff_seconds=1.0
    )
    ehr = ScriptedEhr(unavailable)
    rt = Runtime(
        sessions=sessions,
        worker_name="d",
        adapter_factory=lambda conn: ehr,
        delivery_batch=10,
        delivery_concurrency=1,
    )
    submit(client, users["svc_token"], "down-fhir", 10)
    deliver_batch(rt, queued_attempts(sessions)[0])
    assert ehr.calls == 3  # the rest held: not sent
    with transaction(sessions, read_only=True) as s:
        conn = s.scalar(sa.select(Connection).where(Connection.name == "down-fhir"))
        assert conn.circuit_open_until is not None and conn.consecutive_failures == 3
        items = s.scalars(sa.select(ExceptionItem)).all()
        assert len(items) == 10 and {i.state for i in items} == {"retrying"}
        assert {i.retry_count for i in items} == {0}  # held ones spent no retry
        held = [i for i in items if i.detail.startswith("held:")]
        assert len(held) == 7
        assert all(i.next_retry_at >= conn.circuit_open_until for i in held)
        opened = s.scalar(
            sa.select(sa.func.count()).select_from(AuditPending).where(AuditPending.action == "circuit.open")
        ) + s.scalar(sa.text("SELECT count(*) FROM audit_events WHERE action = 'circuit.open'"))
        assert opened == 1


def test_a_result_the_reaper_beat_is_a_late_result_the_others_settle(client, users, sessions, sim_connection):
    sim_connection("late-fhir", customer="Late Health")
    rt = Runtime(sessions=sessions, worker_name="l", delivery_batch=3, lease_seconds=30)
    submit(client, users["svc_token"], "late-fhir", 3)
    with transaction(sessions) as s:
        conn = s.scalar(sa.select(Connection).where(Connection.name == "late-fhir"))
        batch = claim_batch(s, rt, conn, queued_attempts(sessions)[0])
    lost = batch[1].id
    with transaction(sessions) as s:  # the reaper saw this one's lease run out first
        s.execute(
            sa.update(Attempt)
            .where(Attempt.id == lost)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )
    assert reap_expired_leases(rt) == 1
    for n, c in enumerate(batch):
        c.outcome, c.contacted = delivered(n), True
    results = settle_batch(rt, conn.id, batch)
    assert results == {batch[0].id: "delivered", lost: "late", batch[2].id: "delivered"}
    with transaction(sessions, read_only=True) as s:
        late = s.get(Attempt, lost)
        assert late.outcome == "delivered" and late.detail.startswith("late result")
        item = s.scalar(sa.select(ExceptionItem).where(ExceptionItem.message_id == late.message_id))
        assert item.state == "resolved"  # the late result proved delivery


def test_a_lost_batch_becomes_unknown_outcome_item_by_item_never_resent(
    client, users, sessions, sim_connection
):
    sim_connection("lost-fhir", customer="Lost Health")
    ehr = ScriptedEhr(delivered)
    rt = Runtime(sessions=sessions, worker_name="x", adapter_factory=lambda conn: ehr, delivery_batch=4)
    submit(client, users["svc_token"], "lost-fhir", 4)
    ids = queued_attempts(sessions)
    with transaction(sessions) as s:  # a worker claimed the batch, then died before settling
        conn = s.scalar(sa.select(Connection).where(Connection.name == "lost-fhir"))
        claim_batch(s, rt, conn, ids[0])
        s.flush()
        s.execute(sa.update(Attempt).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    assert reap_expired_leases(rt) == 4
    for attempt_id in ids:
        assert deliver_batch(rt, attempt_id) == "skipped: attempt already claimed"
    assert ehr.calls == 0
    with transaction(sessions, read_only=True) as s:
        items = s.scalars(sa.select(ExceptionItem)).all()
        assert len(items) == 4 and {(i.category, i.state) for i in items} == {("unknown_outcome", "open")}
