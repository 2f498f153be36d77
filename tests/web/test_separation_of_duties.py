"""Issue 7, credentials and separation of duties: the admin-impersonation and second-account
scenarios fail at every step they used to pass, through the real routes. Also personal tokens
(shown once, expiring, last use, revoke), one-time enrollment links, and the approval-password
throttle (5 wrong in 15 minutes lock approvals until an admin clears it)."""

from __future__ import annotations

import html as html_lib
import re
from datetime import timedelta

import sqlalchemy as sa
from freezegun import freeze_time

from app.db.models import ApiToken, ExceptionItem, User
from app.db.session import transaction
from app.services.users import user_for_token
from tests.conftest import PASSWORD

ATTACKER_PW = "the admin's own choice"


def _link(response) -> str:
    html = html_lib.unescape(response.get_data(as_text=True))
    return re.search(r"<code class=\"token\" data-enrollment-link>([^<]+)</code>", html).group(1)


def _secret(link: str) -> str:
    return link.rsplit("/enroll/", 1)[1]


def _enroll(client, secret: str, password: str):
    page = client.get(f"/enroll/{secret}")
    if page.status_code != 200:
        return page
    csrf = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page.get_data(as_text=True))
    csrf = csrf or re.search(r'name="csrf_token" value="([^"]+)"', page.get_data(as_text=True))
    return client.post(
        f"/enroll/{secret}", data={"csrf_token": csrf.group(1), "password": password, "confirm": password}
    )


def _post_fresh(client, url: str, data: dict | None = None):
    from tests.conftest import csrf_token

    return client.post(url, data={"csrf_token": csrf_token(client, "/account/tokens"), **(data or {})})


def _state(sessions, exc_id):
    with transaction(sessions) as s:
        return s.get(ExceptionItem, exc_id).state


def _request_replay(auth, post, make, who: str, password: str = PASSWORD) -> int:
    exc_id = make()
    assert auth.login(who, password).status_code == 302
    response = post(f"/exceptions/{exc_id}/decide", {"action": "resubmit", "reason": "EHR fixed"})
    assert response.status_code == 303, response.get_data(as_text=True)
    return exc_id


def _approve(auth, post, exc_id: int, who: str, password: str):
    assert auth.login(who, password).status_code == 302
    return post(f"/approvals/{exc_id}", {"action": "approve", "password": password, "expected_version": "2"})


# --- the scenarios of the issue --------------------------------------------------------------------


def test_an_admin_cannot_mint_a_token_for_a_clinical_lead(login, post, users, sessions, audit_events):
    login("adam")
    response = post("/admin/tokens", {"user_id": str(users["lena"].id)})
    text = response.get_data(as_text=True)
    assert response.status_code == 403 and "service accounts only" in text
    assert "data-new-token" not in text
    with transaction(sessions) as s:
        assert s.scalars(sa.select(ApiToken).where(ApiToken.user_id == users["lena"].id)).all() == []
    assert audit_events(action="token.create", actor="adam") == []
    # the form offers service accounts only
    page = html_lib.unescape(login("adam").get("/admin/tokens").get_data(as_text=True))
    options = re.findall(r"<option[^>]*>([^<]+)</option>", page)
    assert options == ["svc"]
    # and a service account still gets one, shown once, expiring
    response = post("/admin/tokens", {"user_id": str(users["svc"].id), "days": "30"})
    assert response.status_code == 200
    token = re.search(r"data-new-token>([^<]+)<", response.get_data(as_text=True)).group(1)
    with transaction(sessions) as s:
        row = s.scalar(sa.select(ApiToken).order_by(ApiToken.id.desc()))
        assert user_for_token(s, token).username == "svc"
        assert timedelta(days=29, hours=23) < row.expires_at - row.created_at <= timedelta(days=30)


