"""SPEC 5 Queues: filters, SLA order, keyset pagination, live SLA countdown, masking, bulk actions."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa
from freezegun import freeze_time

from app.db.models import ExceptionItem, Message
from app.db.session import transaction
from app.services import queries
from tests.factories import make_exception, setup_connection

ROW = re.compile(r'<tr id="ex-(\d+)"')


def row_ids(html: str) -> list[int]:
    return [int(i) for i in ROW.findall(html)]


def next_link(html: str) -> str | None:
    match = re.search(r'<a rel="next" href="([^"]+)"', html)
    return match.group(1).replace("&amp;", "&") if match else None


@pytest.fixture
def thirty(sessions, users, connection):
    """30 open exceptions on two connections; due times strictly increasing with creation."""
    setup_connection(sessions, "Valley Clinic", "valley-cerner")
    ids = []
    start = datetime(2024, 5, 1, 12, 0, 0)
    for n in range(30):
        with freeze_time(start + timedelta(seconds=n)):
            ids.append(
                make_exception(
                    sessions,
                    users["svc"],
                    connection="mercy-epic" if n % 3 else "valley-cerner",
                    category="ehr_rejected" if n % 2 else "transport",
                    key=f"order-{n:03d}",
                )
            )
    return ids


@freeze_time("2024-05-01 12:05:00")
def test_keyset_pages_cover_every_item_once_in_sla_order(login, thirty, sessions):
    client = login("rita")
    seen, pages, url = [], 0, "/queues/all?limit=12"
    while url is not None:
        html = client.get(url).get_data(as_text=True)
        pages += 1
        assert len(row_ids(html)) == (12 if pages < 3 else 6)
        seen += row_ids(html)
        url = next_link(html)
        assert url is None or ("cursor=" in url and "limit=12" in url)
    assert pages == 3
    assert seen == thirty  # all 30, none twice, ordered by SLA due time
    with transaction(sessions) as s:
        dues = [s.get(ExceptionItem, i).sla_due_at for i in seen]
    assert dues == sorted(dues)


@freeze_time("2024-05-01 12:05:00")
def test_a_page_shows_the_total_count_and_a_next_page_link(login, thirty):
    client = login("rita")
    first = client.get("/queues?limit=20").get_data(as_text=True)
    assert len(row_ids(first)) == 20 and re.search(r"<strong data-total>30</strong>", first)
    assert next_link(first) is not None
    single = client.get("/queues").get_data(as_text=True)  # default page size holds all 30
    assert len(row_ids(single)) == 30 and next_link(single) is None


def test_list_exceptions_pages_with_an_opaque_cursor(sessions, thirty):
    with transaction(sessions) as s:
        first, cursor = queries.list_exceptions(s, limit=12)
        second, cursor2 = queries.list_exceptions(s, limit=12, cursor=cursor)
        third, cursor3 = queries.list_exceptions(s, limit=12, cursor=cursor2)
        summary = queries.exception_summary(first[0])
    assert [i.id for i in first + second + third] == thirty
    assert cursor3 is None
    assert set(summary) >= {
        "id",
        "state",
        "category",
        "connection",
        "message_type",
        "idempotency_key",
        "sla_due_at",
        "created_at",
    }
    assert summary["sla_due_at"].endswith("Z") and summary["connection"] in ("mercy-epic", "valley-cerner")


def test_a_forged_cursor_is_a_422_not_a_500(login, thirty):
    response = login("rita").get("/queues/all?cursor=not-a-cursor")
    assert response.status_code == 422
    assert "invalid cursor" in response.get_data(as_text=True)


@freeze_time("2024-05-01 12:05:00")
@pytest.mark.parametrize(
    "query, expected",
    [
        ("connection=valley-cerner", lambda n: n % 3 == 0),
        ("customer=Mercy+Health", lambda n: n % 3 != 0),
        ("category=transport", lambda n: n % 2 == 0),
        ("q=order-007", lambda n: n == 7),
        ("connection=valley-cerner&category=ehr_rejected", lambda n: n % 3 == 0 and n % 2 == 1),
    ],
)
def test_filters_narrow_the_queue(login, thirty, query, expected):
    html = login("rita").get(f"/queues/all?{query}").get_data(as_text=True)
    assert row_ids(html) == [i for n, i in enumerate(thirty) if expected(n)]


def test_category_queue_holds_only_its_category(login, thirty):
    html = login("rita").get("/queues/transport").get_data(as_text=True)
    assert row_ids(html) == [i for n, i in enumerate(thirty) if n % 2 == 0]


def test_free_text_finds_by_control_id_and_exception_id(login, make, sessions):
    target = make(key="find-me-please")
    make()
    with transaction(sessions) as s:
        control_id = s.get(ExceptionItem, target).message.control_id
    client = login("rita")
    assert row_ids(client.get(f"/queues/all?q={control_id}").get_data(as_text=True)) == [target]
    assert row_ids(client.get(f"/queues/all?q={target}").get_data(as_text=True)) == [target]
    assert row_ids(client.get(f"/queues/all?q=%23{target}").get_data(as_text=True)) == [target]
    assert row_ids(client.get("/queues/all?q=find-me").get_data(as_text=True)) == [target]


def test_assignee_and_state_filters(login, make, post):
    a, b = make(), make()
    client = login("rita")
    assert post(f"/exceptions/{a}/decide", {"action": "claim"}).status_code == 303
    assert row_ids(client.get("/queues/all?assignee=rita").get_data(as_text=True)) == [a]
    assert row_ids(client.get("/queues/all?assignee=-").get_data(as_text=True)) == [b]
    post(f"/exceptions/{b}/decide", {"action": "escalate", "reason": "needs a lead"})
    assert row_ids(client.get("/queues/all?state=escalated").get_data(as_text=True)) == [b]
    assert row_ids(client.get("/queues/escalated").get_data(as_text=True)) == [b]


def test_an_unknown_filter_value_is_a_form_message_with_422(login, make):
    make()
    response = login("rita").get("/queues/all?state=bogus")
    assert response.status_code == 422
    assert "Not a valid choice" in response.get_data(as_text=True)


def test_unknown_queue_is_404(login):
    assert login("rita").get("/queues/nonsense").status_code == 404


def test_htmx_request_gets_only_the_rows_fragment(login, make):
    make()
    client = login("rita")
    full = client.get("/queues/all").get_data(as_text=True)
    fragment = client.get("/queues/all", headers={"HX-Request": "true"}).get_data(as_text=True)
    assert "<html" in full and 'id="queue-results"' in full
    assert "<html" not in fragment
    assert 'id="queue-results"' in fragment and row_ids(fragment) == row_ids(full)


def test_every_hx_get_link_also_has_an_href(login, thirty):
    html = login("rita").get("/queues/all").get_data(as_text=True)
    for tag in re.findall(r"<a [^>]*hx-get=[^>]*>", html):
        assert 'href="' in tag, tag


# --- SLA countdown ---------------------------------------------------------------------------------


def sla_of(html: str, exc_id: int) -> tuple[str, str]:
    row = re.search(rf'<tr id="ex-{exc_id}".*?</tr>', html, re.S).group(0)
    span = re.search(r'<span class="sla sla-(\w+)" data-due="([^"]+)"', row)
    remaining = re.search(r'<span class="sla-remaining">([^<]+)</span>', row).group(1)
    return span.group(1), remaining


@pytest.mark.parametrize(
    "now, status, remaining",
    [
        ("2024-05-01 12:05:00", "on_track", "25m 00s left"),
        ("2024-05-01 12:25:00", "at_risk", "5m 00s left"),
        ("2024-05-01 12:31:30", "breached", "breached 1m 30s ago"),
    ],
)
def test_sla_status_is_rendered_on_track_at_risk_and_breached(login, make, now, status, remaining):
    with freeze_time("2024-05-01 12:00:00"):
        exc_id = make()  # MedicationRequest: high clinical risk, 30 minute window
    with freeze_time(now):
        client = login("rita")  # at `now`: a session idle since 12:00 would have timed out
        html = client.get("/queues/all").get_data(as_text=True)
        assert sla_of(html, exc_id) == (status, remaining)
        assert 'data-due="2024-05-01T12:30:00.000000Z"' in html
        filtered = client.get(f"/queues/all?sla_status={status}").get_data(as_text=True)
        assert row_ids(filtered) == [exc_id]
        for other in {"on_track", "at_risk", "breached"} - {status}:
            assert row_ids(client.get(f"/queues/all?sla_status={other}").get_data(as_text=True)) == []


# --- masking ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, masked", [("rita", True), ("audrey", True), ("adam", True), ("lena", False)])
def test_patient_identifiers_are_masked_in_lists_for_reviewers_auditors_and_admins(login, make, name, masked):
    make(patient="Patient/98765432")
    html = login(name).get("/queues/all").get_data(as_text=True)
    if masked:
        assert "98765432" not in html
        assert "Patient/******32" in html
    else:
        assert "Patient/98765432" in html


# --- bulk actions ----------------------------------------------------------------------------------


def test_bulk_action_confirms_the_exact_count_then_applies_each_item(
    login, make, post, sessions, audit_events
):
    ids = [make() for _ in range(4)]
    login("rita")
    with transaction(sessions) as s:
        versions = {i: s.get(ExceptionItem, i).version for i in ids}
    chosen = [f"{i}:{versions[i]}" for i in ids[:3]]
    confirm = post("/queues/bulk", {"ids": chosen, "action": "escalate", "reason": "night shift"})
    html = confirm.get_data(as_text=True)
    assert confirm.status_code == 200
    assert re.search(r"<strong data-bulk-total>3</strong>", html)
    assert html.count('name="ids"') == 3
    assert _states(sessions, ids) == ["open"] * 4  # confirming applies nothing yet

    done = post(
        "/queues/bulk", {"ids": chosen, "action": "escalate", "reason": "night shift", "confirm": "1"}
    ).get_data(as_text=True)
    assert re.search(r"<strong data-bulk-applied>3</strong> of 3 applied", done)
    assert _states(sessions, ids) == ["escalated", "escalated", "escalated", "open"]
    assert len(audit_events(action="decision.escalate")) == 3


def test_bulk_action_reports_conflicts_per_item(login, make, post, sessions):
    a, b = make(), make()
    login("rita")
    # b changes after the list was loaded (version 1 -> 2)
    post(f"/exceptions/{b}/decide", {"action": "comment", "reason": "looking"})
    done = post(
        "/queues/bulk",
        {"ids": [f"{a}:1", f"{b}:1"], "action": "discard", "reason_code": "duplicate", "confirm": "1"},
    ).get_data(as_text=True)
    assert f'data-result="{a}:200"' in done and f'data-result="{b}:409"' in done
    assert "changed since you loaded it" in done
    assert _states(sessions, [a, b]) == ["discarded", "open"]


def test_bulk_without_selection_is_a_422_form_message(login, post):
    login("rita")
    response = post("/queues/bulk", {"action": "escalate", "reason": "x"})
    assert response.status_code == 422
    assert "select at least one exception" in response.get_data(as_text=True)


def test_bulk_discard_without_reason_code_is_refused_per_item(login, make, post, sessions):
    a = make()
    login("rita")
    done = post("/queues/bulk", {"ids": [f"{a}:1"], "action": "discard", "confirm": "1"}).get_data(
        as_text=True
    )
    assert f'data-result="{a}:422"' in done and "discard needs a reason code" in done
    assert _states(sessions, [a]) == ["open"]


def _states(sessions, ids):
    with transaction(sessions) as s:
        rows = dict(
            s.execute(sa.select(ExceptionItem.id, ExceptionItem.state).where(ExceptionItem.id.in_(ids))).all()
        )
    return [rows[i] for i in ids]


def test_queue_listing_is_a_fixed_number_of_queries(login, sessions, users, connection, app):
    """No N+1: the page costs the same number of statements for 3 rows as for 20."""
    client = login("rita")

    def statements_for_page() -> int:
        engine = app.extensions["recon_sessions"].kw["bind"]
        count = 0

        def on_execute(*_args):
            nonlocal count
            count += 1

        sa.event.listen(engine, "before_cursor_execute", on_execute)
        try:
            assert client.get("/queues/all").status_code == 200
        finally:
            sa.event.remove(engine, "before_cursor_execute", on_execute)
        return count

    for _ in range(3):
        make_exception(sessions, users["svc"])
    few = statements_for_page()
    for _ in range(17):
        make_exception(sessions, users["svc"])
    assert statements_for_page() == few
    with transaction(sessions) as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(Message)) == 20


def test_a_category_queue_page_is_read_off_the_queue_index_in_order(sessions, make, is_postgres):
    """ix_exceptions_queue (state, category, sla_due_at, id) serves filter, order and cursor."""
    make()
    engine = sessions.kw["bind"]
    captured = []

    def capture(_conn, _cursor, statement, parameters, _context, _many):
        if "FROM exceptions" in statement and "ORDER BY" in statement:
            captured.append((statement, parameters))

    sa.event.listen(engine, "before_cursor_execute", capture)
    try:
        with transaction(sessions) as s:
            queries.list_exceptions(
                s,
                state="open",
                category="ehr_rejected",
                cursor=queries.encode_cursor(datetime(2024, 1, 1), 1),
            )
    finally:
        sa.event.remove(engine, "before_cursor_execute", capture)
    [(statement, parameters)] = captured
    with engine.connect() as conn:
        if is_postgres:
            # A tiny table would be read sequentially; forbid that to see whether the index serves.
            conn.exec_driver_sql("SET enable_seqscan = off")
            plan = [row[0] for row in conn.exec_driver_sql("EXPLAIN " + statement, parameters)]
            assert any("ix_exceptions_queue" in step for step in plan), plan
            assert not any(step.lstrip(" ->").startswith("Sort") for step in plan), plan
        else:
            plan = [row[-1] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters)]
            assert any(
                "ix_exceptions_queue (state=? AND category=? AND sla_due_at>?)" in step for step in plan
            ), plan
            assert not any("TEMP B-TREE" in step for step in plan), plan


def test_search_finds_exceptions_by_patient_reference_mrn_and_order_number(
    login, make, sessions, users, make_tokens, client
):
    from tests.factories import HL7_CONTENT_TYPE, HL7_ORU

    fhir = make(patient="Patient/123456", key="ident-fhir")
    make(patient="Patient/999", key="ident-other")
    hl7 = make(
        content_type=HL7_CONTENT_TYPE,
        message_type="ORU^R01",
        payload=HL7_ORU.replace("123456^^^MRN", "MRN-00042^^^MRN").replace(
            "OBR|1|ORD1|", "OBR|1|ORD1|FIL-88"
        ),
        key="ident-hl7",
    )
    tokens = make_tokens("rita")
    login("rita")
    assert row_ids(client.get("/queues/all?q=Patient/123456").get_data(as_text=True)) == [fhir]
    assert row_ids(client.get("/queues/all?q=123456").get_data(as_text=True)) == [fhir]
    assert row_ids(client.get("/queues/all?q=MRN-00042").get_data(as_text=True)) == [hl7]
    assert row_ids(client.get("/queues/all?q=ORD1").get_data(as_text=True)) == [hl7]  # placer order
    api = client.get(
        "/api/v1/exceptions?q=MRN-00042", headers={"Authorization": f"Bearer {tokens['rita']}"}
    ).json
    assert [item["id"] for item in api["items"]] == [hl7]


# --- issue 8: queues that fit and stay live -------------------------------------------------------


def test_a_category_queue_holds_every_active_state_of_its_category_with_a_state_filter(login, make, post):
    opened, escalated, pending, resolved = (make(category="transport") for _ in range(4))
    other = make(category="auth")
    client = login("rita")
    assert (
        post(f"/exceptions/{escalated}/decide", {"action": "escalate", "reason": "lead"}).status_code == 303
    )
    assert post(f"/exceptions/{pending}/decide", {"action": "resubmit", "reason": "fixed"}).status_code == 303
    assert (
        post(f"/exceptions/{resolved}/decide", {"action": "discard", "reason_code": "duplicate"}).status_code
        == 303
    )
    page = client.get("/queues/transport").get_data(as_text=True)
    assert sorted(row_ids(page)) == sorted([opened, escalated, pending])  # no closed one, no other category
    assert other not in row_ids(page)
    assert re.search(r"<strong data-total>3</strong>", page)
    assert row_ids(client.get("/queues/transport?state=escalated").get_data(as_text=True)) == [escalated]
    assert row_ids(client.get("/queues/transport?state=open").get_data(as_text=True)) == [opened]
    assert row_ids(client.get("/queues/transport?state=closed").get_data(as_text=True)) == [resolved]


def test_a_search_says_how_many_closed_items_match_outside_the_state_filter(login, make, post, sessions):
    kept, closed = make(key="ward-7-order-1"), make(key="ward-7-order-2")
    client = login("rita")
    post(f"/exceptions/{closed}/decide", {"action": "discard", "reason_code": "duplicate"})
    page = client.get("/queues/all?q=ward-7").get_data(as_text=True)
    assert row_ids(page) == [kept]
    hint = re.search(r"<p class=\"callout\" data-closed-matches>(.*?)</p>", page, re.S).group(1)
    assert hint.split()[:4] == ["1", "closed", "item", "matches"]
    link = re.search(r'href="([^"]+)"', hint).group(1).replace("&amp;", "&")
    assert "state=closed" in link and "q=ward-7" in link
    assert row_ids(client.get(link).get_data(as_text=True)) == [closed]
    # Without a search there is no hint (that would count the history), nor when nothing closed matches.
    assert "data-closed-matches" not in client.get("/queues/all").get_data(as_text=True)
    assert "data-closed-matches" not in client.get(f"/queues/all?q=%23{kept}").get_data(as_text=True)


REASON = "EHR create (HTTP 422): Patient/98765432 'Jane Roe' unknown, MRN-AB12345 DOE^JANE in PID-5"


@pytest.mark.parametrize("name", ["rita", "audrey", "adam"])
def test_the_failure_reason_column_masks_identifiers_for_roles_that_see_masked_lists(login, make, name):
    make(patient="Patient/98765432", detail=REASON)
    html = login(name).get("/queues/all").get_data(as_text=True)
    reason = re.search(r"<td class=\"c-reason\"[^>]*>(.*?)</td>", html, re.S).group(1)
    for secret in ("98765432", "Jane Roe", "AB12345", "DOE^JANE", "JANE"):
        assert secret not in html, secret
    assert "HTTP 422" in reason and "Patient/******32" in reason and "PID-5" in reason


def test_a_clinical_lead_sees_the_failure_reason_in_full(login, make):
    make(patient="Patient/98765432", detail=REASON)
    html = login("lena").get("/queues/all").get_data(as_text=True)
    assert "Patient/98765432 &#39;Jane Roe&#39; unknown" in html


def test_the_change_check_is_204_until_an_exception_appears_or_changes(login, make, post):
    make()
    client = login("rita")
    page = client.get("/queues/all").get_data(as_text=True)
    token = re.search(r'data-since="([^"]+)"', page).group(1)
    quiet = client.get(f"/queues/changes?since={token}&counts=1&queue=all")
    assert quiet.status_code == 204 and quiet.get_data() == b""

    fresh = make()
    changed = client.get(f"/queues/changes?since={token}&counts=1&queue=all")
    assert changed.status_code == 200
    event = json.loads(changed.headers["HX-Trigger"])["recon:changed"]
    assert event["rows"] is True and event["token"] != token
    body = changed.get_data(as_text=True)
    assert 'id="queue-counts" hx-swap-oob="true"' in body
    assert re.search(r'data-count="all">2\b', body)
    assert client.get(f"/queues/changes?since={event['token']}").status_code == 204

    # A decision on an existing row (no new id) moves the token too.
    post(f"/exceptions/{fresh}/decide", {"action": "comment", "reason": "looking"})
    again = client.get(f"/queues/changes?since={event['token']}")
    assert again.status_code == 200 and json.loads(again.headers["HX-Trigger"])["recon:changed"]["rows"]


def test_an_update_committed_late_with_an_older_timestamp_still_moves_the_token(sessions, make):
    first, second = make(), make()
    with transaction(sessions) as s:
        s.execute(
            sa.update(ExceptionItem).where(ExceptionItem.id == second).values(updated_at=datetime(2030, 1, 1))
        )
        before = queries.change_token(s)
    with transaction(sessions) as s:
        # Written with a clock reading from before the newest row's: max(updated_at) does not move.
        s.execute(
            sa.update(ExceptionItem)
            .where(ExceptionItem.id == first)
            .values(version=ExceptionItem.version + 1, updated_at=datetime(2029, 12, 31, 23, 59, 50))
        )
    with transaction(sessions) as s:
        assert queries.change_token(s).split(".")[0] != before.split(".")[0]


def test_the_bulk_form_carries_the_queue_url_with_its_filters_back(login, make, post):
    a = make()
    login("rita")
    back = "/queues/all?connection=mercy-epic&state=open"
    done = post(
        "/queues/bulk", {"ids": [f"{a}:1"], "action": "claim", "confirm": "1", "back": back}
    ).get_data(as_text=True)
    assert 'href="/queues/all?connection=mercy-epic&amp;state=open">Back to the queue' in done


# --- CSV export of the current view ----------------------------------------------------------------


def _csv(response) -> list[list[str]]:
    import csv
    import io

    return list(csv.reader(io.StringIO(response.get_data(as_text=True))))


def test_csv_export_is_the_current_view_masked_neutralised_and_audited(login, make, audit_events):
    make(patient="Patient/98765432", detail='=HYPERLINK("http://x") Patient/98765432', category="auth")
    make(category="transport")
    response = login("rita").get("/queues/all?category=auth")
    export = login("rita").get("/queues/all/export.csv?category=auth")
    assert response.status_code == 200 and export.status_code == 200
    assert export.headers["Content-Type"].startswith("text/csv")
    assert "attachment" in export.headers["Content-Disposition"]
    rows = _csv(export)
    header, body = rows[0], rows[1:]
    assert len(body) == 1
    record = dict(zip(header, body[0], strict=True))
    assert record["category"] == "auth" and record["patient"] == "Patient/******32"
    assert "98765432" not in export.get_data(as_text=True)
    assert record["reason"].startswith("'=HYPERLINK")  # neutralised: a spreadsheet shows text
    [event] = audit_events(action="queue.export")
    assert event.actor == "rita" and event.subject_id == "all"
    assert event.details["rows"] == 1 and event.details["filters"] == {"category": "auth"}
    assert event.details["masked"] is True


def test_csv_export_shows_a_clinical_lead_the_identifiers_and_stops_at_its_bound(login, make, monkeypatch):
    from app.services import queue_export

    for _ in range(3):
        make(patient="Patient/98765432")
    monkeypatch.setattr(queue_export, "MAX_EXPORT_ROWS", 2)
    export = login("lena").get("/queues/all/export.csv")
    rows = _csv(export)
    assert len(rows) == 3 and rows[1][rows[0].index("patient")] == "Patient/98765432"
    assert export.headers["X-Recon-Truncated"] == "2"


# --- saved views -----------------------------------------------------------------------------------


def test_saved_views_are_personal_unless_shared(login, make, post, audit_events):
    make()
    login("rita")
    query = "connection=mercy-epic&state=open"
    assert post("/queues/views", {"name": "My open", "queue": "transport", "query": query}).status_code == 303
    assert (
        post(
            "/queues/views",
            {"name": "Team breached", "queue": "all", "query": "sla_status=breached", "shared": "y"},
        ).status_code
        == 303
    )
    mine = login("rita").get("/queues/all").get_data(as_text=True)
    assert 'href="/queues/transport?state=open&amp;connection=mercy-epic"' in mine and "My open" in mine
    assert "Team breached" in mine
    theirs = login("ravi").get("/queues/all").get_data(as_text=True)
    assert "My open" not in theirs
    assert 'href="/queues/all?sla_status=breached"' in theirs and "Team breached" in theirs
    [shared] = audit_events(action="saved_view.share")
    assert shared.actor == "rita" and shared.details["query"] == "sla_status=breached"


def test_a_saved_view_keeps_only_filters_and_only_its_owner_deletes_it(login, post, sessions, users):
    from app.db.models import SavedView

    login("rita")
    post("/queues/views", {"name": "Mine", "queue": "all", "query": "q=abc&cursor=xyz&evil=1", "shared": "y"})
    with transaction(sessions) as s:
        view = s.scalar(sa.select(SavedView))
        assert view.query == "q=abc" and view.shared
        view_id = view.id
    login("ravi")
    assert post(f"/queues/views/{view_id}/delete").status_code == 303
    with transaction(sessions) as s:
        assert s.get(SavedView, view_id) is not None
    login("rita")
    post(f"/queues/views/{view_id}/delete")
    with transaction(sessions) as s:
        assert s.get(SavedView, view_id) is None


def test_live_polls_do_not_count_as_activity_so_the_idle_timeout_still_ends_the_session(client, login, make):
    """A live page polls every 5 s; if each poll counted as activity, a queue left open would
    never reach the idle timeout (docs/SECURITY.md)."""
    import time

    make()
    login("rita")
    idle_since = time.time() - 120
    with client.session_transaction() as sess:
        sess["seen_at"] = idle_since
    assert client.get("/queues/changes?since=x").status_code == 200
    assert client.get("/queues/all", headers={"HX-Request": "true", "X-Recon-Live": "1"}).status_code == 200
    assert client.get("/", headers={"HX-Request": "true", "X-Recon-Live": "1"}).status_code == 200
    with client.session_transaction() as sess:
        assert sess["seen_at"] == idle_since  # untouched by the page's own refreshes
    assert client.get("/queues/all").status_code == 200  # a person's request
    with client.session_transaction() as sess:
        assert sess["seen_at"] > idle_since + 60
        sess["seen_at"] = time.time() - 16 * 60  # past the 15-minute idle timeout
    ended = client.get("/queues/changes?since=x", headers={"HX-Request": "true"})
    assert ended.headers["HX-Redirect"].startswith("/login")  # the page goes to the login form
