"""PHI (issue 7): for each role without PHI access, no known identifier of a seeded message — patient
reference and bare id, MRNs, family and given names — appears in any page, fragment, API answer or
export that role can reach. The routes come from the app's url_map (every GET rule), with the seeded
ids substituted; pages are fetched plain and as htmx fragments, the API with the role's token.

The roles and the identifiers are written out here, not read from the code under test: reviewers,
auditors and admins see identifiers masked (SPEC 3.4); clinical leads see them (and the test
checks that they do, so a seeding that shows no identifier anywhere would fail it)."""

from __future__ import annotations

import html
import json
import re

import pytest
import sqlalchemy as sa

from app.db.models import AuditEvent, ExceptionItem, Replay, User
from app.db.session import transaction
from app.domain.payloads import HL7_ER7
from app.services import exceptions
from app.services.exceptions import DecisionInput
from app.services.users import create_token
from tests.conftest import PASSWORD
from tests.factories import make_exception

MASKED_ROLES = {"rita": "reviewer", "audrey": "auditor", "adam": "admin"}
OPENS_PAYLOADS = {"rita", "audrey"}  # SPEC 3.4: may open a full payload (an audited PHI view)
PATIENT_ID = "e79af66c-3b1d-4f0a-9c55-7d2f4b8e11a3"
PATIENT_REF = f"Patient/{PATIENT_ID}"
FHIR_MRN = "MRN-7730194"
FAMILY, GIVEN = "Quenby", "Odalys"
HL7_MRN, HL7_FAMILY, HL7_GIVEN = "MRN-4418207", "Vanterpool", "Mireille"
IDENTIFIERS = (PATIENT_REF, PATIENT_ID, FHIR_MRN, FAMILY, GIVEN, HL7_MRN, HL7_FAMILY, HL7_GIVEN)

# What a person with the payload permission opens on purpose: a full payload, recorded as a
# phi.view (tests/web/test_phi_views.py) — the one place identifiers are shown to these roles.
FULL_PAYLOAD = re.compile(
    r"^/exceptions/\d+/(?:payload|correct)$|^/exceptions/\d+\?payload=1$|^/api/v1/exceptions/\d+$|^/approvals/\d+$"
)


def medication_request() -> str:
    return json.dumps(
        {
            "resourceType": "MedicationRequest",
            "status": "active",
            "intent": "order",
            "subject": {
                "reference": PATIENT_REF,
                "identifier": {"system": "urn:mrn", "value": FHIR_MRN},
                "display": f"{GIVEN} {FAMILY}",
            },
            "identifier": [{"system": "urn:orders", "value": "ORD-55120"}],
            "medicationCodeableConcept": {
                "coding": [{"system": "http://example.org/icd9", "code": "313782"}]
            },
        },
        indent=2,
    )


def patient_resource() -> str:
    return json.dumps(
        {
            "resourceType": "Patient",
            "id": PATIENT_ID,
            "identifier": [{"system": "urn:mrn", "value": FHIR_MRN}],
            "name": [{"family": FAMILY, "given": [GIVEN]}],
            "birthDate": "1961-04-17",
        }
    )


HL7_ADT = (
    "MSH|^~\\&|RECON|MERCY|EHR|MERCY|20240501120000||ADT^A08|CTRL9001|P|2.5.1\r"
    f"PID|1||{HL7_MRN}^^^MERCY^MR||{HL7_FAMILY}^{HL7_GIVEN}||19550302|F\r"
    "PV1|1|I"
)