def test_a_second_lead_created_by_the_admin_cannot_approve_what_the_admin_requested(
    client, auth, login, post, make, users, sessions, audit_events
):
    login("adam")
    # 1. the admin creates a second clinical-lead account: no password, a one-time link instead
    response = post("/admin/users", {"username": "lead2", "role": "clinical_lead", "password": ATTACKER_PW})
    assert response.status_code == 200
    lead2_link = _link(response)
    with transaction(sessions) as s:
        lead2 = s.scalar(sa.select(User).where(User.username == "lead2"))
        assert lead2.password_hash is None and lead2.created_by_id == users["adam"].id
    assert auth.login("lead2", ATTACKER_PW).status_code == 401  # the form's password was not used
    # the grant is audited and listed on the admin page
    [grant] = audit_events(action="user.clinical_lead_grant", actor="adam")
    assert grant.actor == "adam" and grant.details["username"] == "lead2"
    page = login("adam").get("/admin/users").get_data(as_text=True)
    grants = re.search(r'<section class="panel" id="lead-grants">.*?</section>', page, re.S).group(0)
    assert "lead2" in grants and "adam" in grants
    # 2. the admin also creates a reviewer, and (holding both links) enrolls both accounts
    response = post("/admin/users", {"username": "rev2", "role": "reviewer"})
    rev2_link = _link(response)
    auth.logout()
    assert _enroll(client, _secret(lead2_link), ATTACKER_PW).status_code == 303
    assert _enroll(client, _secret(rev2_link), ATTACKER_PW).status_code == 303
    # 3. as rev2 the admin requests a replay; as lead2 the admin tries to approve it: refused
    exc_id = _request_replay(auth, post, make, "rev2", ATTACKER_PW)
    response = _approve(auth, post, exc_id, "lead2", ATTACKER_PW)
    assert response.status_code == 403
    assert "enrolled by the same administrator" in html_lib.unescape(response.get_data(as_text=True))
    assert _state(sessions, exc_id) == "pending_approval"
    assert audit_events(action="decision.approve") == []
    # a lead the admin did not enroll approves it: four-eyes holds, it is not a blanket refusal
    assert _approve(auth, post, exc_id, "leo", PASSWORD).status_code == 303
    assert _state(sessions, exc_id) != "pending_approval"


def test_a_lead_the_admin_enrolled_cannot_approve_a_replay_the_admin_edited(make, users, sessions):
    """The people facts at the service: a payload version created by the admin's account, and a
    request by an account the admin enrolled (reset link), both refuse the admin's lead."""
    from app.domain.errors import Forbidden
    from app.services.exceptions import DecisionInput, decide
    from app.services.users import complete_enrollment, issue_enrollment_link

    exc_id = make()
    with transaction(sessions) as s:
        adam = s.get(User, users["adam"].id)
        secret = issue_enrollment_link(s, s.get(User, users["leo"].id), actor=adam)  # a reset
    with transaction(sessions) as s:
        complete_enrollment(s, secret, ATTACKER_PW)  # whoever held the link: the admin
    with transaction(sessions) as s:
        decide(s, exc_id, s.get(User, users["rita"].id), DecisionInput(action="resubmit", reason="x"))
    with transaction(sessions) as s:
        leo = s.get(User, users["leo"].id)
        assert leo.enrolled_by_id == users["adam"].id
    # rita (CLI-made) requested; leo was enrolled by adam; adam is no party -> allowed in principle,
    # but an admin-edited payload makes adam a party: add one and the approval is refused
    from app.db.models import PayloadVersion

    with transaction(sessions) as s:
        item = s.get(ExceptionItem, exc_id)
        current = s.get(PayloadVersion, item.message.current_payload_id)
        s.add(
            PayloadVersion(
                message_id=item.message_id,
                version=current.version + 1,
                raw=current.raw,
                text=current.text,
                encoding=current.encoding,
                sha256=current.sha256,
                created_by_id=users["adam"].id,
                reason="edited",
                created_at=current.created_at,
            )
        )
    try:
        with transaction(sessions) as s:
            decide(
                s,
                exc_id,
                s.get(User, users["leo"].id),
                DecisionInput(action="approve", password=ATTACKER_PW, expected_version=2),
            )
        raise AssertionError("approved")
    except Forbidden as exc:
        assert exc.code == "enrolment_conflict"
    assert _state(sessions, exc_id) == "pending_approval"


