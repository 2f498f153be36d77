"""Demo data: a believable console on first start, built through the real services.

`load_demo` creates demo users, three customers, five FHIR R4 connections, two HL7 v2 MLLP
connections and a few hundred messages from `seed.corpus` and `seed.hl7_corpus`, then plays a three-day history over them: deliveries, failures
of every category, automatic retries, and a decision history (claims, comments,
escalations, discards with every reason code, resubmits, four-eyes approvals, rejected and
failed replays). Every row is written by the service that owns it, so every change has its
audit event and the chain verifies.

How the history is played:

* Each message is a *story*: a list of steps (intake, the worker's delivery result, retries,
  human decisions, the replay's result) with gaps between them. Stories are planned with
  `random.Random(seed)`, placed on the timeline so that open items end up on track, at risk
  or breached, and then all steps of all stories run in time order, in a handful of
  transactions.
* The services read the time from `app.services.clock.utcnow`; while loading, that clock is
  replaced by one that returns each step's time (restored in `finally`), so created_at,
  SLA timers and audit `occurred_at` are spread over the last three days in id order.
* What the worker would do after a network call is done here directly, without a network:
  the delivery outcome comes from the FHIR adapter's own `classify` (fed a synthetic HTTP
  response or exception) or its own validation, or from the MLLP adapter's own `deliver` on a
  socket stand-in that answers with the simulator's own ACKs (or none), and is recorded the way
  the worker records it. Interface-engine reports go through `report_exception`. Outbox rows of seeded messages and replays are marked relayed, so starting a worker
  does not send the seeded history to the simulator. Items left in `retrying` are due a few
  minutes after `now` and items left in `replaying` hold a lease that expires fifteen
  minutes after their claim: a running demo worker then shows a retry and the lease reaper.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
import sqlalchemy as sa
import sqlalchemy.orm as so

from app.adapters.ehr.errors import ValidationFailed
from app.adapters.ehr.fhir_r4 import CREATE, classify, prepare_resource
from app.adapters.ehr.hl7v2_mllp import Hl7MllpAdapter
from app.db.models import (
    Attempt,
    AuditEvent,
    Connection,
    Customer,
    ExceptionItem,
    Message,
    OutboxEntry,
    PayloadVersion,
    Replay,
    User,
)
from app.db.session import transaction
from app.domain.categorize import categorize_reported_error
from app.domain.delivery import (
    AttemptOutcome,
    Category,
    Envelope,
    Outcome,
    clinical_risk,
)
from app.domain.hl7 import frame, msh_field, unframe
from app.domain.payloads import HL7_ER7, decode_payload, decode_text, encode_text
from app.domain.sla import SlaPolicy, sla_status
from app.domain.states import FINAL_STATES, ExceptionState
from app.services import clock, connections, delivery, exceptions, users
from app.services.delivery import envelope_for
from app.services.exceptions import DecisionInput, decide
from app.services.intake import DELIVERY_SYSTEM_PREFIX, report_exception, submit_message
from app.simulator.mllp_server import build_ack, field_empty

from . import corpus, hl7_corpus

DEMO_PASSWORD = "demo-password-2026"
CONSOLE_USERS: tuple[tuple[str, str], ...] = (
    ("rita", "reviewer"),
    ("ravi", "reviewer"),
    ("lena", "clinical_lead"),
    ("leo", "clinical_lead"),
    ("audrey", "auditor"),
    ("adam", "admin"),
)
SERVICE_USERS = ("orders-service", "interface-engine")
REVIEWERS = ("rita", "ravi")
LEADS = ("lena", "leo")
WORKER_NAME = "recon-demo-worker"
REPLAY_LEASE = timedelta(minutes=15)
HISTORY = timedelta(days=3)
FHIR_R4, HL7_MLLP = "fhir-r4", "hl7v2-mllp"
DEFAULT_MLLP_PORT = 2575


# --------------------------------------------------------------------------- the demo estate


@dataclass(frozen=True)
class DemoConnection:
    """One demo EHR instance; `weight` is its share of the traffic."""

    name: str
    customer: str
    vendor: str
    environment: str
    tenant: str
    organization: str
    mrn_system: str
    weight: int
    conditional_create: bool = True
    identifier_search: bool = True
    enabled_message_types: tuple[str, ...] = ()
    protocol: str = FHIR_R4

    def endpoint(self, base_url: str, mllp_port: int = DEFAULT_MLLP_PORT) -> str:
        """FHIR: the simulator's base URL for this tenant. HL7 v2: HOST:PORT of the simulator's MLLP
        listener on the same host (its tenant is MSH-6, which every message here names)."""
        if self.protocol == HL7_MLLP:
            return f"{urlsplit(base_url).hostname or '127.0.0.1'}:{mllp_port}"
        return f"{base_url.rstrip('/')}/fhir/{self.tenant}"


CUSTOMERS = ("Mercy Health System", "Lakeside Family Practice Group", "St. Brendan's Regional")

CONNECTIONS: tuple[DemoConnection, ...] = (
    DemoConnection(
        name="mercy-epic-prod",
        customer="Mercy Health System",
        vendor="epic",
        environment="prod",
        tenant="mercy-epic-prod",
        organization="Mercy Health System",
        mrn_system="https://fhir.mercy.example.org/sid/mrn",
        weight=34,
    ),
    DemoConnection(
        name="mercy-epic-tst",
        customer="Mercy Health System",
        vendor="epic",
        environment="test",
        tenant="mercy-epic-tst",
        organization="Mercy Health System (TST)",
        mrn_system="https://fhir.mercy.example.org/sid/mrn-tst",
        weight=8,
    ),
    DemoConnection(
        name="stbrendans-millennium-prod",
        customer="St. Brendan's Regional",
        vendor="oracle-health",
        environment="prod",
        tenant="stbrendans-millennium",
        organization="St. Brendan's Regional Medical Center",
        mrn_system="urn:oid:2.16.840.1.113883.3.9999.1.100",
        weight=26,
    ),
    # athena-like: this practice's instance does not take lab reports over FHIR.
    DemoConnection(
        name="lakeside-athena-prod",
        customer="Lakeside Family Practice Group",
        vendor="athenahealth",
        environment="prod",
        tenant="lakeside-athena",
        organization="Lakeside Family Practice - Main St",
        mrn_system="https://lakeside.example.org/sid/enterprise-id",
        weight=18,
        enabled_message_types=("MedicationRequest", "ServiceRequest", "Observation", "Encounter", "Patient"),
    ),
    # An acquired clinic on an older ambulatory EHR: no conditional create, no identifier search,
    # so an unknown outcome there needs a clinical lead's confirm_not_applied before a resubmit.
    DemoConnection(
        name="lakeside-ecw-prod",
        customer="Lakeside Family Practice Group",
        vendor="eclinicalworks",
        environment="prod",
        tenant="lakeside-ecw",
        organization="Lakeside Family Practice - Riverside Clinic",
        mrn_system="https://lakeside.example.org/sid/riverside-acct",
        weight=14,
        conditional_create=False,
        identifier_search=False,
    ),
    # HL7 v2 over MLLP through Mercy's interface engine: ADT, orders and results, no scheduling.
    # MLLP cannot be searched, so anything that may have arrived needs a lead's confirm_not_applied.
    DemoConnection(
        name="mercy-adt-mllp",
        customer="Mercy Health System",
        vendor="epic",
        environment="prod",
        tenant="mercy-adt",
        organization="Mercy Health System",
        mrn_system="MERCY",
        weight=10,
        conditional_create=False,
        identifier_search=False,
        enabled_message_types=("ADT^A01", "ADT^A04", "ADT^A08", "ORM^O01", "ORU^R01"),
        protocol=HL7_MLLP,
    ),
    DemoConnection(
        name="stbrendans-lab-mllp",
        customer="St. Brendan's Regional",
        vendor="oracle-health",
        environment="prod",
        tenant="stbrendans-lab",
        organization="St. Brendan's Regional Medical Center",
        mrn_system="STBRENDANS",
        weight=8,
        conditional_create=False,
        identifier_search=False,
        protocol=HL7_MLLP,
    ),
)
_CONN = {c.name: c for c in CONNECTIONS}
HL7_CONNS = tuple(c.name for c in CONNECTIONS if c.protocol == HL7_MLLP)

TYPE_WEIGHTS = {
    "MedicationRequest": 30,
    "ServiceRequest": 20,
    "Observation": 26,
    "DiagnosticReport": 10,
    "Encounter": 8,
    "Patient": 6,
}
HL7_TYPE_WEIGHTS = {"ADT^A01": 12, "ADT^A04": 10, "ADT^A08": 14, "ORM^O01": 12, "ORU^R01": 18, "SIU^S12": 6}
ALL_TYPE_WEIGHTS = {**TYPE_WEIGHTS, **HL7_TYPE_WEIGHTS}
ORDER_TYPES = ("MedicationRequest", "ServiceRequest")
WITH_SUBJECT = ("MedicationRequest", "ServiceRequest", "Observation", "DiagnosticReport", "Encounter")


# --------------------------------------------------------------------------- scenarios

# Paths: what happens after the exception opens (or after automatic retries give up).
RESUBMITTABLE = (
    ("open", 22),
    ("escalated", 8),
    ("pending", 8),
    ("replaying", 2),
    ("resolved", 26),
    ("replay_failed", 4),
    ("rejected", 4),
    ("discard", 18),
    ("escalated_discard", 3),
)
NOT_RESUBMITTABLE = (("open", 40), ("escalated", 15), ("discard", 40), ("escalated_discard", 5))
AUTO_RETRIED = (("retrying", 12), ("retry_recovered", 30), *RESUBMITTABLE)


@dataclass(frozen=True)
class Scenario:
    """One way a message goes: its first signal, the payload quirk, and what can follow."""

    name: str
    weight: int
    signal: str | None  # the first delivery's signal; None: refused at intake
    category: str  # of the exception it opens; "" when delivered
    types: tuple[str, ...] = tuple(TYPE_WEIGHTS)
    quirk: str | None = None  # a seed.corpus quirk
    paths: tuple[tuple[str, int], ...] = RESUBMITTABLE
    discard: tuple[str, ...] = ("superseded", "other")  # reason codes that fit
    conns: tuple[str, ...] = ()  # connections it happens on; empty: any of its protocol, by weight
    protocol: str = FHIR_R4
    report: str | None = None  # an interface engine reports it (POST /exceptions) with this error


MR, SR, OBS = ("MedicationRequest",), ("ServiceRequest",), ("Observation",)
MANUAL = ("applied_manually", "superseded")
LANDED = ("applied_manually", "duplicate")
DUPLICATE_PATHS = (("open", 30), ("escalated", 10), ("discard", 50), ("rejected", 5), ("resolved", 5))
WITH_412 = ("mercy-epic-prod", "stbrendans-millennium-prod", "lakeside-athena-prod")  # conditional create

# fmt: off
SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("delivered", 62, "created", "", paths=()),
    Scenario("delivered_bom", 3, "created", "", quirk="bom", paths=()),
    Scenario("transport_refused", 10, "refused", "transport", paths=AUTO_RETRIED, discard=MANUAL),
    Scenario("transport_tls", 4, "tls", "transport", paths=AUTO_RETRIED, discard=("superseded",)),
    Scenario("transport_dns", 3, "dns", "transport", paths=AUTO_RETRIED, discard=("superseded",)),
    Scenario("unavailable_503", 8, "503", "ehr_unavailable", paths=AUTO_RETRIED, discard=MANUAL),
    Scenario("throttled_429", 5, "429", "ehr_unavailable", paths=AUTO_RETRIED, discard=("superseded",)),
    Scenario("error_500", 7, "500", "ehr_unavailable", paths=AUTO_RETRIED, discard=MANUAL),
    Scenario("rejected_dosage", 7, "422_dosage", "ehr_rejected", MR, "no_dosage", discard=MANUAL),
    Scenario("rejected_prescriber", 6, "422_prescriber", "ehr_rejected", MR, "prescriber", discard=MANUAL),
    Scenario("rejected_merged", 5, "422_merged", "ehr_rejected", WITH_SUBJECT, "merged", discard=("patient_merged",)),
    Scenario("code_set_icd9", 9, None, "code_set", ("ServiceRequest", "Encounter"), "icd9", discard=("superseded",)),
    Scenario("code_set_ndc", 5, "422_ndc", "code_set", MR, "ndc", discard=("superseded",)),
    Scenario("code_set_local_lab", 5, "422_local", "code_set", OBS, "local_lab"),
    Scenario("unknown_timeout", 10, "timeout", "unknown_outcome", discard=LANDED),
    Scenario("unknown_dropped", 7, "dropped", "unknown_outcome", discard=LANDED),
    Scenario("malformed_html", 5, "html", "malformed_response", discard=LANDED),
    Scenario("malformed_202", 3, "202", "malformed_response", discard=("applied_manually",)),
    Scenario("malformed_truncated", 3, "truncated201", "malformed_response", discard=LANDED),
    Scenario("duplicate_409", 7, "409", "duplicate_suspected", paths=DUPLICATE_PATHS, discard=("duplicate",)),
    Scenario("duplicate_412", 3, "412", "duplicate_suspected", paths=(("open", 40), ("discard", 60)),
             discard=("duplicate",), conns=WITH_412),
    Scenario("auth_expired", 7, "401", "auth", discard=("superseded",)),
    Scenario("auth_scope", 4, "403", "auth", ORDER_TYPES),
    Scenario("config_404", 3, "404", "config", paths=NOT_RESUBMITTABLE, discard=("other",)),
    Scenario("config_type_disabled", 5, None, "config", ("DiagnosticReport",), paths=NOT_RESUBMITTABLE,
             discard=("other",), conns=("lakeside-athena-prod",)),
    Scenario("data_shape_truncated", 5, None, "data_shape", quirk="truncated"),
    Scenario("data_shape_cp1252", 5, None, "data_shape", WITH_SUBJECT, "cp1252"),
    Scenario("data_shape_mismatch", 3, None, "data_shape", MR, "mismatch", NOT_RESUBMITTABLE, discard=("other",)),
    Scenario("data_shape_missing", 5, "validation", "data_shape", WITH_SUBJECT, "missing"),
    Scenario("data_shape_bad_date", 3, "validation", "data_shape", MR, "bad_date", discard=("superseded",)),
)}
# fmt: on

# HL7 v2 over MLLP (seed.hl7_corpus payloads): what the simulator's MLLP half answers (signals
# "mllp_*", played through the real adapter, see _Runner._settle), what intake refuses, and what the
# interface engine reports itself through POST /exceptions. Quirks are seed.hl7_corpus's own.
HL7_TYPES = tuple(HL7_TYPE_WEIGHTS)
ADT = ("ADT^A01", "ADT^A04", "ADT^A08")
WITH_DG1 = hl7_corpus.WITH_DG1
REPORT_ICD9 = "Receiving interface rejected DG1-3: ICD-9 code system (I9C) is not accepted; send ICD-10-CM"
REPORT_DUPLICATE = "Duplicate message: the EHR interface says this visit number was already processed"
REPORT_UNAVAILABLE = (
    "503 Service Unavailable from the EHR's inbound HL7 listener; channel queued, then gave up"
)


def _hl7(name, weight, signal, category, types=HL7_TYPES, quirk=None, **kw) -> Scenario:
    return Scenario(name, weight, signal, category, types, quirk, protocol=HL7_MLLP,
                    conns=kw.pop("conns", HL7_CONNS), **kw)  # fmt: skip


# fmt: off
for _scenario in (
    _hl7("hl7_delivered", 24, "mllp_aa", "", paths=()),
    _hl7("hl7_delivered_latin1", 3, "mllp_aa", "", quirk="latin1_declared", paths=()),
    _hl7("hl7_refused", 5, "mllp_refused", "transport", paths=AUTO_RETRIED, discard=MANUAL),
    _hl7("hl7_no_ack", 5, "mllp_no_ack", "unknown_outcome", discard=LANDED),
    _hl7("hl7_late_ack", 3, "mllp_late_ack", "unknown_outcome", discard=LANDED),
    _hl7("hl7_reset", 2, "mllp_reset", "unknown_outcome", discard=LANDED),
    _hl7("hl7_wrong_msa2", 2, "mllp_wrong_msa2", "malformed_response", discard=LANDED),
    _hl7("hl7_ae_pid3", 4, "mllp_ae", "ehr_rejected", ADT, "empty_pid3", discard=("superseded",)),
    _hl7("hl7_ar", 2, "mllp_ar", "ehr_rejected", discard=("superseded", "other")),
    _hl7("hl7_mojibake", 3, None, "data_shape", quirk="double_encoded_utf8", discard=("superseded",)),
    _hl7("hl7_batch_file", 1, None, "data_shape", ("ADT^A04",), "batch_file", paths=NOT_RESUBMITTABLE, discard=("other",)),
    _hl7("hl7_type_disabled", 2, None, "config", ("SIU^S12",), paths=NOT_RESUBMITTABLE, discard=("other",),
         conns=("mercy-adt-mllp",)),
    _hl7("hl7_code_set_icd9", 3, None, "code_set", WITH_DG1, "dg1_icd9", discard=("superseded",)),
    _hl7("hl7_reported_icd9", 3, None, "code_set", WITH_DG1, "dg1_icd9", report=REPORT_ICD9, discard=("superseded",)),
    _hl7("hl7_reported_duplicate", 2, None, "duplicate_suspected", ADT, report=REPORT_DUPLICATE,
         paths=DUPLICATE_PATHS, discard=("duplicate",)),
    _hl7("hl7_reported_503", 2, None, "ehr_unavailable", report=REPORT_UNAVAILABLE, discard=MANUAL),
):
    SCENARIOS[_scenario.name] = _scenario
# fmt: on

# (scenario, path, connection or None): each appears at least once, so every category, every
# state, every discard reason code and every interesting flow is in the demo.
# fmt: off
REQUIRED: tuple[tuple[str, str, str | None], ...] = (
    ("delivered", "delivered", None),
    ("delivered", "delivered", "stbrendans-millennium-prod"),
    ("delivered_bom", "delivered", None),
    ("transport_refused", "retrying", "mercy-epic-prod"),
    ("transport_refused", "retry_recovered", None),
    ("unavailable_503", "retrying", "stbrendans-millennium-prod"),
    ("throttled_429", "open", None),
    ("transport_tls", "open", "lakeside-athena-prod"),
    ("error_500", "open", "lakeside-ecw-prod"),
    ("rejected_dosage", "resolved", "mercy-epic-prod"),
    ("rejected_prescriber", "pending", None),
    ("rejected_merged", "discard:patient_merged", None),
    ("code_set_icd9", "resolved", "mercy-epic-prod"),
    ("code_set_icd9", "open", None),
    ("code_set_ndc", "rejected", None),
    ("code_set_local_lab", "escalated", None),
    ("unknown_timeout", "confirm_only", "lakeside-ecw-prod"),
    ("unknown_timeout", "resolved", "lakeside-ecw-prod"),
    ("unknown_timeout", "open", "lakeside-ecw-prod"),
    ("unknown_dropped", "resolved", "mercy-epic-prod"),
    ("unknown_timeout", "replaying", "stbrendans-millennium-prod"),
    ("malformed_html", "open", None),
    ("malformed_202", "discard:applied_manually", None),
    ("duplicate_409", "discard:duplicate", None),
    ("duplicate_412", "open", None),
    ("auth_expired", "replay_failed", "stbrendans-millennium-prod"),
    ("auth_scope", "escalated", None),
    ("config_404", "open", None),
    ("config_type_disabled", "discard:other", None),
    ("data_shape_truncated", "resolved", None),
    ("data_shape_cp1252", "pending", None),
    ("data_shape_cp1252", "open", None),
    ("data_shape_mismatch", "discard:other", None),
    ("data_shape_missing", "open", None),
    ("data_shape_bad_date", "escalated_discard", None),
    ("error_500", "discard:superseded", None),
    ("unavailable_503", "discard:test_message", "mercy-epic-tst"),
    # HL7 v2 over MLLP: every category it can reach, and its flows.
    ("hl7_delivered", "delivered", "mercy-adt-mllp"),
    ("hl7_delivered", "delivered", "stbrendans-lab-mllp"),
    ("hl7_delivered_latin1", "delivered", None),
    ("hl7_refused", "retrying", None),
    ("hl7_refused", "retry_recovered", None),
    ("hl7_no_ack", "confirm_only", None),
    ("hl7_no_ack", "resolved", None),
    ("hl7_late_ack", "open", None),
    ("hl7_reset", "discard:applied_manually", None),
    ("hl7_wrong_msa2", "open", None),
    ("hl7_ae_pid3", "resolved", None),
    ("hl7_ar", "escalated", None),
    ("hl7_mojibake", "pending", None),
    ("hl7_batch_file", "discard:other", None),
    ("hl7_type_disabled", "open", None),
    ("hl7_code_set_icd9", "resolved", None),
    ("hl7_reported_icd9", "open", None),
    ("hl7_reported_duplicate", "discard:duplicate", None),
    ("hl7_reported_503", "open", None),
)
# fmt: on

# Signals whose category the planner must know before the outcome exists.
SIGNAL_CATEGORY = {
    "created": None,
    "created_200": None,
    "found": None,
    "refused": "transport",
    "tls": "transport",
    "dns": "transport",
    "503": "ehr_unavailable",
    "429": "ehr_unavailable",
    "500": "ehr_unavailable",
    "422_dosage": "ehr_rejected",
    "422_prescriber": "ehr_rejected",
    "422_merged": "ehr_rejected",
    "422_icd9": "code_set",
    "422_ndc": "code_set",
    "422_local": "code_set",
    "timeout": "unknown_outcome",
    "dropped": "unknown_outcome",
    "search_failed": "unknown_outcome",
    "html": "malformed_response",
    "202": "malformed_response",
    "truncated201": "malformed_response",
    "409": "duplicate_suspected",
    "412": "duplicate_suspected",
    "401": "auth",
    "403": "auth",
    "404": "config",
    "validation": "data_shape",
    "mllp_aa": None,
    "mllp_refused": "transport",
    "mllp_no_ack": "unknown_outcome",
    "mllp_late_ack": "unknown_outcome",
    "mllp_reset": "unknown_outcome",
    "mllp_wrong_msa2": "malformed_response",
    "mllp_ae": "ehr_rejected",
    "mllp_ar": "ehr_rejected",
}
# MLLP answers after which the message may have been applied (the receiver cannot be searched).
MLLP_MAY_HAVE_APPLIED = ("mllp_no_ack", "mllp_late_ack", "mllp_reset", "mllp_wrong_msa2")
RETRY_AFTER = {"503": 600.0, "429": 30.0}
MAX_AUTO_RETRIES = 3  # the connection default
RETRY_BACKOFF = 30.0  # the connection default

# --------------------------------------------------------------------------- what people write

COMMENTS = {
    "transport": (
        "Site-to-site VPN to the customer data center flapped overnight; network team ticket NET-2291.",
        "Their load balancer certificate expired at 00:00 UTC; customer IT renewing.",
        "DNS for the FHIR host changed during their cutover; waiting on the new CNAME.",
    ),
    "ehr_unavailable": (
        "Customer confirmed a scheduled maintenance window; interfaces back at 04:00 local.",
        "Vendor status page shows degraded FHIR services for this region.",
        "Throttled during their morning batch; volume is back to normal now.",
    ),
    "ehr_rejected": (
        "EHR refuses it on a site rule; checked the OperationOutcome, not a transient problem.",
        "Called the pharmacy informatics desk: the prescriber's credentialing is pending at this site.",
        "The subject points at a merged-away chart; HIM confirmed the surviving MRN.",
    ),
    "code_set": (
        "ICD-9 code from the legacy problem list; this instance only accepts ICD-10-CM.",
        "Order catalogue matches on RxNorm only; the NDC is the dispensed package.",
        "Reference lab test not yet mapped to LOINC in their compendium.",
    ),
    "unknown_outcome": (
        "Request timed out after it was sent; the order may be in the chart. Need to check before any replay.",
        "Connection dropped mid-response. Asked the clinic to look for the order in the chart.",
    ),
    "malformed_response": (
        "Got a remote-access login page instead of FHIR: their reverse proxy session expired.",
        "202 with no Location: we cannot tell what was created.",
        "Response body cut off; the resource may exist.",
    ),
    "data_shape": (
        "Payload is not valid UTF-8; looks like Windows-1252 from the desktop export tool.",
        "JSON is cut off mid-document; the interface engine truncated it.",
        "Our validation refused it before sending; the product build dropped a required element.",
    ),
    "duplicate_suspected": (
        "EHR says this identifier already exists; the first attempt probably landed.",
        "If-None-Exist matched more than one resource; someone entered it twice by hand.",
    ),
    "auth": (
        "Client secret was rotated by the customer's IAM team; new secret loaded into the vault.",
        "Our client lacks the write scope at this site; access request filed with customer IT.",
    ),
    "config": (
        "Message type is not enabled on this connection; asked the customer whether they want it.",
        "Endpoint path 404s: the base URL changed in their last upgrade.",
    ),
}
ESCALATIONS = {
    "high": (
        "Medication/order message stuck; needs a clinical decision on whether to replay.",
        "Not sure this is safe to resend: the patient may already have the order. Escalating.",
        "Customer asks for clinical sign-off before we touch this one.",
    ),
    "normal": (
        "Result may belong to a different encounter; needs a clinician's look before we resend.",
        "Customer asks for clinical sign-off before we touch this one.",
    ),
}
LEAD_NOTES = (
    "Looking at it with the charge nurse now.",
    "Spoke with the ordering provider; holding until the clinic confirms.",
    "Will decide after the customer's IT call at 15:00.",
)
RESUBMIT_REASONS = {
    "transport": "Network path restored; the first attempt provably never reached the EHR.",
    "ehr_unavailable": "EHR is back after the maintenance window; resend the original.",
    "unknown_outcome": "Clinic checked the chart: the order is not there. Resend.",
    "malformed_response": "Checked the chart with the clinic: not filed. Resend the original.",
    "auth": "Credentials fixed; resend the original message.",
    "duplicate_suspected": "Second look: the existing resource is a different order; resend.",
}
CORRECTION_REASONS = {
    "empty_pid3": "Filled PID-3 with the MRN from the registration system; the receiver requires it.",
    "double_encoded_utf8": "Undid the engine's double encoding (UTF-8 read as Windows-1252); name checked against the chart.",
    "dg1_icd9": "Mapped the DG1 diagnosis from ICD-9-CM to its ICD-10-CM equivalent.",
    "icd9": "Mapped ICD-9-CM reason to its ICD-10-CM equivalent.",
    "ndc": "Replaced the NDC package code with the RxNorm clinical drug.",
    "local_lab": "Added the LOINC code for the lab's local test code.",
    "no_dosage": "Added structured dosage instructions from the prescriber's note.",
    "prescriber": "Resubmitted under the covering prescriber, per the clinic.",
    "merged": "Pointed the subject at the surviving patient record after the merge.",
    "truncated": "Recovered the complete message from the interface engine archive.",
    "cp1252": "Re-encoded the Windows-1252 export as UTF-8; names checked against the chart.",
    "missing": "Restored the required element the product build dropped.",
    "bad_date": "Converted the US-style date to ISO 8601.",
}
REJECT_REASONS = (
    "The EHR already holds an equivalent order; replaying would duplicate it.",
    "Correction is incomplete: the dose unit still does not match the order catalogue.",
    "Wait for the customer to confirm the code mapping before replaying.",
)
DISCARD_REASONS = {
    "duplicate": "EHR already holds this order from the first attempt; nothing to replay.",
    "superseded": "Prescriber placed a newer order that replaces this one.",
    "applied_manually": "Clinic staff entered it by hand during the outage (confirmed by phone).",
    "test_message": "Interface test message sent to the TST environment during go-live checks.",
    "patient_merged": "Patient charts were merged; the clinic re-placed the order on the surviving chart.",
    "other": "Customer asked us to drop this message; see the linked ticket.",
}
# Discards with reason code "other" need their own words, per scenario.
OTHER_REASONS = {
    "data_shape_mismatch": "Not an order: the product sent a home-medication statement down the order channel (ORD-4412).",
    "config_type_disabled": "Practice does not take lab reports over FHIR; they get them by fax (LAK-118).",
    "config_404": "Sent to the pre-upgrade base URL; the clinic re-entered it after the endpoint was fixed.",
    "code_set_local_lab": "Reference lab retired this test code; the result was re-reported under the new test.",
}
MLLP_CONFIRM_REASONS = (
    "Interface analyst checked the EHR's inbound HL7 log: no message with this MSH-10. Safe to resend.",
    "Searched the receiving system's message archive for the control id: not received.",
)
CONFIRM_REASONS = (
    "Called the Riverside clinic: the order is not in the chart. Safe to resend.",
    "Clinic searched the patient's orders for the last 24h: not applied.",
)


# --------------------------------------------------------------------------- result


@dataclass
class DemoResult:
    """What `load_demo` did (or found): logins, the service token and counts."""

    created: bool
    logins: list[tuple[str, str, str]]  # (username, role, password)
    service_token: str | None  # bearer token of orders-service; None when the demo already existed
    service_tokens: dict[str, str]
    messages: int
    delivered: int
    by_category: dict[str, int]  # exceptions per category (all states)
    by_state: dict[str, int]  # exceptions per state
    by_sla: dict[str, int]  # non-final exceptions per SLA status at `now`
    now: datetime
    by_protocol: dict[str, dict[str, int]] = field(default_factory=dict)  # protocol -> category -> n


# --------------------------------------------------------------------------- the story model


@dataclass
class _Step:
    gap: float  # seconds after the previous step of the same story
    kind: str
    args: dict[str, Any] = field(default_factory=dict)
    restarts_sla: bool = False
    signal: str | None = None
    outcome: Outcome | None = None
    at: datetime | None = None


@dataclass
class _Story:
    index: int
    scenario: Scenario
    path: str
    conn: DemoConnection
    client: str
    message_type: str
    key: str
    risk: str
    steps: list[_Step] = field(default_factory=list)
    band: str | None = None  # on_track / at_risk / breached for items left open
    category: str = ""  # the exception's category as the story stands
    body: dict | None = None
    corrected: str | None = None
    ctx: corpus.Context | None = None
    needs_confirm: bool = False  # its exception will wait for a lead's confirm_not_applied
    # filled in while running
    message_id: str | None = None
    exception_id: int | None = None
    attempt_id: int | None = None
    replay_id: int | None = None

    @property
    def final(self) -> bool:
        return self.path in ("delivered", "resolved", "retry_recovered") or "discard" in self.path


class _Planner:
    """Turns (seed, size) into stories with timed steps. No database access."""

    def __init__(self, rng: random.Random, now: datetime, floor: datetime, policy: SlaPolicy, base_url: str):
        self.rng = rng
        self.now = now
        self.floor = floor
        self.policy = policy
        self.base_url = base_url

    # -- choosing

    def _weighted(self, pairs):
        items = list(pairs)
        return self.rng.choices([i for i, _ in items], weights=[w for _, w in items])[0]

    def recipes(self, size: int) -> list[tuple[str, str, str | None]]:
        out = list(REQUIRED)
        names = list(SCENARIOS)
        while len(out) < size:
            scenario = SCENARIOS[self.rng.choices(names, weights=[SCENARIOS[n].weight for n in names])[0]]
            path = self._weighted(scenario.paths) if scenario.paths else "delivered"
            out.append((scenario.name, path, None))
        self.rng.shuffle(out)
        return out

    def plan(self, size: int) -> list[_Story]:
        stories = [self._story(i, *recipe) for i, recipe in enumerate(self.recipes(size))]
        forced = ["breached", "at_risk", "on_track"]  # at least one of each
        for story in stories:
            if story.final:
                continue
            if story.path in ("retrying", "replaying"):  # both are minutes old by nature
                story.band = "on_track"
            elif forced:
                story.band = forced.pop(0)
            else:
                story.band = self._weighted((("on_track", 70), ("at_risk", 12), ("breached", 18)))
        for story in stories:
            self._schedule(story)
            self._materialize(story)
        return stories

    def _story(self, index: int, scenario_name: str, path: str, conn_name: str | None) -> _Story:
        scenario = SCENARIOS[scenario_name]
        rng = self.rng
        if conn_name is None:
            pool = [
                c
                for c in CONNECTIONS
                if c.protocol == scenario.protocol and (not scenario.conns or c.name in scenario.conns)
            ]
            if scenario.category == "unknown_outcome":  # enough of them on the no-search connection
                weights = [c.weight * (3 if not c.identifier_search else 1) for c in pool]
            else:
                weights = [c.weight for c in pool]
            conn = rng.choices(pool, weights=weights)[0]
        else:
            conn = _CONN[conn_name]
        types = [t for t in scenario.types if t in ALL_TYPE_WEIGHTS]
        if conn.enabled_message_types and scenario.category != "config":
            types = [t for t in types if t in conn.enabled_message_types] or [
                "ADT^A08" if conn.protocol == HL7_MLLP else "MedicationRequest"
            ]
        message_type = rng.choices(types, weights=[ALL_TYPE_WEIGHTS[t] for t in types])[0]
        client = "orders-service" if message_type in ORDER_TYPES else "interface-engine"
        if client == "orders-service":
            key = f"ord-{conn.tenant}-{index:05d}-{rng.getrandbits(32):08x}"
        else:
            key = f"ie-{conn.tenant}-{rng.randint(100000, 999999)}-{index:05d}"
        story = _Story(
            index,
            scenario,
            path,
            conn,
            client,
            message_type,
            key,
            clinical_risk(message_type),
            category=scenario.category,
        )
        if scenario.protocol == HL7_MLLP:  # MLLP cannot be searched: uncertain means a lead confirms
            story.needs_confirm = (
                categorize_reported_error(scenario.report)[1]
                if scenario.report
                else scenario.signal in MLLP_MAY_HAVE_APPLIED
            )
        self._steps(story)
        return story

    # -- steps

    def _add(self, story: _Story, gap: float, kind: str, **kw) -> _Step:
        step = _Step(gap, kind, **kw)
        story.steps.append(step)
        return step

    def _latency(self, signal: str) -> float:
        if signal in ("timeout", "mllp_late_ack"):  # the read (ACK) timeout
            return 30.0
        if signal in ("refused", "dns", "validation", "mllp_refused"):  # refused locally or at once
            return self.rng.uniform(0.002, 0.05)
        return self.rng.uniform(0.08, 2.5)

    def _auto_retried(self, story: _Story, signal: str) -> bool:
        category = SIGNAL_CATEGORY[signal]
        if category == "transport":
            return True
        if category == "ehr_unavailable":
            return signal in RETRY_AFTER or story.conn.conditional_create
        return False

    def _steps(self, story: _Story) -> None:
        rng, scenario = self.rng, story.scenario
        if scenario.signal is None:  # refused at intake: the exception opens with the message
            self._add(story, 0, "intake", restarts_sla=True)
        else:
            self._add(story, 0, "intake")
            signal = scenario.signal
            ok = "mllp_aa" if story.conn.protocol == HL7_MLLP else "created"
            retried = signal != ok and self._auto_retried(story, signal)
            self._add(
                story,
                rng.uniform(0.2, 1.5) + self._latency(signal),
                "deliver",
                signal=signal,
                restarts_sla=signal != ok,
                args={"retried": retried},
            )
            if signal == ok:
                return
            if retried:
                if story.path == "retrying":
                    self._retries(story, signal, failures=rng.randint(0, 2), then=None)
                    return
                if story.path == "retry_recovered":
                    self._retries(story, signal, failures=rng.randint(0, 2), then=ok)
                    return
                self._retries(story, signal, failures=MAX_AUTO_RETRIES, then=None)
        self._human(story)

    def _retries(self, story: _Story, signal: str, *, failures: int, then: str | None) -> None:
        """Automatic retries as the worker runs them: backoff 30 s * 2^n, Retry-After honoured."""
        signals = [signal] * failures + ([then] if then else [])
        for n, sig in enumerate(signals):
            delay = max(RETRY_BACKOFF * (2**n), RETRY_AFTER.get(signals[n - 1] if n else signal, 0.0))
            exhausted = sig not in ("created", "mllp_aa") and n + 1 >= MAX_AUTO_RETRIES
            step = self._add(story, delay + self._latency(sig), "retry", signal=sig, restarts_sla=exhausted)
            step.args["exhausted"] = exhausted
        if not then and failures < MAX_AUTO_RETRIES:
            story.steps[-1].args["pending_retry"] = True  # stays retrying; next retry after `now`

    def _human(self, story: _Story) -> None:
        rng, path = self.rng, story.path
        minutes = lambda lo, hi: rng.uniform(lo, hi) * 60  # noqa: E731
        category = story.category
        notes = COMMENTS.get(category, ("Looking into it.",))

        def decision(actor: str, gap: float, action: str, **kw) -> _Step:
            return self._add(story, gap, "decide", args={"actor": actor, "input": {"action": action, **kw}})

        if path == "open":
            roll = rng.random()
            if roll < 0.35:
                who = rng.choice(REVIEWERS)
                decision(who, minutes(3, 40), "claim")
                if rng.random() < 0.5:
                    decision(who, minutes(1, 10), "comment", reason=rng.choice(notes))
            elif roll < 0.55:
                who = rng.choice(REVIEWERS)
                decision(rng.choice(LEADS), minutes(5, 45), "assign", assignee=who)
                if rng.random() < 0.3:
                    decision(who, minutes(2, 20), "comment", reason=rng.choice(notes))
            elif roll < 0.65:
                decision(rng.choice(REVIEWERS + LEADS), minutes(5, 60), "comment", reason=rng.choice(notes))
            return
        if path == "escalated":
            who = rng.choice(REVIEWERS)
            decision(who, minutes(3, 30), "claim")
            if rng.random() < 0.5:
                decision(who, minutes(1, 10), "comment", reason=rng.choice(notes))
            decision(who, minutes(2, 20), "escalate", reason=rng.choice(ESCALATIONS[story.risk]))
            if rng.random() < 0.3:  # the auditor samples escalations; reading a payload is audited
                self._add(story, minutes(10, 120), "view_payload", args={"actor": "audrey"})
            if rng.random() < 0.4:
                decision(rng.choice(LEADS), minutes(5, 40), "comment", reason=rng.choice(LEAD_NOTES))
            return
        if path == "confirm_only":
            decision(
                rng.choice(LEADS),
                minutes(5, 40),
                "confirm_not_applied",
                reason=rng.choice(self._confirm_reasons(story)),
            )
            return
        if path.startswith("discard") or path == "escalated_discard":
            code = path.split(":", 1)[1] if ":" in path else self._discard_code(story)
            text = DISCARD_REASONS[code]
            if code == "other":
                text = OTHER_REASONS.get(story.scenario.name, text)
            if path == "escalated_discard":
                decision(
                    rng.choice(REVIEWERS),
                    minutes(5, 30),
                    "escalate",
                    reason=rng.choice(ESCALATIONS[story.risk]),
                )
                decision(rng.choice(LEADS), minutes(10, 90), "discard", reason_code=code, reason=text)
                return
            who = rng.choice(REVIEWERS + LEADS)
            if rng.random() < 0.6:
                decision(who, minutes(3, 30), "claim")
            decision(who, minutes(2, 25), "discard", reason_code=code, reason=text)
            return
        # resubmit paths: pending, replaying, resolved, replay_failed, rejected
        requester = rng.choice(REVIEWERS + REVIEWERS + LEADS)
        approver = rng.choice([lead for lead in LEADS if lead != requester])
        if rng.random() < 0.6:
            decision(requester, minutes(3, 30), "claim")
        if story.needs_confirm or (category == "unknown_outcome" and not story.conn.identifier_search):
            confirmer = rng.choice(LEADS)
            decision(
                confirmer,
                minutes(5, 40),
                "confirm_not_applied",
                reason=rng.choice(self._confirm_reasons(story)),
            )
        if story.scenario.quirk in CORRECTION_REASONS:
            self._add(story, minutes(1, 8), "view_payload", args={"actor": requester})
            decision(
                requester,
                minutes(2, 15),
                "resubmit_corrected",
                reason=CORRECTION_REASONS[story.scenario.quirk],
            )
        else:
            reason = RESUBMIT_REASONS.get(category, "Cause fixed; resend the original.")
            decision(requester, minutes(2, 20), "resubmit", reason=reason)
        if path == "pending":
            return
        if path == "rejected":
            decision(approver, minutes(5, 60), "reject", reason=rng.choice(REJECT_REASONS))
            if rng.random() < 0.4:
                decision(
                    requester, minutes(3, 30), "comment", reason="Understood; following up with the customer."
                )
            return
        decision(approver, minutes(5, 90), "approve", reason="Reviewed the payload and the attempt history.")
        if path == "replaying":
            self._add(story, rng.uniform(0.5, 4), "replay_claim")
            return
        if path == "resolved":
            found = (
                story.conn.identifier_search
                and category in ("unknown_outcome", "malformed_response", "duplicate_suspected")
                and rng.random() < 0.7
            )
            signal = "found" if found else self._created(story)
            self._add(story, rng.uniform(0.5, 4) + self._latency(signal), "replay_finish", signal=signal)
            return
        # replay_failed: the replay itself fails and the item reopens under the new category
        choices = ["401", "500", "timeout"]
        if story.conn.identifier_search:
            choices.append("search_failed")
        if story.message_type == "MedicationRequest" and story.scenario.quirk is None:
            choices.append("422_prescriber")
        if story.conn.protocol == HL7_MLLP:
            choices = ["mllp_no_ack", "mllp_ar", "mllp_refused"]
        signal = rng.choice(choices)
        self._add(
            story,
            rng.uniform(0.5, 4) + self._latency(signal),
            "replay_finish",
            signal=signal,
            restarts_sla=True,
        )

    @staticmethod
    def _confirm_reasons(story: _Story) -> tuple[str, ...]:
        return MLLP_CONFIRM_REASONS if story.conn.protocol == HL7_MLLP else CONFIRM_REASONS

    def _created(self, story: _Story) -> str:
        if story.conn.protocol == HL7_MLLP:
            return "mllp_aa"
        return "created_200" if story.conn.vendor == "oracle-health" else "created"

    def _discard_code(self, story: _Story) -> str:
        if story.conn.environment == "test":
            return "test_message"
        return self.rng.choice(story.scenario.discard)

    # -- time

    def _restart_category(self, story: _Story, step: _Step) -> str:
        if step.kind == "intake":
            return story.scenario.category
        return SIGNAL_CATEGORY[step.signal] or story.scenario.category

    def _schedule(self, story: _Story) -> None:
        """Give every step a time: the last SLA (re)start lands where the story's band needs it."""
        rng, now, steps = self.rng, self.now, story.steps
        anchor = max((i for i, s in enumerate(steps) if s.restarts_sla), default=0)
        if steps[anchor].restarts_sla:
            story.category = self._restart_category(story, steps[anchor])
        margin = timedelta(seconds=rng.uniform(15, 120))
        if story.band is None:  # final: anywhere in the last three days
            anchor_at = now - timedelta(hours=rng.uniform(0.5, HISTORY.total_seconds() / 3600 - 1))
        else:
            window = self.policy.window(story.category, story.risk, None)
            if story.band == "breached":  # mostly recently overdue, a few stragglers from days ago
                overdue = timedelta(minutes=5) + timedelta(hours=60) * rng.random() ** 2
                anchor_at = now - window - overdue
            else:
                fraction = rng.uniform(0.05, 0.55) if story.band == "on_track" else rng.uniform(0.8, 0.88)
                anchor_at = now - window * fraction
        times: list[datetime | None] = [None] * len(steps)
        times[anchor] = anchor_at
        for i in range(anchor - 1, -1, -1):
            times[i] = times[i + 1] - timedelta(seconds=steps[i + 1].gap)
        forward = sum(s.gap for s in steps[anchor + 1 :])
        room = (now - margin - anchor_at).total_seconds()
        scale = 1.0
        if forward > 0 and forward > room:
            if story.band is None:  # a finished story: move the whole story earlier
                shift = timedelta(seconds=forward - room)
                times = [t - shift if t else None for t in times]
            else:  # an open story: squeeze what happened since the SLA started
                scale = max(room, 1.0) / forward
        for i in range(anchor + 1, len(steps)):
            times[i] = times[i - 1] + timedelta(seconds=steps[i].gap * scale)
        for step, at in zip(steps, times, strict=True):
            step.at = max(at, self.floor)

    # -- payloads and outcomes

    def _materialize(self, story: _Story) -> None:
        if story.conn.protocol == HL7_MLLP:
            self._materialize_hl7(story)
            return
        rng, scenario = self.rng, story.scenario
        story.ctx = ctx = self._context(story)
        mt, quirk = story.message_type, scenario.quirk
        text = raw = None
        corrected = None
        if quirk == "icd9":
            bad, fixed = corpus.icd9_reason(ctx, rng, mt)
        elif quirk == "ndc":
            bad, fixed = corpus.ndc_instead_of_rxnorm(ctx, rng)
        elif quirk == "local_lab":
            bad, fixed = corpus.local_lab_code(ctx, rng)
        elif quirk == "no_dosage":
            bad, fixed = corpus.no_dosage_instruction(ctx, rng)
        elif quirk == "prescriber":
            bad, fixed = corpus.prescriber_not_active(ctx, rng)
        elif quirk == "merged":
            bad, fixed = corpus.merged_patient(ctx, rng, mt)
        elif quirk == "missing":
            bad, fixed = corpus.missing_required_field(ctx, rng, mt)
        elif quirk == "bad_date":
            bad, fixed = corpus.unusual_date_format(ctx, rng)
        elif quirk == "mismatch":
            bad, fixed = corpus.mismatched_resource_type(ctx, rng), None
        else:
            bad = fixed = corpus.well_formed(mt, ctx, rng)
        if quirk == "truncated":
            raw = corpus.truncated_json(bad, rng)
        elif quirk == "cp1252":
            raw = corpus.windows_1252_bytes(bad)
        elif quirk == "bom":
            text = corpus.with_bom(bad)
        else:
            text = corpus.to_text(bad)
        if quirk in CORRECTION_REASONS and fixed is not None:
            corrected = json.dumps(fixed, ensure_ascii=False, indent=2)
        story.body = corpus.submit_body(story.conn.name, mt, text=text, raw=raw)
        story.corrected = corrected
        for step in story.steps:
            if step.signal:
                step.outcome = self._outcome(story, step.signal, text or "", step.at)
            if step.kind == "decide" and step.args["input"]["action"] == "resubmit_corrected":
                step.args["input"]["payload"] = corrected
            if step.kind == "decide" and step.args["input"]["action"] == "approve":
                step.args["input"]["password"] = DEMO_PASSWORD

    def _materialize_hl7(self, story: _Story) -> None:
        """An HL7 v2 message from seed.hl7_corpus, addressed to the connection's simulator tenant
        (MSH-6); for a correctable quirk, the same message without it is the correction."""
        rng, scenario, conn = self.rng, story.scenario, story.conn
        quirk = scenario.quirk
        corrected = None
        if quirk == "batch_file":  # a whole batch file (FHS/BHS ... BTS/FTS) posted as one message
            raw = hl7_corpus.PUBLISHED_SAMPLES[1].raw
        else:
            quirks = [quirk] if quirk else []
            if scenario.signal == "mllp_aa" and rng.random() < 0.3:  # harmless production flavour
                quirks.append(rng.choice(("z_segment", "date_offset", "crlf_terminators")))
            pool = hl7_corpus.patients_for(quirks)
            if quirk == "double_encoded_utf8":  # Latin names: the damage reads as "MÃ¼ller"
                pool = tuple(p for p in pool if p.key not in hl7_corpus.NATIVE_NAMES)
            patient = rng.choice(pool)
            parties = hl7_corpus.Parties(
                sending_application="RECON",
                sending_facility=conn.mrn_system,
                receiving_application="EHR",
                receiving_facility=conn.tenant.upper(),
            )
            state = rng.getstate()
            bad = hl7_corpus.build_message(
                story.message_type, rng, quirks=quirks, patient=patient, parties=parties
            )
            raw = bad.raw
            if quirk in CORRECTION_REASONS:  # the same draws without the quirk: only it differs
                again = random.Random()
                again.setstate(state)
                fixed = hl7_corpus.build_message(
                    story.message_type,
                    again,
                    quirks=[q for q in quirks if q != quirk],
                    patient=patient,
                    parties=parties,
                )
                corrected = fixed.raw.decode("utf-8")
        body: dict[str, Any] = {
            "connection": conn.name,
            "message_type": story.message_type,
            "content_type": HL7_ER7,
        }
        try:
            body["payload"] = raw.decode("utf-8")
        except UnicodeDecodeError:
            body["payload_base64"] = base64.b64encode(raw).decode("ascii")
        if scenario.report:
            body["error"] = scenario.report
        if scenario.signal is None and not scenario.report and scenario.category == "data_shape":
            decoded = decode_payload(raw, HL7_ER7, story.message_type)
            if decoded.problem is None:
                raise RuntimeError(f"story {story.index}: the {quirk} message passes intake")
        story.body, story.corrected = body, corrected
        for step in story.steps:
            if step.signal:
                step.outcome = self._outcome(story, step.signal, "", step.at)
            if step.kind == "decide" and step.args["input"]["action"] == "resubmit_corrected":
                step.args["input"]["payload"] = corrected
            if step.kind == "decide" and step.args["input"]["action"] == "approve":
                step.args["input"]["password"] = DEMO_PASSWORD

    def _context(self, story: _Story) -> corpus.Context:
        rng = self.rng
        pool = corpus.PATIENTS
        if story.scenario.quirk == "cp1252":  # the export tool can only write what the code page holds
            pool = tuple(p for p in pool if not p.display.isascii() and corpus.encodes_in_cp1252(p.display))
        person = rng.choice(pool)
        intake_at = story.steps[0].at
        return corpus.Context(
            patient=person,
            patient_id=_patient_id(story.conn, person.key),
            mrn_system=story.conn.mrn_system,
            mrn=_mrn(story.conn, person.key),
            practitioner=rng.choice(corpus.PRACTITIONERS),
            encounter_id=f"enc-{rng.getrandbits(40):010x}",
            organization=story.conn.organization,
            when=intake_at - timedelta(minutes=rng.uniform(1, 25)),
            extra={"surviving_patient_id": _patient_id(story.conn, person.key + "-surviving")},
        )

    def _outcome(self, story: _Story, signal: str, payload_text: str, at: datetime) -> Outcome:
        """The Outcome the FHIR adapter would produce for this signal, from its own classify()."""
        rng, conn, rtype = self.rng, story.conn, story.message_type
        if signal.startswith("mllp_"):  # a stand-in with the timing: the runner plays the real one
            category = SIGNAL_CATEGORY[signal]
            return Outcome(
                AttemptOutcome.DELIVERED if category is None else AttemptOutcome.UNKNOWN,
                Category(category) if category else None,
                latency_ms=int(self._latency(signal) * 1000),
            )
        url = f"{conn.endpoint(self.base_url)}/{rtype}"
        summary = f"POST {url} {rtype}"
        latency = int(self._latency(signal) * 1000)
        system = DELIVERY_SYSTEM_PREFIX + story.client
        rid = _resource_id(conn, rng)

        if signal == "found":
            return Outcome(
                AttemptOutcome.DELIVERED,
                summary="search by identifier",
                detail="found already applied by identifier search; not re-sent",
                latency_ms=latency,
            )
        if signal == "search_failed":
            return Outcome(
                AttemptOutcome.UNKNOWN,
                Category.UNKNOWN_OUTCOME,
                detail="identifier search failed: cannot tell whether the EHR applied it; not re-sent",
                latency_ms=latency,
            )
        if signal == "validation":
            envelope = Envelope(
                message_id="seed",
                message_type=rtype,
                content_type=corpus.FHIR_JSON,
                payload=payload_text,
                delivery_system=system,
                delivery_value=story.key,
                control_id="R0",
            )
            try:
                prepare_resource(envelope)
            except ValidationFailed as exc:
                return exc.to_outcome(summary, latency)
            raise RuntimeError(f"story {story.index}: the {story.scenario.quirk} payload passed validation")

        if signal in corpus.TRANSPORT_ERRORS:
            error_type, text = corpus.TRANSPORT_ERRORS[signal]
            error = getattr(httpx, error_type)(text)
            outcome = classify(phase=CREATE, summary=summary, started=time.monotonic(), error=error)
        else:
            answer = corpus.ehr_answer(
                signal,
                story.ctx,
                resource_type=rtype,
                resource_id=rid,
                location=f"{url}/{rid}/_history/1",
                identifier=f"{system}|{story.key}",
                reason_code=self._first_reason_code(payload_text),
                at=at,
                rng=rng,
            )
            response = httpx.Response(
                answer.status, content=answer.body, headers=answer.headers, request=httpx.Request("POST", url)
            )
            outcome = classify(
                phase=CREATE,
                summary=summary,
                started=time.monotonic(),
                response=response,
                resource_type=rtype,
            )
        outcome.latency_ms = latency
        return outcome

    @staticmethod
    def _first_reason_code(text: str) -> str | None:
        try:
            return json.loads(text)["reasonCode"][0]["coding"][0]["code"]
        except (ValueError, KeyError, IndexError, TypeError):
            return None