@pytest.fixture
def seeded(sessions, users, connection):
    """Exceptions whose free text (failure detail, issue diagnostics, attempts, decision reasons,
    a correction, a replay, a discard) repeats the message's identifiers."""
    svc = users["svc"]
    issues = [
        {
            "severity": "error",
            "code": "not-found",
            "diagnostics": f"Subject {PATIENT_REF} ({FAMILY}, {GIVEN}; {FHIR_MRN}) is not known",
            "expression": ["MedicationRequest.subject"],
        }
    ]
    detail = f"HTTP 422: {PATIENT_REF} / {PATIENT_ID} {GIVEN} {FAMILY} {FHIR_MRN} rejected"
    fhir = [
        make_exception(sessions, svc, payload=medication_request(), issues=issues, detail=detail)
        for _ in range(3)
    ]
    patient = make_exception(
        sessions, svc, payload=patient_resource(), message_type="Patient", issues=issues, detail=detail
    )
    hl7 = make_exception(
        sessions,
        svc,
        payload=HL7_ADT,
        content_type=HL7_ER7,
        message_type="ADT^A08",
        detail=f"AE: PID-3 {HL7_MRN} unknown for {HL7_FAMILY}^{HL7_GIVEN}",
    )
    with transaction(sessions) as s:
        rita, lena = s.get(User, users["rita"].id), s.get(User, users["lena"].id)
        # A corrected replay, approved: a payload version 2, a replay, decisions with reasons.
        corrected = medication_request().replace("313782", "313783")
        exceptions.decide(
            s,
            fhir[0],
            rita,
            DecisionInput(
                action="resubmit_corrected", reason=f"code fixed for {FAMILY} {FHIR_MRN}", payload=corrected
            ),
        )
        exceptions.decide(
            s,
            fhir[0],
            lena,
            DecisionInput(action="approve", reason=f"ok for {PATIENT_REF}", password=PASSWORD),
        )
        # A replay waiting for approval, a discard and comments that name the patient.
        exceptions.decide(s, fhir[1], rita, DecisionInput(action="resubmit", reason=f"{GIVEN} again"))
        exceptions.decide(
            s,
            fhir[2],
            rita,
            DecisionInput(action="discard", reason=f"{FAMILY} duplicate {PATIENT_ID}", reason_code="other"),
        )
        exceptions.decide(
            s, hl7, rita, DecisionInput(action="comment", reason=f"called about {HL7_FAMILY} {HL7_MRN}")
        )
        exceptions.decide(
            s, patient, rita, DecisionInput(action="escalate", reason=f"{GIVEN} {FAMILY} MRN {FHIR_MRN}")
        )
        exception_ids = [*fhir, patient, hl7]
        items = s.scalars(sa.select(ExceptionItem).where(ExceptionItem.id.in_(exception_ids))).all()
        message_ids = sorted({i.message_id for i in items})
        replay_ids = sorted(s.scalars(sa.select(Replay.id).where(Replay.exception_id.in_(exception_ids))))
        tokens = {name: create_token(s, s.get(User, users[name].id)) for name in (*MASKED_ROLES, "lena")}
    assert len(replay_ids) == 2
    return {"exceptions": exception_ids, "messages": message_ids, "replays": replay_ids, "tokens": tokens}


def crawl_urls(app, seeded) -> list[str]:
    """Every GET route of the app with the seeded ids substituted (several values per parameter)."""
    values = {
        "exception_id": [str(i) for i in seeded["exceptions"]],
        "message_id": seeded["messages"],
        "replay_id": [str(i) for i in seeded["replays"]],
        "queue": ["all", "escalated", "awaiting_approval", "ehr_rejected", "data_shape"],
    }
    skip = {"static", "account.enroll", "ops.metrics"}
    urls: list[str] = []
    for rule in app.url_map.iter_rules():
        if "GET" not in rule.methods or rule.endpoint in skip:
            continue
        combos = [{}]
        for arg in rule.arguments:
            combos = [{**c, arg: v} for c in combos for v in values.get(arg, ["1"])]
        for combo in combos:
            path = rule.rule
            for arg, value in combo.items():
                path = re.sub(rf"<(?:[a-z]+:)?{arg}>", value, path)
            urls.append(path)
    extra = [
        "/queues/all?state=closed",
        "/queues/all?state=discarded",
        "/audit?subject_type=exception",
        "/api/v1/exceptions?state=resolved",
        "/api/v1/exceptions?state=discarded",
        "/api/v1/audit?limit=500",
        "/queues/all/export.csv?state=closed",
    ]
    extra += [f"/exceptions/{i}?payload=1" for i in seeded["exceptions"]]
    for fmt in ("csv", "jsonl", "fhir-ndjson"):
        extra += [f"/audit/export?format={fmt}", f"/api/v1/audit/export?format={fmt}"]
    return sorted(set(urls + extra))


