"""SPEC 5 Dashboard: counts by category × SLA status, per customer/connection, charts, circuits, throughput."""

from __future__ import annotations

import re
from datetime import datetime

from freezegun import freeze_time

from app.db.models import Connection
from app.db.session import transaction
from app.services import queries
from tests.factories import make_exception, setup_connection


def cell(html: str, category: str, status: str) -> int:
    match = re.search(rf'data-cell="{category}:{status}">(.*?)</td>', html, re.S)
    return int(re.sub(r"<[^>]+>", "", match.group(1)).strip())


def test_dashboard_counts_by_category_and_sla_status(login, sessions, users, connection):
    setup_connection(sessions, "Valley Clinic", "valley-cerner")
    with freeze_time("2024-05-01 10:00:00"):
        make_exception(sessions, users["svc"], category="transport")  # 30 min window: breached by 12:00
    with freeze_time("2024-05-01 11:50:00"):
        make_exception(
            sessions, users["svc"], category="ehr_rejected"
        )  # due 12:20, 10 of 30 min left: on track
        make_exception(sessions, users["svc"], category="ehr_rejected", connection="valley-cerner")
    with freeze_time("2024-05-01 11:34:00"):
        make_exception(sessions, users["svc"], category="ehr_rejected")  # due 12:04: at risk at 12:00
    with freeze_time("2024-05-01 12:00:00"):
        html = login("audrey").get("/").get_data(as_text=True)
    assert cell(html, "transport", "breached") == 1
    assert cell(html, "ehr_rejected", "on_track") == 2
    assert cell(html, "ehr_rejected", "at_risk") == 1
    assert cell(html, "ehr_rejected", "breached") == 0
    assert re.search(r'data-kpi="active">4<', html) and re.search(r'data-kpi="breached">1<', html)
    assert re.search(r'data-kpi="oldest">2h 00m<', html)
    assert "Valley Clinic" in html and "valley-cerner" in html
    assert html.count('<svg class="chart') == 2 and "<polyline" in html
    assert "<script" not in html.split("</head>")[1]  # charts are inline SVG, no chart JS


def test_dashboard_shows_circuit_state_and_throughput(login, sessions, connection, make):
    make()
    with transaction(sessions) as s:
        s.get(Connection, connection.id).circuit_open_until = datetime(2999, 1, 1)
    html = login("rita").get("/").get_data(as_text=True)
    assert re.search(r'<span class="circuit circuit-open">open</span>', html)
    assert "Delivery attempts, last 24 h" in html
    assert 'aria-label="Delivery attempts by outcome"' in html  # the intake attempt (queued)


def test_history_series_counts_depth_and_breaches_per_hour(sessions, users, connection):
    with freeze_time("2024-05-01 08:30:00"):
        make_exception(sessions, users["svc"])  # 30 minute window, due 09:00
    with transaction(sessions) as s:
        board = queries.dashboard(s, datetime(2024, 5, 1, 12, 0, 0), buckets=6)
    assert [t.hour for t in board.series_times] == [7, 8, 9, 10, 11, 12]
    assert board.depth_series == [0, 0, 1, 1, 1, 1]
    assert board.breach_series == [0, 0, 1, 1, 1, 1]


def test_empty_dashboard_renders(login):
    html = login("adam").get("/").get_data(as_text=True)
    assert "No active exceptions." in html and re.search(r'data-kpi="active">0<', html)
