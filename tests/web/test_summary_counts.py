"""Issue 6, counts that do not grow with history: the queue counts and the dashboard read one
summary the worker refreshes, show its time, and agree with each other; filters the summary has no
column for get an exact count that stops at a bound."""

from __future__ import annotations

import re
from datetime import datetime, timedelta

import sqlalchemy as sa
from freezegun import freeze_time

from app.db.session import transaction
from app.db.summary_models import ExceptionCount, ReadSummary
from app.services import queries, summaries
from tests.factories import make_exception, setup_connection

T0 = datetime(2024, 5, 1, 12, 0, 0)


def total(html: str) -> int:
    return int(re.search(r"<strong data-total>(\d+)</strong>", html).group(1))


def sidebar(html: str, queue: str) -> int:
    link = re.search(
        rf'href="/queues/{queue}"[^>]*>\s*<span>[^<]*</span>\s*<span class="qcount"[^>]*>(\d+)', html
    )
    return int(link.group(1))


def kpi(html: str, name: str) -> int:
    return int(re.search(rf'data-kpi="{name}">(\d+)<', html).group(1))


def test_counts_come_from_the_summary_with_its_time_until_the_next_refresh(
    login, sessions, users, connection
):
    with freeze_time(T0):
        for n in range(3):
            make_exception(sessions, users["svc"], category="transport", key=f"a-{n}")
        summaries.refresh(sessions)
    with freeze_time(T0 + timedelta(seconds=5)):
        late = make_exception(sessions, users["svc"], category="transport", key="late")
        client = login("rita")
        page = client.get("/queues/transport").get_data(as_text=True)
        board = client.get("/").get_data(as_text=True)
    # The counts are the summary's (3, as of 12:00:00); the list itself is live (4 rows).
    assert total(page) == 3 and sidebar(page, "transport") == 3 and sidebar(page, "all") == 3
    assert f'id="ex-{late}"' in page and page.count('<tr id="ex-') == 4
    assert "counts as of <time" in page and ">12:00:00</time>" in page
    assert kpi(board, "active") == 3 and "counts as of <time" in board and ">12:00:00</time>" in board
    with freeze_time(T0 + timedelta(seconds=10)):
        summaries.refresh(sessions)
        page = client.get("/queues/transport").get_data(as_text=True)
        board = client.get("/").get_data(as_text=True)
    assert total(page) == 4 and kpi(board, "active") == 4 and ">12:00:10</time>" in page


def test_dashboard_and_queues_show_the_same_numbers(login, sessions, users, connection):
    setup_connection(sessions, "Valley Clinic", "valley-cerner")
    with freeze_time(T0 - timedelta(hours=2)):
        make_exception(sessions, users["svc"], category="transport")  # breached by T0
    with freeze_time(T0 - timedelta(minutes=26)):
        make_exception(sessions, users["svc"], category="ehr_rejected", connection="valley-cerner")  # at risk
    with freeze_time(T0 - timedelta(minutes=5)):
        make_exception(sessions, users["svc"], category="ehr_rejected")
        make_exception(sessions, users["svc"], category="code_set", connection="valley-cerner")
    with freeze_time(T0):
        summaries.refresh(sessions)
        client = login("rita")
        board = client.get("/").get_data(as_text=True)
        for category in queries.CATEGORIES:
            for status in queries.SLA_STATUSES:
                cell = re.search(rf'data-cell="{category}:{status}">(.*?)</td>', board, re.S).group(1)
                shown = int(re.sub(r"<[^>]+>", "", cell).strip())
                page = client.get(f"/queues/all?category={category}&sla_status={status}").get_data(
                    as_text=True
                )
                assert total(page) == shown, (category, status)
        for customer, expected in (("Mercy Health", 2), ("Valley Clinic", 2)):
            assert (
                total(client.get(f"/queues/all?customer={customer.replace(' ', '+')}").get_data(as_text=True))
                == expected
            )
        assert (
            total(
                client.get("/queues/all?connection=valley-cerner&sla_status=at_risk").get_data(as_text=True)
            )
            == 1
        )
        assert kpi(board, "breached") == 1 and kpi(board, "at_risk") == 1 and kpi(board, "active") == 4