def test_an_admin_resetting_a_leads_password_gets_a_link_not_a_password(
    client, auth, login, post, users, sessions, audit_events
):
    lena_client = client.application.test_client()
    from tests.conftest import AuthActions

    assert AuthActions(lena_client).login("lena").status_code == 302
    assert lena_client.get("/approvals").status_code == 200
    login("adam")
    response = post(f"/admin/users/{users['lena'].id}/reset", {"reason": "lost her password"})
    assert response.status_code == 200 and response.headers["Cache-Control"] == "no-store"
    secret = _secret(_link(response))
    assert PASSWORD not in response.get_data(as_text=True)
    [event] = audit_events(action="user.password_reset")
    assert event.actor == "adam" and event.subject_id == str(users["lena"].id)
    assert event.reason == "lost her password"
    # the old password and every open session of lena end
    assert lena_client.get("/approvals").status_code == 302
    auth.logout()
    assert auth.login("lena").status_code == 401
    # the link is lena's: she sets a new password; the link then is spent
    assert _enroll(client, secret, "lena's new secret").status_code == 303
    assert auth.login("lena", "lena's new secret").status_code == 302
    auth.logout()
    assert _enroll(client, secret, "another one!").status_code == 404


def test_admins_cannot_reset_service_accounts_or_themselves(login, post, users):
    login("adam")
    reason = {"reason": "test"}
    svc = post(f"/admin/users/{users['svc'].id}/reset", reason)
    assert svc.status_code == 422 and "service accounts have no password" in svc.get_data(as_text=True)
    assert post(f"/admin/users/{users['adam'].id}/reset", reason).status_code == 409


def test_a_role_change_to_clinical_lead_is_audited_and_listed(login, post, users, audit_events):
    login("adam")
    assert post(f"/admin/users/{users['rita'].id}/role", {"role": "clinical_lead"}).status_code == 303
    [grant] = audit_events(action="user.clinical_lead_grant", actor="adam")
    assert grant.details == {"username": "rita", "previous_role": "reviewer"}
    [change] = audit_events(action="user.role_change")
    assert (change.from_state, change.to_state) == ("reviewer", "clinical_lead")
    page = login("adam").get("/admin/users").get_data(as_text=True)
    assert "rita" in re.search(r'id="lead-grants">.*?</section>', page, re.S).group(0)
    assert post(f"/admin/users/{users['svc'].id}/role", {"role": "clinical_lead"}).status_code == 422


# --- personal tokens -------------------------------------------------------------------------------


