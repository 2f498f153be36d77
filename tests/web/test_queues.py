"""SPEC 5 Queues: filters, SLA order, keyset pagination, live SLA countdown, masking, bulk actions."""

from __future__ import annotations

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