def test_counts_older_than_the_limit_are_recounted_live(login, sessions, users, connection, monkeypatch):
    monkeypatch.setenv("RECON_SUMMARY_MAX_AGE_SECONDS", "60")
    with freeze_time(T0):
        make_exception(sessions, users["svc"], key="one")
        summaries.refresh(sessions)
        make_exception(sessions, users["svc"], key="two")
        client = login("rita")
    with freeze_time(T0 + timedelta(seconds=59)):
        assert total(client.get("/queues/all").get_data(as_text=True)) == 1
    with freeze_time(T0 + timedelta(seconds=61)):  # no worker for a while: counted now, no stale time
        page = client.get("/queues/all").get_data(as_text=True)
        assert total(page) == 2 and "counts as of" not in page
        assert kpi(client.get("/").get_data(as_text=True), "active") == 2


def test_filters_outside_the_summary_are_counted_exactly_up_to_a_bound(login, make, monkeypatch, sessions):
    monkeypatch.setattr(queries, "BOUNDED_COUNT", 3)
    for n in range(5):
        make(key=f"bounded-{n:02d}")
    summaries.refresh(sessions)
    client = login("rita")
    capped = client.get("/queues/all?message_type=MedicationRequest").get_data(as_text=True)
    assert total(capped) == 3 and "data-total-capped" in capped  # "3+"
    assert "counts as of" not in capped.split('id="queue-results"')[1]  # counted now, not the summary
    exact = client.get("/queues/all?q=bounded-04").get_data(as_text=True)
    assert total(exact) == 1 and "data-total-capped" not in exact
    assert total(client.get("/queues/all").get_data(as_text=True)) == 5  # from the summary: no bound


def test_a_refresh_replaces_the_counts_and_never_goes_back_in_time(sessions, users, connection):
    with freeze_time(T0):
        make_exception(sessions, users["svc"])
        first = summaries.refresh(sessions)
    assert first.written and first.groups == 1 and first.trends
    with freeze_time(T0 + timedelta(seconds=30)):
        make_exception(sessions, users["svc"], category="transport")
        second = summaries.refresh(sessions)
    assert second.written and not second.trends  # the trends are a minute's work, not every refresh
    stale = summaries.refresh(sessions, T0 + timedelta(seconds=10))  # a slow refresh finishing late
    assert not stale.written
    with transaction(sessions, read_only=True) as s:
        assert s.scalar(sa.select(sa.func.sum(ExceptionCount.n))) == 2
        assert s.scalar(sa.select(ReadSummary.counts_as_of)) == T0 + timedelta(seconds=30)


def test_stored_trends_match_the_live_ones(sessions, users, connection):
    with freeze_time("2024-05-01 08:30:00"):
        make_exception(sessions, users["svc"])  # 30 minute window, due 09:00
    with freeze_time(T0):
        summaries.refresh(sessions)
        with transaction(sessions, read_only=True) as s:
            stored = queries.dashboard(s)
        with transaction(sessions, read_only=True) as s:
            live = queries.compute_trends(s, T0)
    assert not stored.counts_live and stored.trends_as_of == T0
    assert stored.depth_series == live.depth and stored.breach_series == live.breaches
    assert stored.series_times == live.times and stored.attempts_24h == live.attempts
    assert stored.depth_series[-4:] == [1, 1, 1, 1] and stored.breach_series[-3:] == [1, 1, 1]


def _cells(board: str) -> dict[tuple[str, str], tuple[int, str | None]]:
    """(category, status) -> (the number shown, the queue URL it links to)."""
    out = {}
    for category, status, cell in re.findall(r'data-cell="(\w+):(\w+)">(.*?)</td>', board, re.S):
        link = re.search(r'href="([^"]+)"', cell)
        shown = int(re.sub(r"<[^>]+>", "", cell).strip())
        out[(category, status)] = (shown, link.group(1).replace("&amp;", "&") if link else None)
    return out