def _patient_id(conn: DemoConnection, key: str) -> str:
    """A stable EHR-style logical id per customer and patient."""
    digest = hashlib.sha256(f"{conn.customer}|{key}".encode()).hexdigest()
    if conn.vendor == "oracle-health":
        return str(int(digest[:8], 16) % 10**8)
    return "e" + digest[:20]


def _mrn(conn: DemoConnection, key: str) -> str:
    """A stable eight-digit medical record number per customer and patient."""
    digest = hashlib.sha256(f"{conn.customer}|mrn|{key}".encode()).hexdigest()
    return f"{int(digest[:12], 16) % 10**8:08d}"


def _resource_id(conn: DemoConnection, rng: random.Random) -> str:
    if conn.vendor == "oracle-health":
        return str(rng.randint(10**8, 10**9))
    return f"{rng.getrandbits(64):016x}"


# --------------------------------------------------------------------------- HL7 v2 over MLLP, without a network

# The fields the demo's HL7 receivers require (the simulator's hl7_required_fields): AE when empty.
HL7_REQUIRED_FIELDS = ("PID-3", "PID-5")


class _MllpReceiver:
    """A socket for Hl7MllpAdapter that answers the way the simulator's MLLP half does for one
    signal (the simulator's own ACK builder), so the outcome comes from the adapter's own code:
    framing, our MSH-10, reading the ACK and judging it (app.domain.hl7.ack_outcome)."""

    def __init__(self, signal: str):
        self.signal = signal
        self.pending = b""

    def sendall(self, data: bytes) -> None:
        raw, _ = unframe(data)
        text = decode_text(raw or b"", HL7_ER7).text
        control_id = msh_field(text, 10)
        ack = None
        if self.signal == "mllp_aa":
            ack = build_ack(text, "AA", control_id)
        elif self.signal == "mllp_wrong_msa2":  # an ACK for another message
            ack = build_ack(text, "AA", f"X{control_id}"[:20])
        elif self.signal == "mllp_ar":
            ack = build_ack(text, "AR", control_id)
        elif self.signal == "mllp_ae":
            missing = [loc for loc in HL7_REQUIRED_FIELDS if field_empty(text, loc)]
            ack = build_ack(text, "AE", control_id, [(loc, f"{loc} is required") for loc in missing])
        self.pending = frame(encode_text(ack, HL7_ER7)) if ack else b""

    def settimeout(self, seconds: float) -> None:
        pass

    def setblocking(self, flag: bool) -> None:
        self.blocking = flag

    def recv(self, size: int, flags: int = 0) -> bytes:
        if not getattr(self, "blocking", True):  # the adapter's idle check: open, nothing waiting
            raise BlockingIOError
        if self.signal == "mllp_reset":
            raise ConnectionResetError(104, "Connection reset by peer")
        if self.signal == "mllp_late_ack":  # the ACK comes after our read timeout
            raise TimeoutError("timed out")
        out, self.pending = self.pending, b""
        return out  # b"": the receiver closed the connection without an ACK (applied, then dropped)

    def close(self) -> None:
        pass


