"""SPEC 5 / issue 5: the HL7 v2 viewer on the exception page. An interface engine reports a failed
ADT through POST /api/v1/exceptions; the page shows its field table with the field the engine's ERR
names flagged, masked until someone allowed to see patient data asks (an audited PHI view), and
never unmasked for a role without PHI access."""

from __future__ import annotations

import html as html_lib
import re

import pytest

from tests.factories import setup_connection

HL7 = "x-application/hl7-v2+er7"

# An ADT^A08 whose PID-7 (date of birth) is empty; the receiving system answered AE naming it.
ADT_A08 = (
    "MSH|^~\\&|REGADT|MERCY|EHR|MERCY|20261202101500||ADT^A08^ADT_A01|MSG00042|P|2.5.1\r"
    "EVN|A08|20261202101500\r"
    "PID|1||MRN-00042^^^MERCY^MR~PAT-77^^^EPI^PI||NUÑEZ^MARÍA^J||||||12 CALLE MAYOR^^SPRINGFIELD\r"
    "PV1|1|I|4W^401^A"
)
ENGINE_ERROR = "MSA|AE|MSG00042\rERR||PID^1^7|101^Required field missing^HL70357|E||||PID-7 is required"
PHI = ("MRN-00042", "PAT-77", "NUÑEZ", "MARÍA", "CALLE MAYOR", "4W")


@pytest.fixture
def hl7_exception(client, users, sessions) -> int:
    """An HL7 exception created the way an interface engine creates one: the real API."""
    setup_connection(sessions, name="mercy-mllp", protocol="hl7v2-mllp")
    r = client.post(
        "/api/v1/exceptions",
        json={
            "connection": "mercy-mllp",
            "message_type": "ADT^A08",
            "content_type": HL7,
            "payload": ADT_A08,
            "error": ENGINE_ERROR,
        },
        headers={"Authorization": f"Bearer {users['svc_token']}", "Idempotency-Key": "engine-adt-42"},
    )
    assert r.status_code == 202, r.get_data(as_text=True)
    return r.json["exception_id"]


def page(client, url: str) -> str:
    response = client.get(url)
    assert response.status_code == 200, response.status_code
    return html_lib.unescape(response.get_data(as_text=True))


def row(html: str, position: str) -> str:
    """The table row of one field, e.g. PID-5."""
    match = re.search(rf'<tr[^>]*>\s*<td class="mono">{position}</td>.*?</tr>', html, re.S)
    assert match, f"no row for {position}"
    return match.group(0)


def table(html: str) -> str:
    return re.search(r'<table class="hl7">.*?</table>', html, re.S).group(0)


def test_full_view_shows_named_fields_and_flags_the_field_the_engine_named(
    login, hl7_exception, audit_events
):
    html = page(login("rita"), f"/exceptions/{hl7_exception}?payload=1")
    assert re.search(r'<td class="mono">PID-5</td>\s*<td>Patient Name</td>', html)
    assert "NUÑEZ" in row(html, "PID-5") and "MARÍA" in row(html, "PID-5")
    flagged = re.findall(r'<tr class="hl"[^>]*>\s*<td class="mono">([A-Z0-9]{3}-\d+)</td>', html)
    assert flagged == ["PID-7"]
    pid7 = row(html, "PID-7")
    assert "Date/Time of Birth" in pid7 and "error here" in pid7 and "(empty)" in pid7
    # PID-3's two identifiers are two repetitions, their components numbered
    pid3 = row(html, "PID-3")
    assert pid3.count("repetition ") == 2
    assert "<dt>PID-3.1</dt><dd>MRN-00042</dd>" in pid3 and "<dt>PID-3.4</dt><dd>EPI</dd>" in pid3
    # the raw view sits next to the table, with the segment terminators shown
    assert 'value="raw"' in html and 'class="code hl7-raw" tabindex="0"' in html
    assert html.count('title="CR (0x0D), segment terminator"') == 3
    [event] = audit_events(action="phi.view")
    assert (event.actor, event.subject_id, event.details["channel"]) == (
        "rita",
        str(hl7_exception),
        "console",
    )


def test_before_asking_a_reviewer_sees_the_table_masked_and_nothing_is_audited(
    login, hl7_exception, audit_events
):
    html = page(login("rita"), f"/exceptions/{hl7_exception}")
    shown = table(html)
    for phi in PHI:
        assert phi not in html, phi
    assert "•••" in row(shown, "PID-5") and "Patient Name" in row(shown, "PID-5")
    assert "error here" in row(shown, "PID-7")  # where the problem is needs no patient data
    assert "ADT^A08^ADT_A01" in row(shown, "MSH-9") and "A08" in row(shown, "EVN-1")
    assert "hl7-raw" not in html  # no raw view while masked
    assert "Show full payload (audited)" in html
    assert audit_events(action="phi.view") == []


def test_a_role_without_phi_access_sees_only_the_masked_table_and_cannot_unmask(
    login, hl7_exception, audit_events
):
    client = login("adam")  # admin: no payload permission
    html = page(client, f"/exceptions/{hl7_exception}")
    for phi in PHI:
        assert phi not in html, phi
    assert "<dt>PID-3.1</dt><dd>•••</dd>" in row(table(html), "PID-3")  # structure still visible
    assert "error here" in row(table(html), "PID-7")
    assert "hl7-raw" not in html and "Show full payload" not in html
    assert "Your role cannot view payloads" in html
    assert client.get(f"/exceptions/{hl7_exception}?payload=1").status_code == 403
    assert (
        client.get(f"/exceptions/{hl7_exception}/payload", headers={"HX-Request": "true"}).status_code == 403
    )
    assert audit_events(action="phi.view") == []


def test_the_htmx_fragment_unmasks_and_is_audited(login, hl7_exception, audit_events):
    fragment = html_lib.unescape(
        login("lena")
        .get(f"/exceptions/{hl7_exception}/payload", headers={"HX-Request": "true"})
        .get_data(as_text=True)
    )
    assert fragment.lstrip().startswith('<section id="payload"')
    assert "MRN-00042" in fragment and "•••" not in fragment and "hl7-raw" in fragment
    assert [e.actor for e in audit_events(action="phi.view")] == ["lena"]
