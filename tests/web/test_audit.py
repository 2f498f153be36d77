"""SPEC 5/6 Audit page: search, keyset paging, chain verification, streamed exports."""

from __future__ import annotations

import csv
import io
import json
import re

import sqlalchemy as sa

from app.db.models import AuditHead
from app.db.session import transaction


def event_ids(html: str) -> list[int]:
    return [int(i) for i in re.findall(r'<tr data-event="(\d+)">', html)]


def chain_head(sessions):
    with transaction(sessions) as s:
        head = s.get(AuditHead, 1)
        return head.last_id, head.last_hash


def test_audit_search_by_actor_action_and_subject(login, make, post):
    exc_id = make()
    make()
    client = login("rita")
    post(f"/exceptions/{exc_id}/decide", {"action": "escalate", "reason": "needs a lead"})
    login("audrey")
    by_action = client.get("/audit?action=decision.escalate").get_data(as_text=True)
    assert len(event_ids(by_action)) == 1 and "needs a lead" in by_action
    by_actor = client.get("/audit?actor=rita").get_data(as_text=True)
    assert "decision.escalate" in by_actor and "auth.login" in by_actor and "exception.open" not in by_actor
    by_subject = client.get(f"/audit?subject_type=exception&subject_id={exc_id}").get_data(as_text=True)
    assert re.findall(r'<td class="mono">([\w.]+)</td>', by_subject) == [
        "decision.escalate",
        "exception.open",
    ]
    family = client.get("/audit?action=decision.").get_data(as_text=True)
    assert len(event_ids(family)) == 1


def test_audit_search_by_date_range(login, make):
    make()
    client = login("audrey")
    assert event_ids(client.get("/audit?since=2000-01-01&until=2000-01-02").get_data(as_text=True)) == []
    assert event_ids(client.get("/audit?since=2000-01-01").get_data(as_text=True))
    bad = client.get("/audit?since=yesterday")
    assert bad.status_code == 422 and "not a date" in bad.get_data(as_text=True)


def test_audit_pages_newest_first_with_a_keyset_link(login, make, sessions):
    for _ in range(30):
        make()  # each writes message.receive + exception.open
    client = login("audrey")
    head_id, _ = chain_head(sessions)
    html = client.get("/audit").get_data(as_text=True)
    first = event_ids(html)
    assert first == list(range(head_id, head_id - 50, -1))
    older = re.search(r'<a rel="next" href="([^"]+)"', html).group(1).replace("&amp;", "&")
    assert f"before={first[-1]}" in older
    second = event_ids(client.get(older).get_data(as_text=True))
    assert second[0] == first[-1] - 1 and not set(first) & set(second)
    fragment = client.get(older, headers={"HX-Request": "true"}).get_data(as_text=True)
    assert "<html" not in fragment and event_ids(fragment) == second


def test_chain_verification_on_demand(login, make, sessions):
    make()
    client = login("audrey")
    head_id, head_hash = chain_head(sessions)
    html = client.get("/audit/verify").get_data(as_text=True)
    assert 'data-verify="ok"' in html and f"{head_id} events" in html and head_hash[:16] in html
    fragment = client.get("/audit/verify", headers={"HX-Request": "true"}).get_data(as_text=True)
    assert fragment.lstrip().startswith('<div id="verify-result"') and "Chain OK" in fragment


def test_chain_verification_names_the_first_broken_event(login, make, sessions):
    make()
    client = login("audrey")
    with transaction(sessions) as s:  # the head row is not protected by the append-only triggers
        s.execute(sa.update(AuditHead).where(AuditHead.id == 1).values(last_hash="f" * 64))
    html = client.get("/audit/verify").get_data(as_text=True)
    assert 'data-verify="broken"' in html and "chain head does not match" in html


def _download(client, fmt, **params):
    query = "&".join([f"format={fmt}"] + [f"{k}={v}" for k, v in params.items()])
    response = client.get(f"/audit/export?{query}")
    assert response.status_code == 200, response.get_data(as_text=True)
    return response


def test_csv_export_has_a_header_row_and_ends_with_the_chain_head(login, make, sessions, audit_events):
    make()
    client = login("audrey")
    response = _download(client, "csv")
    assert response.mimetype == "text/csv"
    assert re.match(
        r'attachment; filename="audit-\d{8}T\d{6}Z\.csv"', response.headers["Content-Disposition"]
    )
    text = response.get_data(as_text=True)
    lines = text.splitlines()
    rows = list(csv.reader(io.StringIO("\n".join(lines[:-1]))))
    assert rows[0][:4] == ["id", "occurred_at", "actor", "action"] and rows[0][-2:] == ["prev_hash", "hash"]
    head_id, head_hash = chain_head(sessions)
    assert lines[-1] == f"# chain_head id={head_id} hash={head_hash}"
    assert rows[-1][0] == str(head_id) and rows[-1][3] == "audit.export"  # the export audits itself
    [export] = audit_events(action="audit.export")
    assert export.actor == "audrey" and export.details["format"] == "csv"


def test_jsonl_export_lines_and_chain_head(login, make, sessions):
    make()
    client = login("audrey")
    response = _download(client, "jsonl")
    assert response.mimetype == "application/x-ndjson"
    lines = [json.loads(line) for line in response.get_data(as_text=True).splitlines()]
    head_id, head_hash = chain_head(sessions)
    assert lines[-1] == {"chain_head": {"id": head_id, "hash": head_hash}}
    assert [e["id"] for e in lines[:-1]] == list(range(1, head_id + 1))
    assert all({"actor", "action", "prev_hash", "hash"} <= set(e) for e in lines[:-1])


def test_fhir_ndjson_export_is_audit_event_resources(login, make, sessions):
    make()
    client = login("audrey")
    response = _download(client, "fhir-ndjson", since="2000-01-01")
    assert response.mimetype == "application/fhir+ndjson"
    assert response.headers["Content-Disposition"].endswith('.ndjson"')
    resources = [json.loads(line) for line in response.get_data(as_text=True).splitlines()]
    assert all(r["resourceType"] == "AuditEvent" for r in resources)
    head_id, head_hash = chain_head(sessions)
    assert resources[-1]["id"] == f"chain-head-{head_id}"
    assert resources[-1]["entity"][0]["what"]["identifier"]["value"] == head_hash


def test_export_with_an_unknown_format_is_422(login):
    response = login("audrey").get("/audit/export?format=xml")
    assert response.status_code == 422 and "format must be one of" in response.get_data(as_text=True)


def test_the_audit_page_links_to_every_export_format(login):
    html = login("audrey").get("/audit").get_data(as_text=True)
    for fmt in ("csv", "jsonl", "fhir-ndjson"):
        assert f'href="/audit/export?format={fmt}"' in html