def test_personal_tokens_are_shown_once_expire_record_last_use_and_revoke(
    client, login, post, users, sessions, audit_events
):
    with freeze_time("2026-03-01 09:00:00") as clock:
        login("lena")
        response = post("/account/tokens", {"days": "366"})
        assert response.status_code == 422
        response = post("/account/tokens", {"days": "30"})
        assert response.status_code == 200 and response.headers["Cache-Control"] == "no-store"
        token = re.search(r"data-new-token>([^<]+)<", response.get_data(as_text=True)).group(1)
        assert token not in client.get("/account/tokens").get_data(as_text=True)  # shown once
        [event] = audit_events(action="token.create", actor="lena")
        assert event.details["owner"] == "lena"
        headers = {"Authorization": f"Bearer {token}"}
        clock.tick(60 * 5)
        assert client.get("/api/v1/exceptions", headers=headers).status_code == 200
        with transaction(sessions) as s:
            row = s.scalar(sa.select(ApiToken).where(ApiToken.user_id == users["lena"].id))
            assert row.last_used_at is not None and row.last_used_at.isoformat().startswith(
                "2026-03-01T09:05"
            )
            assert row.expires_at.isoformat().startswith("2026-03-31T09:00")
        assert "data-last-used>" in client.get("/account/tokens").get_data(as_text=True)
        # expired after 30 days: 401 with a clear JSON error
        clock.move_to("2026-03-31 09:00:01")
        response = client.get("/api/v1/exceptions", headers=headers)
        assert response.status_code == 401
        assert response.get_json()["error"]["code"] == "token_expired"
        assert "expired" in response.get_json()["error"]["message"]
        # the default is 90 days; revoke works and is audited
        login("lena")  # a new login: the CSRF token of the first one is a month old
        response = _post_fresh(client, "/account/tokens")
        token = re.search(r"data-new-token>([^<]+)<", response.get_data(as_text=True)).group(1)
        with transaction(sessions) as s:
            row = s.scalar(sa.select(ApiToken).order_by(ApiToken.id.desc()))
            assert row.expires_at - row.created_at == timedelta(days=90)
            row_id = row.id
        assert (
            client.get("/api/v1/exceptions", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        )
        assert _post_fresh(client, f"/account/tokens/{row_id}/revoke").status_code == 303
        assert (
            client.get("/api/v1/exceptions", headers={"Authorization": f"Bearer {token}"}).status_code == 401
        )
        assert audit_events(action="token.revoke", actor="lena")
        # someone else's token cannot be revoked from My tokens
        login("rita")
        assert _post_fresh(client, f"/account/tokens/{row_id}/revoke").status_code == 404


# --- enrollment links ------------------------------------------------------------------------------


def test_an_enrollment_link_works_once_and_expires(client, auth, login, post, sessions, audit_events):
    with freeze_time("2026-03-01 09:00:00") as clock:
        login("adam")
        first = _secret(_link(post("/admin/users", {"username": "nina", "role": "reviewer"})))
        second = _secret(_link(post("/admin/users", {"username": "noah", "role": "reviewer"})))
        auth.logout()
        assert client.get("/enroll/not-a-link").status_code == 404
        short = _enroll(client, first, "short")
        assert short.status_code == 422  # too short: the link is not spent
        assert _enroll(client, first, "nina's own password").status_code == 303
        assert _enroll(client, first, "nina's own password").status_code == 404  # once
        assert auth.login("nina", "nina's own password").status_code == 302
        auth.logout()
        [event] = audit_events(action="user.enrolled")
        assert event.actor == "nina"
        clock.tick(72 * 3600 + 1)  # default lifetime 72 h
        assert client.get(f"/enroll/{second}").status_code == 404
        assert _enroll(client, second, "noah's own password").status_code == 404
        with transaction(sessions) as s:
            assert s.scalar(sa.select(User).where(User.username == "noah")).password_hash is None


# --- approval password throttle --------------------------------------------------------------------


def test_five_wrong_approval_passwords_lock_approvals_until_an_admin_clears_it(
    auth, login, post, make, users, sessions, audit_events
):
    with freeze_time("2026-03-01 09:00:00") as clock:
        exc_id = _request_replay(auth, post, make, "rita")
        assert auth.login("lena").status_code == 302
        for attempt in range(5):
            response = post(
                f"/approvals/{exc_id}", {"action": "approve", "password": "wrong", "expected_version": "2"}
            )
            assert response.status_code == 403, attempt
            clock.tick(60)
        failures = audit_events(action="approval.password_failed")
        assert len(failures) == 5 and {e.actor for e in failures} == {"lena"}
        assert [e.details["failures_in_window"] for e in failures] == [1, 2, 3, 4, 5]
        [lock] = audit_events(action="approval.locked")
        assert lock.subject_id == str(users["lena"].id)
        # the right password no longer approves: 403 with a clear message
        response = post(
            f"/approvals/{exc_id}", {"action": "approve", "password": PASSWORD, "expected_version": "2"}
        )
        assert response.status_code == 403
        assert "approvals are locked" in html_lib.unescape(response.get_data(as_text=True))
        assert _state(sessions, exc_id) == "pending_approval"
        # the admin sees the lock and clears it (audited)
        login("adam")
        page = login("adam").get("/admin/users").get_data(as_text=True)
        assert "data-approval-locked" in page and "Clear approval lock" in page
        assert post(f"/admin/users/{users['lena'].id}/approval-lock").status_code == 303
        [cleared] = audit_events(action="approval.lock_cleared")
        assert cleared.actor == "adam"
        assert post(f"/admin/users/{users['lena'].id}/approval-lock").status_code == 409
        # one more wrong password after the clear counts from the clear, not the old five
        assert _approve(auth, post, exc_id, "lena", PASSWORD).status_code == 303
    assert _state(sessions, exc_id) != "pending_approval"


def test_wrong_passwords_spread_over_more_than_15_minutes_do_not_lock(
    auth, post, make, sessions, audit_events
):
    with freeze_time("2026-03-01 09:00:00") as clock:
        exc_id = _request_replay(auth, post, make, "rita")
        for _ in range(6):
            assert auth.login("lena").status_code == 302
            response = post(
                f"/approvals/{exc_id}", {"action": "approve", "password": "wrong", "expected_version": "2"}
            )
            assert response.status_code == 403
            clock.tick(4 * 60)  # at most 4 failures in any 15 minutes
        assert audit_events(action="approval.locked") == []
        assert len(audit_events(action="approval.password_failed")) == 6
        assert _approve(auth, post, exc_id, "lena", PASSWORD).status_code == 303


def test_the_api_counts_wrong_approval_passwords_too(client, users, make, sessions, audit_events, auth, post):
    exc_id = _request_replay(auth, post, make, "rita")
    with transaction(sessions) as s:
        from app.services.users import create_token

        token = create_token(s, s.get(User, users["lena"].id))
    headers = {"Authorization": f"Bearer {token}"}
    for _ in range(5):
        response = client.post(
            f"/api/v1/exceptions/{exc_id}/decisions",
            json={"action": "approve", "password": "wrong"},
            headers=headers,
        )
        assert response.status_code == 403
    response = client.post(
        f"/api/v1/exceptions/{exc_id}/decisions",
        json={"action": "approve", "password": PASSWORD},
        headers=headers,
    )
    assert response.status_code == 403 and response.get_json()["error"]["code"] == "approval_locked"
    assert len(audit_events(action="approval.password_failed")) == 5


# --- the CLI (operator with the database credential) keeps working for any user -------------------


def test_the_cli_still_creates_users_and_tokens_for_anyone_audited_as_the_cli(
    monkeypatch, database_url, sessions, audit_events
):
    from click.testing import CliRunner

    from app.cli import main

    monkeypatch.setenv("DATABASE_URL", database_url)
    runner = CliRunner()
    r = runner.invoke(
        main,
        ["users", "create", "boot", "--role", "clinical_lead", "--password-stdin"],
        input="a long password\n",
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["tokens", "create", "boot", "--expires-days", "7"])
    assert r.exit_code == 0 and r.output.strip().startswith("rcn_")
    token = r.output.strip()
    assert runner.invoke(main, ["tokens", "create", "boot", "--expires-days", "400"]).exit_code == 2
    with transaction(sessions) as s:
        assert user_for_token(s, token).username == "boot"
        row = s.scalar(sa.select(ApiToken).order_by(ApiToken.id.desc()))
        assert row.expires_at - row.created_at == timedelta(days=7) and row.created_by_id is None
        assert s.scalar(sa.select(User).where(User.username == "boot")).created_by_id is None
    [created] = audit_events(action="token.create", subject_id=str(row.user_id))
    assert created.actor == "system:cli" and created.details["owner"] == "boot"
    [grant] = audit_events(action="user.clinical_lead_grant", subject_id=str(row.user_id))
    assert grant.actor == "system:cli"


def test_accounts_whose_passwords_one_admin_reset_cannot_form_both_halves(make, users, sessions):
    """An admin resets a reviewer's and a lead's passwords and uses both links: the requester's
    enrolled_by and the approver's are the same admin, so the approval is refused; a lead whose
    password is their own still approves."""
    from app.domain.errors import Forbidden
    from app.services.exceptions import DecisionInput, decide
    from app.services.users import complete_enrollment, issue_enrollment_link

    exc_id = make()
    for name in ("rita", "leo"):
        with transaction(sessions) as s:
            secret = issue_enrollment_link(
                s, s.get(User, users[name].id), actor=s.get(User, users["adam"].id)
            )
        with transaction(sessions) as s:
            complete_enrollment(s, secret, ATTACKER_PW)
    with transaction(sessions) as s:
        decide(s, exc_id, s.get(User, users["rita"].id), DecisionInput(action="resubmit", reason="x"))
    try:
        with transaction(sessions) as s:
            decide(
                s,
                exc_id,
                s.get(User, users["leo"].id),
                DecisionInput(action="approve", password=ATTACKER_PW, expected_version=2),
            )
        raise AssertionError("approved")
    except Forbidden as exc:
        assert exc.code == "enrolment_conflict" and "same administrator" in exc.message
    with transaction(sessions) as s:
        decide(
            s,
            exc_id,
            s.get(User, users["lena"].id),
            DecisionInput(action="approve", password=PASSWORD, expected_version=2),
        )
    assert _state(sessions, exc_id) != "pending_approval"