def mllp_outcome(signal: str, envelope: Envelope, settings) -> Outcome:
    """The Outcome Hl7MllpAdapter.deliver produces when the receiver answers with `signal`."""
    adapter = Hl7MllpAdapter(settings)
    if signal == "mllp_refused":

        def refuse():
            raise ConnectionRefusedError(111, "Connection refused")

        adapter._connect = refuse
    else:
        adapter._sock = _MllpReceiver(signal)
    return adapter.deliver(envelope)


# --------------------------------------------------------------------------- running the stories


class _Runner:
    """Runs steps inside one transaction, with the clock already set to the step's time.

    What the worker does is done by the worker's own functions (app/services/delivery: claim,
    settle, queue a retry, claim and settle a replay) on the same session; only the EHR is
    scripted: each step's outcome comes from the adapters' own classification (`_settle`)."""

    def __init__(self, session: so.Session, clock: _SeedClock, rt: delivery.Runtime):
        self.s = session
        self.clock = clock
        self.rt = rt
        self._users: dict[str, User] = {}

    def user(self, name: str) -> User:
        if name not in self._users:
            self._users[name] = users.by_username(self.s, name)
        return self._users[name]

    def run(self, step: _Step, story: _Story) -> None:
        getattr(self, f"_{step.kind}")(step, story)

    def _settle(self, step: _Step, story: _Story, payload_version_id: int) -> Outcome:
        """The step's outcome; for MLLP, played through the real adapter now that the message (and
        so its MSH-10) exists, keeping the planned latency."""
        if not (step.signal or "").startswith("mllp_"):
            return step.outcome
        message = self.s.get(Message, story.message_id)
        envelope = envelope_for(message, self.s.get(PayloadVersion, payload_version_id))
        outcome = mllp_outcome(step.signal, envelope, connections.settings_for(message.connection))
        if (outcome.category.value if outcome.category else None) != SIGNAL_CATEGORY[step.signal]:
            raise RuntimeError(f"story {story.index}: {step.signal} gave {outcome}")
        outcome.latency_ms = step.outcome.latency_ms
        step.outcome = outcome
        return outcome

    # -- helpers

    def _relayed(self, kind: str, ref_id: int, at: datetime) -> None:
        self.s.execute(
            sa.update(OutboxEntry)
            .where(
                OutboxEntry.kind == kind, OutboxEntry.ref_id == str(ref_id), OutboxEntry.relayed_at.is_(None)
            )
            .values(relayed_at=at)
        )

    def _worker_delivers(self, step: _Step, story: _Story, attempt_id: int, outcome: Outcome) -> str:
        """The worker's claim (at the call's start) and settle (at the step's time) of one attempt.
        A planned next retry is the scripted EHR's Retry-After, so the worker's own backoff lands on
        the demo's timeline."""
        self.clock.at = step.at - timedelta(milliseconds=outcome.latency_ms)
        attempt = delivery.claim_attempt(self.s, self.rt, attempt_id)
        if attempt is None:
            raise RuntimeError(f"story {story.index}: attempt {attempt_id} is not queued")
        self.clock.at = step.at
        next_at = step.args.get("next_retry_at")
        if next_at is not None:
            outcome.retry_after_seconds = max((next_at - step.at).total_seconds(), 0.0)
        delivery.finish_attempt(self.s, attempt_id, outcome)
        message = self.s.get(Message, attempt.message_id)
        item = self.s.scalar(
            sa.select(ExceptionItem).where(
                ExceptionItem.message_id == message.id, ExceptionItem.state == ExceptionState.RETRYING
            )
        )
        return delivery.settle_delivery(self.rt, self.s, message, message.connection, attempt, outcome, item)

    # -- steps

    def _intake(self, step: _Step, story: _Story) -> None:
        intake = report_exception if story.scenario.report else submit_message
        result = intake(self.s, self.user(story.client), story.key, story.body)
        story.message_id = result.body["id"]
        if result.body.get("category", "") != (
            story.scenario.category if story.scenario.signal is None else ""
        ):
            raise RuntimeError(f"story {story.index} ({story.scenario.name}): intake answered {result.body}")
        if "exception_id" in result.body:
            story.exception_id = result.body["exception_id"]
            return
        attempt = self.s.scalar(sa.select(Attempt).where(Attempt.message_id == story.message_id))
        story.attempt_id = attempt.id
        self._relayed("deliver", attempt.id, step.at + timedelta(milliseconds=200))

    def _deliver(self, step: _Step, story: _Story) -> None:
        attempt = self.s.get(Attempt, story.attempt_id)
        outcome = self._settle(step, story, attempt.payload_version_id)
        result = self._worker_delivers(step, story, attempt.id, outcome)
        if result == "delivered":
            return
        if (result == "retrying") != step.args["retried"]:
            raise RuntimeError(
                f"story {story.index}: the worker would {'' if result == 'retrying' else 'not '}retry {outcome}"
            )
        story.exception_id = self.s.scalar(
            sa.select(ExceptionItem.id).where(ExceptionItem.message_id == story.message_id)
        )

    def _retry(self, step: _Step, story: _Story) -> None:
        """One automatic retry: the scheduler queues it, the worker runs it and settles it."""
        item = self.s.get(ExceptionItem, story.exception_id)
        outcome = self._settle(step, story, item.message.current_payload_id)
        queued_at = step.at - timedelta(milliseconds=outcome.latency_ms)
        self.clock.at = queued_at
        attempt = delivery.queue_retry(self.s, item)
        if attempt is None:
            raise RuntimeError(f"story {story.index}: exception {item.id} is not retrying")
        self._relayed("deliver", attempt.id, queued_at)
        result = self._worker_delivers(step, story, attempt.id, outcome)
        expected = (
            "delivered" if outcome.delivered else "exception" if step.args.get("exhausted") else "retrying"
        )
        if result != expected:
            raise RuntimeError(
                f"story {story.index}: the plan ({expected}) and the worker ({result}) disagree on "
                f"retry {item.retry_count}"
            )

    def _decide(self, step: _Step, story: _Story) -> None:
        data = DecisionInput(**step.args["input"])
        if data.action in ("resubmit", "resubmit_corrected"):
            item = exceptions.get(self.s, story.exception_id)
            if item.needs_not_applied_confirmation:
                # The plan did not foresee it (a failure that may have applied, on a connection
                # that cannot search): a lead checks first, as the four-eyes rules require.
                reasons = _Planner._confirm_reasons(story)
                decide(
                    self.s,
                    item.id,
                    self.user(LEADS[story.index % len(LEADS)]),
                    DecisionInput("confirm_not_applied", reason=reasons[story.index % len(reasons)]),
                )
        decision = decide(self.s, story.exception_id, self.user(step.args["actor"]), data)
        if "replay_id" in decision.details:
            story.replay_id = decision.details["replay_id"]
        if data.action == "approve":
            self._relayed("replay", story.replay_id, step.at + timedelta(milliseconds=300))

    def _view_payload(self, step: _Step, story: _Story) -> None:
        item = exceptions.get(self.s, story.exception_id)
        exceptions.view_payload(self.s, item, self.user(step.args["actor"]), channel="console")

    def _claim_replay(self, story: _Story, lease_seconds: float):
        claim = delivery.claim_replay(self.s, replace(self.rt, lease_seconds=lease_seconds), story.replay_id)
        if claim is None:
            raise RuntimeError(f"story {story.index}: replay {story.replay_id} is not queued")
        return claim

    def _replay_claim(self, step: _Step, story: _Story) -> None:
        """A worker holds the replay right now (state running, lease ticking)."""
        self._claim_replay(story, REPLAY_LEASE.total_seconds())

    def _replay_finish(self, step: _Step, story: _Story) -> None:
        """The worker's replay, claim to settlement, by `run_replay`'s own steps."""
        outcome = self._settle(step, story, self.s.get(Replay, story.replay_id).payload_version_id)
        self.clock.at = step.at - timedelta(milliseconds=outcome.latency_ms)
        attempt_id, message_id, *_ = self._claim_replay(story, self.rt.lease_seconds)
        self.clock.at = step.at
        result = delivery.settle_replay(
            self.s,
            story.replay_id,
            attempt_id,
            message_id,
            outcome,
            contacted=False,
            found=step.signal == "found",
        )
        if result != ("resolved" if outcome.delivered else "reopened"):
            raise RuntimeError(f"story {story.index}: replay {story.replay_id} settled as {result}")