def leaked(body: str) -> list[str]:
    text = html.unescape(body)
    return [i for i in IDENTIFIERS if i.lower() in body.lower() or i.lower() in text.lower()]


def fetch(client, url: str, token: str, *, fragment: bool) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if url.startswith("/api/") else {}
    if fragment:
        headers["HX-Request"] = "true"
    response = client.get(url, headers=headers)
    return response.status_code, response.get_data(as_text=True)


def test_no_known_identifier_reaches_a_role_without_phi_access(app, client, auth, seeded, sessions):
    urls = crawl_urls(app, seeded)
    # The seeded identifiers are in the free text the console shows (the audit log too).
    with transaction(sessions) as s:
        reasons = " ".join(r or "" for r in s.scalars(sa.select(AuditEvent.reason)))
    assert {FAMILY, GIVEN, HL7_MRN, FHIR_MRN} <= set(re.findall(r"[\w-]+", reasons))

    # No role that may see identifiers reads the audit log: there, the reasons are shown masked.
    auth.login("audrey")
    hl7 = seeded["exceptions"][-1]
    for url in (
        f"/audit?subject_type=exception&subject_id={hl7}",
        "/audit/export?format=csv",
        "/audit/export?format=fhir-ndjson",
        "/audit/export?format=jsonl",
        "/api/v1/audit?limit=500",
    ):
        body = fetch(client, url, seeded["tokens"]["audrey"], fragment=False)[1]
        assert "called about ****" in html.unescape(body), url
    auth.logout()

    leaks: list[str] = []
    fetched = 0
    for name in MASKED_ROLES:
        auth.login(name)
        for url in urls:
            if FULL_PAYLOAD.match(url) and name in OPENS_PAYLOADS:
                continue  # their audited full view: tests/web/test_phi_views.py
            # htmx asks console pages for fragments; the API and the exports answer the same either way.
            console_page = not url.startswith("/api/") and "export" not in url
            for fragment in (False, True) if console_page else (False,):
                status, body = fetch(client, url, seeded["tokens"][name], fragment=fragment)
                assert status < 500, (name, url, status)
                fetched += 1
                found = leaked(body)
                if found:
                    leaks.append(f"{name} {'htmx ' if fragment else ''}{url} [{status}]: {found}")
        auth.logout()
    assert not leaks, "\n".join(leaks)
    assert fetched > 250

    # The same crawl as a clinical lead (who may see identifiers) finds them: the seeding shows
    # identifiers on list pages, the detail page, the audit log and the exports.
    auth.login("lena")
    seen = {
        url
        for url in urls
        if not FULL_PAYLOAD.match(url)
        and leaked(fetch(client, url, seeded["tokens"]["lena"], fragment=False)[1])
    }
    assert {"/queues/all", "/queues/all/export.csv?state=closed", "/api/v1/replays"} <= seen
    assert {f"/exceptions/{i}" for i in seeded["exceptions"]} <= seen


def test_a_masked_page_keeps_its_links_and_htmx_attributes(login, seeded):
    """Masking rewrites what a person reads, not our own URLs: a patient id equal to an exception id
    would otherwise break the exception's link."""
    exc_id = seeded["exceptions"][0]
    page = login("rita").get(f"/exceptions/{exc_id}").get_data(as_text=True)
    assert PATIENT_REF not in page and "Patient/****" in page
    assert f'href="/exceptions/{exc_id}/correct"' in page or f'hx-get="/exceptions/{exc_id}/payload"' in page
    assert re.search(r'hx-[a-z]+="[^"]*\*\*\*\*', page) is None