def test_every_dashboard_cell_equals_the_queue_it_links_to(login, sessions, users, connection, post):
    """Issue 8: "transport 11" on the dashboard is 11 in the transport queue, whatever the items'
    states (open, escalated, awaiting approval), live and from the summary."""
    with freeze_time(T0 - timedelta(hours=2)):
        breached = [make_exception(sessions, users["svc"], category="transport") for _ in range(2)]
    with freeze_time(T0 - timedelta(minutes=26)):
        make_exception(sessions, users["svc"], category="ehr_rejected")  # at risk
    with freeze_time(T0 - timedelta(minutes=5)):
        fresh = [make_exception(sessions, users["svc"], category="transport") for _ in range(2)]
        make_exception(sessions, users["svc"], category="code_set")
    with freeze_time(T0):
        client = login("rita")
        post(f"/exceptions/{breached[0]}/decide", {"action": "escalate", "reason": "lead please"})
        post(f"/exceptions/{fresh[0]}/decide", {"action": "resubmit", "reason": "try again"})
        post(f"/exceptions/{fresh[1]}/decide", {"action": "discard", "reason_code": "duplicate"})
        for source in ("live", "summary"):
            if source == "summary":
                summaries.refresh(sessions)
            board = client.get("/").get_data(as_text=True)
            cells = _cells(board)
            assert len(cells) == len(queries.CATEGORIES) * len(queries.SLA_STATUSES)
            assert cells[("transport", "breached")][0] == 2 and cells[("transport", "on_track")][0] == 1
            for (category, status), (shown, link) in cells.items():
                url = link or f"/queues/{category}?sla_status={status}"
                assert url.startswith(f"/queues/{category}?"), url  # the category's own queue
                assert total(client.get(url).get_data(as_text=True)) == shown, (source, category, status)
            for category in queries.CATEGORIES:
                row = sum(cells[(category, s)][0] for s in queries.SLA_STATUSES)
                page = client.get(f"/queues/{category}").get_data(as_text=True)
                assert total(page) == row == sidebar(page, category), (source, category)


def test_the_stored_rollups_equal_the_counts_aggregated_per_view(sessions, users, connection):
    """Pages read the refresh's rollups (migration 0014) instead of aggregating the summary's rows
    per view: the queue counts and the dashboard's matrix and per-connection rows are the same."""
    with freeze_time("2024-05-01 08:30:00"):
        make_exception(sessions, users["svc"], category="transport", key="old")  # breached by T0
    with freeze_time(T0 - timedelta(minutes=5)):
        for n, category in enumerate(["transport", "ehr_rejected", "ehr_rejected", "code_set"]):
            make_exception(sessions, users["svc"], category=category, key=f"r-{n}")
    with freeze_time(T0):
        summaries.refresh(sessions)
        with transaction(sessions, read_only=True) as s:
            source = queries.count_source(s)
            assert source.rollups is not None and not source.live
            stored_counts, stored_board = queries.queue_counts(s), queries.dashboard(s)
        with transaction(sessions, read_only=True) as s:
            s.info["recon_count_source"] = queries.CountSource(source.rows, source.as_of, live=False)
            counts, board = queries.queue_counts(s), queries.dashboard(s)
    assert stored_counts == counts and stored_counts["all"]["total"] == 5
    with freeze_time(T0):
        for queue in ("all", "transport", "ehr_rejected", "escalated"):
            for status in (None, *queries.SLA_STATUSES):
                filters = {"sla_status": status}
                with transaction(sessions, read_only=True) as s:
                    stored_total = queries.queue_page(s, queue, filters=filters).total
                with transaction(sessions, read_only=True) as s:
                    s.info["recon_count_source"] = queries.CountSource(source.rows, source.as_of, live=False)
                    assert queries.queue_page(s, queue, filters=filters).total == stored_total, (
                        queue,
                        status,
                    )
    assert stored_counts["transport"] == {"total": 2, "breached": 1}
    assert stored_board.matrix == board.matrix and stored_board.status_totals == board.status_totals
    assert stored_board.scopes == board.scopes and stored_board.oldest_created_at == board.oldest_created_at
    assert [s.total for s in stored_board.scopes] == [5]