# --------------------------------------------------------------------------- the clock and password hashing


class _SeedClock:
    """The demo's time: each step sets it; the services read it through `clock.use_clock`."""

    def __init__(self, at: datetime):
        self.at = at

    def __call__(self) -> datetime:
        return self.at


@contextmanager
def _seed_runtime(start: datetime) -> Iterator[_SeedClock]:
    """Run the services at a settable time (app/services/clock.py `use_clock`, this thread only);
    memoize argon2 for one password.

    argon2 costs ~0.25 s per hash or verify on a small machine; the demo users share one password,
    so hashing it once and verifying each (hash, password) pair once keeps loading to a few
    seconds. Restored on the way out, whatever happens. Not for concurrent use: call it before
    serving requests.
    """
    seed_clock = _SeedClock(start)
    hashes: dict[str, str] = {}
    verified: dict[tuple[str | None, str], bool] = {}
    real_hash, real_check = users.hash_password, exceptions.check_password

    def hash_once(password: str) -> str:
        if password not in hashes:
            hashes[password] = real_hash(password)
        return hashes[password]

    def check_once(user: User, password: str) -> bool:
        key = (user.password_hash, password)
        if key not in verified:
            verified[key] = real_check(user, password)
        return verified[key]

    users.hash_password = hash_once
    exceptions.check_password = check_once
    try:
        with clock.use_clock(seed_clock):
            yield seed_clock
    finally:
        users.hash_password = real_hash
        exceptions.check_password = real_check


