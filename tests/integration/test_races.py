"""SPEC 3.1: two people deciding at once — exactly one wins, the other gets 409, one audit event."""

import threading

import httpx
import sqlalchemy as sa

from app.db.models import AuditEvent, Decision
from app.db.session import transaction
from tests.factories import make_exception


def test_two_users_deciding_at_once_one_wins_the_other_gets_409(live_server, users, sessions, make_tokens):
    tokens = make_tokens("rita", "ravi")
    for round_ in range(5):
        exc_id = make_exception(sessions, users["svc"], key=f"race-{round_}")
        barrier = threading.Barrier(2)
        results = {}

        def act(name, body, barrier=barrier, results=results, exc_id=exc_id):
            barrier.wait()
            results[name] = httpx.post(
                f"{live_server}/api/v1/exceptions/{exc_id}/decisions",
                json=body,
                headers={"Authorization": f"Bearer {tokens[name]}"},
                timeout=30,
            )

        threads = [
            threading.Thread(
                target=act, args=("rita", {"action": "resubmit", "reason": "EHR fixed its mapping"})
            ),
            threading.Thread(
                target=act,
                args=(
                    "ravi",
                    {"action": "discard", "reason_code": "duplicate", "reason": "sent twice by the product"},
                ),
            ),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = sorted(r.status_code for r in results.values())
        assert codes == [201, 409], {k: (v.status_code, v.text) for k, v in results.items()}
        loser = next(r for r in results.values() if r.status_code == 409)
        assert loser.json()["error"]["code"] == "state_conflict"
        assert "reload" in loser.json()["error"]["message"] or "cannot" in loser.json()["error"]["message"]
        with transaction(sessions) as s:
            decisions = s.scalars(sa.select(Decision).where(Decision.exception_id == exc_id)).all()
            events = s.scalars(
                sa.select(AuditEvent).where(
                    AuditEvent.subject_type == "exception",
                    AuditEvent.subject_id == str(exc_id),
                    AuditEvent.action.like("decision.%"),
                )
            ).all()
            assert len(decisions) == 1 and len(events) == 1
            assert events[0].details["decision_id"] == decisions[0].id


def test_stale_expected_version_is_a_conflict(live_server, users, sessions, make_tokens):
    tokens = make_tokens("rita")
    exc_id = make_exception(sessions, users["svc"], key="stale-1")
    url = f"{live_server}/api/v1/exceptions/{exc_id}/decisions"
    auth = {"Authorization": f"Bearer {tokens['rita']}"}
    assert (
        httpx.post(
            url, json={"action": "comment", "reason": "looking", "expected_version": 1}, headers=auth
        ).status_code
        == 201
    )
    r = httpx.post(url, json={"action": "escalate", "reason": "x", "expected_version": 1}, headers=auth)
    assert r.status_code == 409 and r.json()["error"]["code"] == "version_conflict"
