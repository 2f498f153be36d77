"""SPEC 2, the patient-safety invariant, against the real simulator under faults:
every order is applied exactly once — none twice, none lost."""

import sqlalchemy as sa

from app.db.models import ExceptionItem, Message, User
from app.db.session import transaction
from app.services.exceptions import DecisionInput, decide
from tests.conftest import PASSWORD
from tests.samples import medication_request, message_body

ORDERS = 200
SYSTEM = "urn:recon:idempotency:svc"


def review_and_approve_everything_open(sessions, users) -> int:
    """Reviewers resubmit every open item; a different clinical lead approves each."""
    with transaction(sessions) as s:
        open_ids = s.scalars(sa.select(ExceptionItem.id).where(ExceptionItem.state == "open")).all()
    for exc_id in open_ids:
        with transaction(sessions) as s:
            decide(
                s,
                exc_id,
                s.get(User, users["rita"].id),
                DecisionInput("resubmit", reason="EHR dropped the connection; reconcile and resend"),
            )
        with transaction(sessions) as s:
            decide(
                s,
                exc_id,
                s.get(User, users["lena"].id),
                DecisionInput("approve", reason="reviewed", password=PASSWORD),
            )
    return len(open_ids)


def test_two_hundred_orders_applied_exactly_once_despite_dropped_responses(
    client, users, fhir_connection, sessions, run_worker, sim_control
):
    tenant = fhir_connection.tenant
    # 30% of creates are committed and then the connection drops; the EHR ignores If-None-Exist,
    # and 10% get 503 (retried automatically: provably not applied).
    sim_control.set_profile(
        tenant,
        rate_commit_then_drop=0.3,
        ignore_if_none_exist=True,
        rate_503=0.1,
        retry_after_seconds=0,
        seed="exactly-once",
    )
    auth = {"Authorization": f"Bearer {users['svc_token']}"}
    for n in range(ORDERS):
        r = client.post(
            "/api/v1/messages",
            json=message_body("mercy-epic", medication_request(n)),
            headers={**auth, "Idempotency-Key": f"order-{n:04d}"},
        )
        assert r.status_code == 202
    run_worker()

    with transaction(sessions) as s:
        unknown = s.scalar(
            sa.select(sa.func.count())
            .select_from(ExceptionItem)
            .where(ExceptionItem.category == "unknown_outcome", ExceptionItem.state == "open")
        )
    # The fault rate really bit: the seeded profile drops about a third of the creates (60 here).
    # No upper bound: on a loaded machine a create that outlasts the 5 s read timeout is also, and
    # rightly, an unknown outcome (CI once saw 91); what matters is the invariant checked below.
    assert unknown >= 30, unknown

    rounds = 0
    while review_and_approve_everything_open(sessions, users):
        run_worker()
        rounds += 1
        assert rounds < 5

    with transaction(sessions) as s:
        states = dict(
            s.execute(sa.select(ExceptionItem.state, sa.func.count()).group_by(ExceptionItem.state)).all()
        )
        delivered = s.scalar(
            sa.select(sa.func.count()).select_from(Message).where(Message.status == "delivered")
        )
    assert set(states) <= {"resolved"}, states
    assert delivered == ORDERS

    applied = sim_control.deliveries(tenant, "applied")
    expected = {f"{SYSTEM}|order-{n:04d}": 1 for n in range(ORDERS)}
    assert applied == expected
