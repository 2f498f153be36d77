"""Delivery vocabulary shared by adapters, services and the worker (SPEC 3, 3.2, 4).

Adapters receive plain dataclasses (ConnectionSettings, Envelope) and return an
Outcome; they never see database rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum


class Category(StrEnum):
    TRANSPORT = "transport"
    EHR_UNAVAILABLE = "ehr_unavailable"
    EHR_REJECTED = "ehr_rejected"
    UNKNOWN_OUTCOME = "unknown_outcome"
    MALFORMED_RESPONSE = "malformed_response"
    DATA_SHAPE = "data_shape"
    CODE_SET = "code_set"
    DUPLICATE_SUSPECTED = "duplicate_suspected"
    AUTH = "auth"
    CONFIG = "config"


class AttemptOutcome(StrEnum):
    DELIVERED = "delivered"
    REJECTED = "rejected"
    TRANSIENT = "transient"
    UNKNOWN = "unknown"


class Protocol(StrEnum):
    FHIR_R4 = "fhir-r4"
    HL7V2_MLLP = "hl7v2-mllp"


@dataclass(frozen=True)
class ConnectionSettings:
    """A connection as an adapter needs it (SPEC 3 'Connection')."""

    name: str
    protocol: str
    endpoint: str
    fhir_version: str = "4.0.1"
    supports_conditional_create: bool = True
    supports_identifier_search: bool = True
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    auth_token_url: str | None = None
    auth_client_id: str | None = None
    auth_secret_env: str | None = None  # name of the environment variable holding the secret
    enabled: bool = True
    enabled_message_types: tuple[str, ...] = ()
    diagnosis_code_system: str = "icd-10"  # icd-10 | icd-9 | any


@dataclass(frozen=True)
class Envelope:
    """One message as the adapter delivers it."""

    message_id: str
    message_type: str
    content_type: str
    payload: str  # decoded text of the current payload version
    delivery_system: str  # identifier system that carries the idempotency key
    delivery_value: str  # identifier value (the key itself)
    control_id: str  # HL7 MSH-10, at most 20 characters


@dataclass
class Outcome:
    """What one delivery attempt produced."""

    outcome: AttemptOutcome
    category: Category | None = None  # set for everything but DELIVERED
    status_code: int | None = None
    summary: str = ""  # request summary (method, url, type)
    response_excerpt: str = ""  # first bytes of the response body
    detail: str = ""  # human-readable explanation
    resource_ref: str | None = None  # e.g. "MedicationRequest/123" when known
    latency_ms: int = 0
    retry_after_seconds: float | None = None
    provably_not_applied: bool = False  # the EHR told us it did not process the request
    issues: list[dict] = field(default_factory=list)  # OperationOutcome issues / HL7 ERR parsed
    capability: str = ""  # the EHR's CapabilityStatement summary, when this attempt fetched it
    held: bool = False  # never sent: the circuit was open (or another worker probes); not a try

    @property
    def delivered(self) -> bool:
        return self.outcome is AttemptOutcome.DELIVERED


def routing_refusal(settings: ConnectionSettings, message_type: str) -> str | None:
    """Why a connection will not carry this message type now (a `config` problem), or None."""
    if not settings.enabled:
        return f"connection {settings.name} is disabled"
    if settings.enabled_message_types and message_type not in settings.enabled_message_types:
        return f"message type {message_type} is not enabled on {settings.name}"
    return None


# Categories a worker may retry automatically (SPEC 3.2).
AUTO_RETRY_CATEGORIES = frozenset({Category.TRANSPORT, Category.EHR_UNAVAILABLE})
# Failures that count towards a connection's circuit breaker: the EHR, or the way to it, is down.
BREAKER_CATEGORIES = frozenset({Category.TRANSPORT, Category.EHR_UNAVAILABLE})


def counts_against_breaker(outcome: Outcome) -> bool:
    """A real call's outcome that adds to the consecutive failures (anything else resets them)."""
    return not outcome.delivered and outcome.category in BREAKER_CATEGORIES


DELIVER_JOB_PREFIX = "deliver-"


def deliver_job_id(attempt_id: int) -> str:
    """The outbox's job id for delivering an attempt (the relay namespaces it by queue)."""
    return f"{DELIVER_JOB_PREFIX}{attempt_id}"


def auto_retry_eligible(outcome: Outcome, settings: ConnectionSettings) -> bool:
    """Only transport failures, and EHR-unavailable ones that provably did not apply or are
    protected by conditional create, are retried without a human."""
    if outcome.category is Category.TRANSPORT:
        return True
    if outcome.category is Category.EHR_UNAVAILABLE:
        return outcome.provably_not_applied or settings.supports_conditional_create
    return False


RETRY_CAP_SECONDS = 3600.0  # no automatic retry waits longer than this after a failure


def retry_delay(
    base_seconds: float,
    retries_done: int,
    *,
    retry_after: float | None = None,
    draw: float = 1.0,
    cap: float = RETRY_CAP_SECONDS,
) -> float:
    """Seconds until the next automatic retry: full jitter (a uniform draw in [0, min(cap,
    base·2^n)], so a fleet of failures does not come back in one wave); the EHR's Retry-After,
    capped, is a floor. `draw` is the caller's random number in [0, 1)."""
    ceiling = min(cap, base_seconds * 2 ** min(max(retries_done, 0), 40))
    delay = min(max(draw, 0.0), 1.0) * ceiling
    if retry_after:
        delay = max(delay, min(retry_after, cap))
    return delay


HIGH_RISK_MESSAGE_TYPES = frozenset(
    {
        "MedicationRequest",
        "ServiceRequest",
        "MedicationAdministration",
        "ORM^O01",
        "OMP^O09",
        "RDE^O11",
        "OML^O21",
    }
)


def clinical_risk(message_type: str) -> str:
    """Medication and order messages are high risk (SPEC 3 'Message')."""
    base = message_type.split("^")[0] if "^" in message_type else message_type
    if message_type in HIGH_RISK_MESSAGE_TYPES or base in {"ORM", "OMP", "RDE", "OML", "RXO"}:
        return "high"
    return "normal"


def control_id_for(key: str) -> str:
    """HL7 MSH-10 derived from the idempotency key: stable, at most 20 characters."""
    import hashlib

    return "R" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:19].upper()


# Attempt outcomes after which the EHR may still be working on (or may have applied) the request:
# unknown and in-flight always; transient unless it provably never got in (a transport failure,
# or 503/429 refused before processing).
UNCERTAIN_ATTEMPT_OUTCOMES = ("unknown", "in_flight")
TRANSIENT_NOT_APPLIED_STATUSES = (429, 503)


def reconcile_not_before(
    last_uncertain_start: datetime | None, read_timeout: float, grace_seconds: float
) -> datetime | None:
    """The earliest moment a replay may ask the EHR what it applied (or send again).

    An unknown outcome does not mean the EHR has finished: a worker killed mid-call, or a read
    timeout, leaves a request the EHR may still commit later. An identifier search before that
    commit says "not there", and re-sending would apply the order twice. So a replay waits until
    the earlier request's own deadline (its start + the read timeout) plus a grace for EHRs that
    finish just after our client gave up. None: nothing uncertain came before."""
    if last_uncertain_start is None:
        return None
    return last_uncertain_start + timedelta(seconds=read_timeout + grace_seconds)