def _demo_runtime(sessions: so.sessionmaker) -> delivery.Runtime:
    """The worker as the demo runs it: its own name, a deterministic backoff (no jitter; the
    planned next retry arrives as the scripted EHR's Retry-After, however far off), no adapters
    (every call is scripted)."""

    def no_adapter(conn):
        raise RuntimeError(f"the demo never calls {conn.name}: every outcome is scripted")

    return delivery.Runtime(
        sessions=sessions,
        worker_name=WORKER_NAME,
        adapter_factory=no_adapter,
        jitter=lambda: 0.0,
        retry_cap_seconds=HISTORY.total_seconds() * 2,
    )


# --------------------------------------------------------------------------- entry point


def load_demo(
    sessions: so.sessionmaker,
    *,
    sim_base_url: str = "http://127.0.0.1:8090",
    now: datetime | None = None,
    size: int = 300,
    seed: int = 7,
    mllp_port: int = DEFAULT_MLLP_PORT,
) -> DemoResult:
    """Load the demo data set once; when the demo users already exist, change nothing.

    `size` is the number of messages (at least `len(REQUIRED)`, the coverage list); `now` (naive
    UTC, default the current time) is the end of the three-day history: not in the future, and
    events older than the newest existing audit event are moved up to it. Deterministic for a
    given seed, apart from ids and tokens. FHIR connections point at the simulator's FHIR half at
    `sim_base_url`, HL7 v2 ones at its MLLP listener on the same host at `mllp_port`.
    """
    real_now = clock.utcnow()
    now = now or real_now
    if now > real_now + timedelta(minutes=1):  # later events would then predate the seeded ones
        raise ValueError(
            f"now ({now:%Y-%m-%d %H:%M}) is in the future; the audit log must stay in time order"
        )
    with transaction(sessions) as s:
        if _already_loaded(s):
            return _summary(s, now, created=False)
        newest = s.scalar(sa.select(sa.func.max(AuditEvent.occurred_at)))
        policy = connections.sla_policy(s)
    floor = now - HISTORY - timedelta(hours=2)
    if newest is not None and newest >= floor:
        floor = newest + timedelta(microseconds=1)

    stories = _Planner(random.Random(seed), now, floor, policy, sim_base_url).plan(size)
    _plan_retry_times(stories, now, random.Random(seed + 1))
    steps = sorted(
        ((step, story) for story in stories for step in story.steps),
        key=lambda pair: (pair[0].at, pair[1].index),
    )
    setup_at = max(floor, min(steps[0][0].at, now - HISTORY) - timedelta(hours=1))

    # The estate commits with the first batch of stories, after a second look inside that
    # transaction (another process may have loaded the demo meanwhile); a bug in a story then
    # leaves nothing half-loaded behind.
    batch = max(200, len(steps) // 5 + 1)
    with _seed_runtime(setup_at) as seed_clock:
        for start in range(0, len(steps), batch):
            with transaction(sessions) as s:
                if start == 0:
                    if _already_loaded(s):
                        return _summary(s, now, created=False)
                    tokens = _create_estate(s, sim_base_url, mllp_port)
                runner = _Runner(s, seed_clock, _demo_runtime(sessions))
                for step, story in steps[start : start + batch]:
                    seed_clock.at = step.at
                    runner.run(step, story)

    with transaction(sessions) as s:
        result = _summary(s, now, created=True)
    result.service_tokens = tokens
    result.service_token = tokens["orders-service"]
    return result


def _plan_retry_times(stories: list[_Story], now: datetime, rng: random.Random) -> None:
    """next_retry_at for each scheduled retry: the next retry's start, or a few minutes after `now`."""
    for story in stories:
        timed = [s for s in story.steps if s.kind in ("deliver", "retry")]
        if not timed:
            continue
        for current, following in zip(timed, [*timed[1:], None], strict=True):
            if current.outcome is None or current.outcome.delivered:
                continue
            if following is not None:
                due = following.at - timedelta(milliseconds=following.outcome.latency_ms)
            elif current.args.get("retried") or current.args.get("pending_retry"):
                due = now + timedelta(minutes=rng.uniform(3, 12))
            else:
                continue
            current.args["next_retry_at"] = due


def _already_loaded(s: so.Session) -> bool:
    names = [name for name, _ in CONSOLE_USERS] + list(SERVICE_USERS)
    if s.scalar(sa.select(sa.func.count()).select_from(User).where(User.username.in_(names))):
        return True
    return bool(
        s.scalar(sa.select(sa.func.count()).select_from(Customer).where(Customer.name.in_(CUSTOMERS)))
    )


def _create_estate(s: so.Session, base_url: str, mllp_port: int = DEFAULT_MLLP_PORT) -> dict[str, str]:
    """Users, API tokens, customers and connections; returns the service users' tokens."""
    users.create_user(s, "adam", "admin", DEMO_PASSWORD, actor="system:seed")
    for name, role in CONSOLE_USERS:
        if name != "adam":
            users.create_user(s, name, role, DEMO_PASSWORD, actor="adam")
    tokens = {}
    for name in SERVICE_USERS:
        service = users.create_user(s, name, "service", None, actor="adam")
        tokens[name] = users.create_token(s, service, actor="adam")
    for customer in CUSTOMERS:
        connections.add_customer(s, customer, actor="adam")
    for conn in CONNECTIONS:
        connections.add_connection(
            s,
            conn.name,
            customer=conn.customer,
            protocol=conn.protocol,
            endpoint=conn.endpoint(base_url, mllp_port),
            environment=conn.environment,
            conditional_create=conn.conditional_create,
            identifier_search=conn.identifier_search,
            vendor=conn.vendor,
            enabled_message_types=list(conn.enabled_message_types),
            actor="adam",
        )
    return tokens


def _summary(s: so.Session, now: datetime, *, created: bool) -> DemoResult:
    by_category = {c.value: 0 for c in Category}
    by_state = {st.value: 0 for st in ExceptionState}
    for category, n in s.execute(
        sa.select(ExceptionItem.category, sa.func.count()).group_by(ExceptionItem.category)
    ):
        by_category[category] = n
    for state, n in s.execute(sa.select(ExceptionItem.state, sa.func.count()).group_by(ExceptionItem.state)):
        by_state[state] = n
    by_sla = {"on_track": 0, "at_risk": 0, "breached": 0}
    final = [st.value for st in FINAL_STATES]
    for started, due in s.execute(
        sa.select(ExceptionItem.sla_started_at, ExceptionItem.sla_due_at).where(
            ExceptionItem.state.not_in(final)
        )
    ):
        by_sla[sla_status(now, started, due).value] += 1
    by_protocol: dict[str, dict[str, int]] = {}
    for protocol, category, n in s.execute(
        sa.select(Connection.protocol, ExceptionItem.category, sa.func.count())
        .join(Connection, Connection.id == ExceptionItem.connection_id)
        .group_by(Connection.protocol, ExceptionItem.category)
    ):
        by_protocol.setdefault(protocol, {})[category] = n
    for protocol, n in s.execute(
        sa.select(Connection.protocol, sa.func.count())
        .select_from(Message)
        .join(Connection, Connection.id == Message.connection_id)
        .where(Message.status == "delivered")
        .group_by(Connection.protocol)
    ):
        by_protocol.setdefault(protocol, {})["delivered"] = n
    existing = set(
        s.scalars(sa.select(User.username).where(User.username.in_([n for n, _ in CONSOLE_USERS])))
    )
    return DemoResult(
        created=created,
        logins=[(name, role, DEMO_PASSWORD) for name, role in CONSOLE_USERS if name in existing],
        service_token=None,
        service_tokens={},
        messages=s.scalar(sa.select(sa.func.count()).select_from(Message)) or 0,
        delivered=s.scalar(
            sa.select(sa.func.count()).select_from(Message).where(Message.status == "delivered")
        )
        or 0,
        by_category=by_category,
        by_state=by_state,
        by_sla=by_sla,
        now=now,
        by_protocol=by_protocol,
    )
