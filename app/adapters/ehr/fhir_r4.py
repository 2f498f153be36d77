"""FHIR R4 REST adapter (SPEC 2 and 4).

One attempt = (local checks) -> (token, once per expiry) -> (metadata version check, once per
adapter) -> ``POST [base]/[type]``. Everything that can go wrong is turned into an Outcome by
:func:`classify`, the single place where HTTP signals become categories, so that the safety rule
"after an unknown outcome, reconcile before re-sending" rests on one reviewed mapping:

* the request provably never reached the EHR (connect refused, DNS, TLS, a failing preflight,
  a local validation error) -> ``provably_not_applied=True``;
* the EHR answered and refused (4xx, 429, 503) -> the answer says what happened;
* anything after the request may have left (timeouts, resets, dropped responses, a 2xx we cannot
  read) -> ``UNKNOWN``: the message may be in the EHR; ``find_applied`` decides.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import ssl
import threading
import time
import typing
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
from pydantic import ValidationError

from app.domain.capability import capability_summary
from app.domain.categorize import categorize_fhir_status, operation_outcome_issues
from app.domain.delivery import AttemptOutcome, Category, ConnectionSettings, Envelope, Outcome

from .base import EhrAdapter
from .errors import AdapterError, ConfigError, ValidationFailed, VersionMismatch

log = logging.getLogger("app.adapters.ehr.fhir_r4")

FHIR_JSON = "application/fhir+json"
EXCERPT_CHARS = 2000
USER_AGENT = "recon-console/0.1 (fhir-r4 adapter)"
_TYPE_NAME_RE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
_ABSTRACT_TYPES = {"Resource", "DomainResource"}

# Phases of an attempt; only CREATE can leave the message in an unknown state.
CREATE, METADATA, TOKEN, SEARCH = "create", "metadata", "token", "search"

# Exceptions raised before a single byte of the request reached the server.
_NOT_SENT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.ProxyError)
_CONFIG_ERRORS = (httpx.UnsupportedProtocol, httpx.InvalidURL)


class _Stop(Exception):
    """Internal: a preflight step (token, metadata) ended the attempt with this Outcome."""

    def __init__(self, outcome: Outcome):
        super().__init__(outcome.detail)
        self.outcome = outcome


# --------------------------------------------------------------------------- payload preparation


def resource_model(resource_type: str) -> type:
    """The fhir.resources R4B model class of a concrete resource type; ValidationFailed otherwise."""
    from fhir.resources.R4B import get_fhir_model_class
    from fhir.resources.R4B.resource import Resource

    if not _TYPE_NAME_RE.match(resource_type or "") or resource_type in _ABSTRACT_TYPES:
        raise ValidationFailed(f"{resource_type!r} is not a FHIR resource type")
    try:
        model = get_fhir_model_class(resource_type)
    except ValueError:
        raise ValidationFailed(f"{resource_type!r} is not a FHIR R4 resource type") from None
    if not issubclass(model, Resource):
        raise ValidationFailed(f"{resource_type!r} is a FHIR data type, not a resource")
    return model


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_payload(envelope: Envelope) -> dict[str, Any]:
    """The payload as a JSON object whose resourceType is the message type."""
    text = envelope.payload.lstrip("\ufeff")  # a BOM is an encoding artefact, not content
    try:
        doc = json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:
        raise ValidationFailed(f"payload is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ValidationFailed(f"payload is a JSON {type(doc).__name__}, not a FHIR resource object")
    rtype = doc.get("resourceType")
    if not isinstance(rtype, str) or not rtype:
        raise ValidationFailed("payload has no resourceType")
    if rtype != envelope.message_type:
        raise ValidationFailed(f"payload is a {rtype} but the message type is {envelope.message_type}")
    return doc


def add_delivery_identifier(resource: dict[str, Any], model: type, system: str, value: str) -> dict[str, Any]:
    """A copy of the resource carrying exactly one delivery identifier {system, value}.

    Existing identifiers are kept. A different value under our delivery system would make the
    EHR-side search ambiguous, so it is refused rather than overwritten.
    """
    if not system or not value:
        raise ConfigError("the envelope carries no delivery identifier (system and value are required)")
    field = model.model_fields.get("identifier")
    if field is None:
        raise ValidationFailed(
            f"{resource['resourceType']} has no identifier element to carry the delivery key"
        )
    is_list = any(typing.get_origin(arg) is list for arg in (typing.get_args(field.annotation) or ()))
    ours = {"system": system, "value": value}
    out = dict(resource)
    current = out.get("identifier")
    if not is_list:  # a 0..1 identifier (e.g. Bundle): only usable when free or already ours
        if current is None:
            out["identifier"] = ours
            return out
        if isinstance(current, dict) and current.get("system") == system and current.get("value") == value:
            return out
        raise ValidationFailed(f"{resource['resourceType']}.identifier is taken; cannot add the delivery key")
    if current is None:
        current = []
    if not isinstance(current, list):
        raise ValidationFailed(f"{resource['resourceType']}.identifier must be a list")
    for ident in current:
        if isinstance(ident, dict) and ident.get("system") == system:
            if ident.get("value") == value:
                return out  # already there: do not add it twice
            raise ValidationFailed(
                f"payload already carries a different delivery identifier in system {system}; "
                "refusing to send two keys for one message"
            )
    out["identifier"] = [*current, ours]
    return out


def _error_path(resource_type: str, loc: tuple[Any, ...]) -> str:
    path = resource_type
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def _issue_code(error_type: str) -> str:
    """OperationOutcome issue code for a pydantic error type (so both sources read alike)."""
    if "missing" in error_type:
        return "required"
    if error_type == "extra_forbidden" or error_type.endswith("_type") or "json" in error_type:
        return "structure"
    if "pattern" in error_type or error_type.startswith("value_error") or "enum" in error_type:
        return "value"
    return "invalid"


def validate_resource(model: type, resource: dict[str, Any]) -> None:
    """Validate with the R4B model; ValidationFailed with a readable summary and issues."""
    rtype = resource.get("resourceType", model.__name__)
    try:
        model.model_validate(resource)
    except ValidationError as exc:
        issues = [
            {
                "severity": "error",
                "code": _issue_code(str(err.get("type", ""))),
                # Only pydantic's message, never the offending input: it may be PHI.
                "diagnostics": str(err.get("msg", "")).split("\n")[0].strip(),
                "expression": [_error_path(rtype, tuple(err.get("loc", ())))],
            }
            for err in exc.errors(include_url=False, include_input=False)
        ]
        shown = "; ".join(f"{i['expression'][0]}: {i['diagnostics']}" for i in issues[:10])
        more = f" (and {len(issues) - 10} more)" if len(issues) > 10 else ""
        raise ValidationFailed(
            f"{rtype} failed FHIR R4B validation ({len(issues)} problem(s)): {shown}{more}", issues=issues
        ) from None
    except (TypeError, ValueError) as exc:  # fhir.resources raises these for some malformed input
        raise ValidationFailed(f"{rtype} failed FHIR R4B validation: {exc}") from None


def prepare_resource(envelope: Envelope) -> dict[str, Any]:
    """Parse, add the delivery identifier and validate; the dict that will be sent."""
    resource = parse_payload(envelope)
    model = resource_model(resource["resourceType"])
    resource = add_delivery_identifier(resource, model, envelope.delivery_system, envelope.delivery_value)
    validate_resource(model, resource)
    return resource


# --------------------------------------------------------------------------- wire helpers


def _escape_token(text: str) -> str:
    """FHIR search escaping for one part of a token parameter."""
    return re.sub(r"([\\|,$])", r"\\\1", text)


def identifier_token(system: str, value: str) -> str:
    """The `identifier` token search value 'system|value'."""
    return f"{_escape_token(system)}|{_escape_token(value)}"


def if_none_exist(system: str, value: str) -> str:
    """The If-None-Exist header value: a URL query string."""
    return "identifier=" + quote(identifier_token(system, value), safe=":/|@")


def retry_after_seconds(header: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date)."""
    if not header:
        return None
    header = header.strip()
    try:
        seconds = float(header)
    except ValueError:
        try:
            when = parsedate_to_datetime(header)
        except (TypeError, ValueError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - time.time()
    if math.isnan(seconds) or math.isinf(seconds):
        return None
    return max(0.0, seconds)


def _ref_from_location(location: str | None, resource_type: str) -> str | None:
    """'Type/id' from a Location like [base]/Type/id/_history/1."""
    if not location:
        return None
    parts = [p for p in urlsplit(location).path.split("/") if p]
    for i in range(len(parts) - 1):
        if parts[i] == resource_type:
            return f"{resource_type}/{parts[i + 1]}"
    return None


def _excerpt(response: httpx.Response) -> str:
    return response.content[: EXCERPT_CHARS * 4].decode("utf-8", "replace")[:EXCERPT_CHARS]


def _json_or_none(content: bytes) -> Any:
    try:
        return json.loads(content)
    except (ValueError, UnicodeDecodeError):
        return None


def _issues_of(content: bytes) -> list[dict]:
    """OperationOutcome issues of a response body; [] when there are none or they cannot be read.

    The domain parser trusts the body's shape; a hostile or buggy EHR body (an ``expression``
    that is not a list, absurd nesting) must not turn a recorded attempt into an exception.
    """
    try:
        return operation_outcome_issues(content) or []
    except (TypeError, ValueError, AttributeError, RecursionError) as exc:
        log.warning("unreadable OperationOutcome in an EHR response (%s); categorizing by status", exc)
        return []


def _describe_issues(issues: list[dict]) -> str:
    parts = []
    for issue in issues[:5]:
        text = f"{issue.get('code')}: {issue.get('diagnostics') or ''}".strip()
        if issue.get("expression"):
            text += f" [{', '.join(issue['expression'])}]"
        parts.append(text)
    return "; ".join(parts)


@functools.lru_cache(maxsize=1)
def _default_ssl_context() -> ssl.SSLContext:
    """httpx's default verifying context, built once: loading the CA bundle costs ~30 ms per client."""
    return httpx.create_ssl_context()


def _elapsed_ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


# --------------------------------------------------------------------------- categorization


# The mapping, as tables: the first row that matches wins. `where` names the preflight phase,
# `text` is the EHR's own words (OperationOutcome issues, OAuth error, reason phrase).
_PREFLIGHT = frozenset({METADATA, TOKEN, SEARCH})
_ALL_PHASES = _PREFLIGHT | {CREATE}
_UNAVAILABLE = "{where}EHR unavailable (HTTP {status}){text}"
_REFUSED = "{where}EHR rejected the request (HTTP {status}){text}"


@dataclass(frozen=True)
class ErrorRule:
    """An exception instead of a response: what it proves about the request."""

    errors: tuple[type[BaseException], ...]  # () matches any exception
    phases: frozenset[str]
    outcome: AttemptOutcome
    category: Category
    not_applied: bool
    detail: str  # {where} {name} {error}


ERROR_RULES: tuple[ErrorRule, ...] = (
    ErrorRule(_CONFIG_ERRORS, _ALL_PHASES, AttemptOutcome.REJECTED, Category.CONFIG, True,
              "{where}bad endpoint URL ({name}: {error})"),
    ErrorRule(_NOT_SENT_ERRORS, _ALL_PHASES, AttemptOutcome.TRANSIENT, Category.TRANSPORT, True,
              "{where}could not reach the EHR ({name}: {error}); the request was not sent"),
    # a preflight never carries the message: a timeout there is "unavailable", not "unknown"
    ErrorRule((), _PREFLIGHT, AttemptOutcome.TRANSIENT, Category.EHR_UNAVAILABLE, True,
              "{where}no usable answer ({name}: {error}); the message was not sent"),
    ErrorRule((httpx.DecodingError,), frozenset({CREATE}), AttemptOutcome.UNKNOWN, Category.MALFORMED_RESPONSE,
              False, "the EHR answered but the response could not be decoded ({error}); it may have "
              "applied - reconcile before re-sending"),
    ErrorRule((), frozenset({CREATE}), AttemptOutcome.UNKNOWN, Category.UNKNOWN_OUTCOME, False,
              "the request may have reached the EHR but no trustworthy answer came back ({name}: {error}); "
              "reconcile (search by identifier) before re-sending"),
)  # fmt: skip


@dataclass(frozen=True)
class StatusRule:
    """An HTTP status in a phase: the attempt's outcome, its category (None: from the status and the
    OperationOutcome issue codes, app/domain/categorize.py), whether the request provably did not
    apply, and the detail. `answer`: the EHR's issues and Retry-After are kept."""

    statuses: frozenset[int]
    phases: frozenset[str]
    outcome: AttemptOutcome
    category: Category | None
    not_applied: bool
    detail: str
    answer: bool = True


def _codes(*ranges_or_codes) -> frozenset[int]:
    out: set[int] = set()
    for item in ranges_or_codes:
        out.update(item if isinstance(item, range) else (item,))
    return frozenset(out)


_2XX, _3XX, _4XX, _5XX, _1XX = (
    range(200, 300),
    range(300, 400),
    range(400, 500),
    range(500, 600),
    range(100, 200),
)
_REDIRECTS = _codes(301, 302, 307, 308)

STATUS_RULES: tuple[StatusRule, ...] = (
    # a success: the body decides (_success); a preflight 2xx reaches classify only when unusable
    StatusRule(_codes(_2XX), frozenset({CREATE}), AttemptOutcome.DELIVERED, None, False, "HTTP {status}", False),
    StatusRule(_codes(_2XX), _PREFLIGHT, AttemptOutcome.REJECTED, Category.MALFORMED_RESPONSE, True,
               "{where}{detail}", False),
    StatusRule(_REDIRECTS, _ALL_PHASES, AttemptOutcome.REJECTED, Category.CONFIG, True,
               "{where}the EHR redirects (HTTP {status} to {location}); fix the connection endpoint", False),
    StatusRule(_codes(_3XX), _PREFLIGHT, AttemptOutcome.REJECTED, Category.MALFORMED_RESPONSE, True,
               "{where}unexpected HTTP {status}", False),
    StatusRule(_codes(_3XX), frozenset({CREATE}), AttemptOutcome.UNKNOWN, Category.MALFORMED_RESPONSE, False,
               "{where}unexpected HTTP {status}", False),
    # the authorization server refused our client credentials
    StatusRule(_codes(_4XX) - {429}, frozenset({TOKEN}), AttemptOutcome.REJECTED, Category.AUTH, True, _REFUSED),
    # refused before processing: nothing applied
    StatusRule(_codes(429, 503), _ALL_PHASES, AttemptOutcome.TRANSIENT, None, True, _UNAVAILABLE),
    StatusRule(_codes(_5XX), _PREFLIGHT, AttemptOutcome.TRANSIENT, None, True, _UNAVAILABLE),
    # 500 and friends: it may have applied before failing
    StatusRule(_codes(_5XX), frozenset({CREATE}), AttemptOutcome.TRANSIENT, None, False, _UNAVAILABLE),
    # conflicts / duplicates: something exists
    StatusRule(_codes(409, 412), frozenset({CREATE}), AttemptOutcome.REJECTED, None, False, _REFUSED),
    # the EHR processed and refused (401/403 included: refused before processing)
    StatusRule(_codes(_4XX), _ALL_PHASES, AttemptOutcome.REJECTED, None, True, _REFUSED),
    StatusRule(_codes(_1XX), _PREFLIGHT, AttemptOutcome.REJECTED, None, True, _REFUSED),
    StatusRule(_codes(_1XX), frozenset({CREATE}), AttemptOutcome.REJECTED, None, False, _REFUSED),
)  # fmt: skip


def status_rule(status: int, phase: str) -> StatusRule:
    """The first STATUS_RULES row for this status in this phase (LookupError: not covered)."""
    for rule in STATUS_RULES:
        if status in rule.statuses and phase in rule.phases:
            return rule
    raise LookupError(f"no classification for HTTP {status} in phase {phase}")


def error_rule(error: BaseException, phase: str) -> ErrorRule:
    """The first ERROR_RULES row for this exception in this phase."""
    for rule in ERROR_RULES:
        if phase in rule.phases and (not rule.errors or isinstance(error, rule.errors)):
            return rule
    raise LookupError(f"no classification for {type(error).__name__} in phase {phase}")


def classify(
    *,
    phase: str,
    summary: str,
    started: float,
    response: httpx.Response | None = None,
    error: BaseException | None = None,
    resource_type: str | None = None,
    detail: str | None = None,
) -> Outcome:
    """Turn one HTTP response or exception into an Outcome (SPEC 3.2). The only such mapping:
    ERROR_RULES and STATUS_RULES above, plus the body of a 2xx to create.

    `phase` CREATE is the clinical request itself. For the preflight phases (METADATA, TOKEN,
    SEARCH) the message was never sent, so every outcome there is provably not applied, and a
    timeout means "EHR unavailable" rather than "unknown outcome".
    """
    latency = _elapsed_ms(started)
    where = {METADATA: "metadata check: ", TOKEN: "token request: ", SEARCH: "search: "}.get(phase, "")

    if error is not None:
        rule = error_rule(error, phase)
        return Outcome(
            rule.outcome,
            rule.category,
            summary=summary,
            detail=rule.detail.format(where=where, name=type(error).__name__, error=error),
            latency_ms=latency,
            provably_not_applied=rule.not_applied,
        )

    assert response is not None
    status = response.status_code
    common = {
        "summary": summary,
        "status_code": status,
        "response_excerpt": _excerpt(response),
        "latency_ms": latency,
    }
    rule = status_rule(status, phase)
    if rule.outcome is AttemptOutcome.DELIVERED:
        return _success(response, resource_type, common)
    if not rule.answer:
        return Outcome(
            rule.outcome,
            rule.category,
            detail=rule.detail.format(
                where=where,
                status=status,
                location=response.headers.get("Location"),
                detail=detail or "unusable response body",
            ),
            provably_not_applied=rule.not_applied,
            **common,
        )
    issues = _issues_of(response.content)
    if rule.category is Category.AUTH and phase == TOKEN:
        oauth = _json_or_none(response.content)
        if isinstance(oauth, dict) and oauth.get("error"):
            detail = f"{oauth.get('error')}: {oauth.get('error_description', '')}".strip(": ")
    text = _describe_issues(issues) or detail or response.reason_phrase or ""
    return Outcome(
        rule.outcome,
        rule.category or categorize_fhir_status(status, issues),
        detail=rule.detail.format(where=where, status=status, text=f": {text}" if text else ""),
        retry_after_seconds=retry_after_seconds(response.headers.get("Retry-After")),
        provably_not_applied=rule.not_applied,
        issues=issues,
        **common,
    )


def _success(response: httpx.Response, resource_type: str | None, common: dict) -> Outcome:
    """A 2xx to create: delivered when the body (or, for return=minimal, the Location) proves it."""
    status = response.status_code
    body = _json_or_none(response.content) if response.content else None
    location = response.headers.get("Location") or response.headers.get("Content-Location")
    ref = _ref_from_location(location, resource_type or "")
    if isinstance(body, dict) and body.get("resourceType") == resource_type and status in (200, 201):
        rid = body.get("id")
        ref = f"{resource_type}/{rid}" if isinstance(rid, str) and rid else ref
        return Outcome(AttemptOutcome.DELIVERED, None, resource_ref=ref, detail=f"HTTP {status}", **common)
    # Prefer: return=minimal / return=OperationOutcome: the Location header is the proof.
    empty_or_oo = not response.content.strip() or (
        isinstance(body, dict) and body.get("resourceType") == "OperationOutcome"
    )
    if status in (200, 201, 204) and ref and empty_or_oo:
        return Outcome(
            AttemptOutcome.DELIVERED,
            None,
            resource_ref=ref,
            detail=f"HTTP {status} (location only)",
            issues=_issues_of(response.content),
            **common,
        )
    what = "accepted for asynchronous processing" if status == 202 else "a body we cannot trust"
    return Outcome(
        AttemptOutcome.UNKNOWN,
        Category.MALFORMED_RESPONSE,
        detail=f"the EHR answered HTTP {status} with {what}; it probably applied - reconcile before re-sending",
        **common,
    )


# --------------------------------------------------------------------------- adapter


class FhirR4Adapter(EhrAdapter):
    """Delivers FHIR resources with ``POST [base]/[type]`` to one connection.

    Thread-safe: the token cache and the version check are guarded by locks, so one adapter
    may serve several worker threads. A passed-in httpx client is not closed by the adapter.
    """

    token_scope: str | None = "system/*.read system/*.write"

    def __init__(self, settings: ConnectionSettings, client: httpx.Client | None = None):
        self.settings = settings
        self.base = settings.endpoint.rstrip("/")
        self.timeout = httpx.Timeout(
            connect=settings.connect_timeout,
            read=settings.read_timeout,
            write=settings.read_timeout,
            pool=settings.connect_timeout,
        )
        self._owns_client = client is None
        if client is None:
            client = httpx.Client(timeout=self.timeout, follow_redirects=False, verify=_default_ssl_context())
        self._client = client
        self._version_lock = threading.Lock()
        self._version_checked = False
        self.capability_summary = ""  # of the last CapabilityStatement fetched (domain/capability.py)
        self.capability_fetches = 0
        self._token_lock = threading.Lock()
        self._token: str | None = None
        self._token_expires_at = 0.0

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    # -- headers: the only place request headers are built

    def _headers(self, purpose: str, envelope: Envelope | None = None) -> dict[str, str]:
        """Headers for a request of `purpose` (CREATE, METADATA, SEARCH or TOKEN)."""
        if purpose == TOKEN:
            return {"Accept": "application/json", "User-Agent": USER_AGENT}
        headers = {"Accept": FHIR_JSON, "User-Agent": USER_AGENT}
        if purpose == CREATE and envelope is not None:
            headers["Content-Type"] = FHIR_JSON
            headers["Prefer"] = "return=representation"
            # The idempotency key rides on every attempt, for the EHR's logs and dedup if it has one.
            headers["X-Request-Id"] = envelope.delivery_value
            headers["X-Idempotency-Key"] = envelope.delivery_value
            if self.settings.supports_conditional_create:
                headers["If-None-Exist"] = if_none_exist(envelope.delivery_system, envelope.delivery_value)
        token = self._bearer_token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    # -- SMART backend services

    def _bearer_token(self) -> str | None:
        """A cached client-credentials access token, or None when the connection uses no auth.

        Raises ConfigError/AuthError for unusable settings and _Stop when the token endpoint fails.
        """
        s = self.settings
        if not s.auth_token_url:
            return None
        with self._token_lock:
            if self._token and time.monotonic() < self._token_expires_at:
                return self._token
            if not s.auth_client_id:
                raise ConfigError(f"connection {s.name}: auth_token_url is set but auth_client_id is not")
            secret = None
            if s.auth_secret_env:
                secret = os.environ.get(s.auth_secret_env)
                if not secret:
                    raise ConfigError(
                        f"connection {s.name}: environment variable {s.auth_secret_env} (client secret) is not set"
                    )
            form = {"grant_type": "client_credentials"}
            if self.token_scope:
                form["scope"] = self.token_scope
            auth = httpx.BasicAuth(s.auth_client_id, secret) if secret else None
            if auth is None:
                form["client_id"] = s.auth_client_id
            summary = f"POST {s.auth_token_url} token"
            started = time.monotonic()
            try:
                response = self._client.post(
                    s.auth_token_url, data=form, auth=auth, headers=self._headers(TOKEN), timeout=self.timeout
                )
            except (httpx.HTTPError, httpx.InvalidURL) as exc:
                raise _Stop(classify(phase=TOKEN, summary=summary, started=started, error=exc)) from None
            if response.status_code != 200:
                raise _Stop(classify(phase=TOKEN, summary=summary, started=started, response=response))
            doc = _json_or_none(response.content)
            token = doc.get("access_token") if isinstance(doc, dict) else None
            if not isinstance(token, str) or not token:
                raise _Stop(
                    classify(
                        phase=TOKEN,
                        summary=summary,
                        started=started,
                        response=response,
                        detail="token response has no access_token",
                    )
                )
            try:
                lifetime = float(doc.get("expires_in", 300))
            except (TypeError, ValueError):
                lifetime = 300.0
            # Renew a little early so a token never expires between check and use.
            self._token = token
            self._token_expires_at = time.monotonic() + max(0.0, lifetime - min(60.0, lifetime / 10))
            return token

    def _forget_token(self) -> None:
        with self._token_lock:
            self._token = None
            self._token_expires_at = 0.0

    # -- pinned FHIR version

    def _fetch_metadata(self) -> tuple[str, httpx.Response]:
        """GET [base]/metadata -> (fhirVersion, response); raises _Stop or AdapterError."""
        url = f"{self.base}/metadata"
        summary = f"GET {url} CapabilityStatement"
        started = time.monotonic()
        headers = self._headers(METADATA)
        try:
            response = self._client.get(url, headers=headers, timeout=self.timeout)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise _Stop(classify(phase=METADATA, summary=summary, started=started, error=exc)) from None
        if response.status_code != 200:
            if response.status_code == 401:
                self._forget_token()
            raise _Stop(classify(phase=METADATA, summary=summary, started=started, response=response))
        doc = _json_or_none(response.content)
        version = doc.get("fhirVersion") if isinstance(doc, dict) else None
        if not isinstance(doc, dict) or doc.get("resourceType") != "CapabilityStatement" or not version:
            raise _Stop(
                classify(
                    phase=METADATA,
                    summary=summary,
                    started=started,
                    response=response,
                    detail="the metadata endpoint did not return a CapabilityStatement with fhirVersion",
                )
            )
        self.capability_summary = capability_summary(doc)
        self.capability_fetches += 1
        return str(version), response

    def _version_matches(self, reported: str) -> bool:
        """Pinned "4.0.1" needs exactly 4.0.1; a pinned "4.0" accepts any 4.0.x. Never negotiates."""
        pinned = self.settings.fhir_version.strip().split(".")
        return reported.strip().split(".")[: len(pinned)] == pinned

    def forget_version_check(self) -> None:
        """Check the CapabilityStatement again before the next create (a config-looking failure,
        or the scheduled check saw the EHR change)."""
        with self._version_lock:
            self._version_checked = False

    def _ensure_version(self) -> None:
        """Check the CapabilityStatement once per adapter instance (until it passes)."""
        with self._version_lock:
            if self._version_checked:
                return
            version, _response = self._fetch_metadata()
            if not self._version_matches(version):
                raise VersionMismatch(
                    f"EHR reports fhirVersion {version}, connection pinned to {self.settings.fhir_version}"
                )
            self._version_checked = True

    # -- EhrAdapter

    def _refuse_unroutable(self, envelope: Envelope) -> None:
        """Connection-level refusals (category config) before looking at the payload."""
        s = self.settings
        if not s.enabled:
            raise ConfigError(f"connection {s.name} is disabled")
        if s.enabled_message_types and envelope.message_type not in s.enabled_message_types:
            raise ConfigError(f"message type {envelope.message_type} is not enabled on connection {s.name}")
        if envelope.content_type and "json" not in envelope.content_type.lower():
            raise ConfigError(
                f"connection {s.name} speaks FHIR JSON; cannot deliver content type {envelope.content_type}"
            )

    def deliver(self, envelope: Envelope) -> Outcome:
        """Deliver one message (create). Nothing is sent unless the payload is valid FHIR R4B."""
        started = time.monotonic()
        rtype = envelope.message_type
        url = f"{self.base}/{rtype}"
        summary = f"POST {url} {rtype}"
        try:
            self._refuse_unroutable(envelope)
            resource = prepare_resource(envelope)
            self._ensure_version()
            headers = self._headers(CREATE, envelope)
        except AdapterError as exc:
            outcome = exc.to_outcome(summary, _elapsed_ms(started))
            return self._logged(envelope, outcome)
        except _Stop as stop:
            # Keep the failing preflight request in the detail; the summary names the attempt.
            stop.outcome.detail = f"{stop.outcome.detail} [{stop.outcome.summary}; message not sent]"
            stop.outcome.summary = summary
            stop.outcome.latency_ms = _elapsed_ms(started)
            return self._logged(envelope, stop.outcome)

        body = json.dumps(resource, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        try:
            response = self._client.post(url, content=body, headers=headers, timeout=self.timeout)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            outcome = classify(phase=CREATE, summary=summary, started=started, error=exc, resource_type=rtype)
            return self._logged(envelope, outcome)
        if response.status_code == 401:
            self._forget_token()  # the next attempt fetches a fresh token
        outcome = classify(
            phase=CREATE, summary=summary, started=started, response=response, resource_type=rtype
        )
        return self._logged(envelope, outcome)

    def _logged(self, envelope: Envelope, outcome: Outcome) -> Outcome:
        # No payload and no patient data in logs: the key, the verdict and the numbers.
        log.info(
            "fhir deliver connection=%s type=%s key=%s outcome=%s category=%s status=%s latency_ms=%s",
            self.settings.name,
            envelope.message_type,
            envelope.delivery_value,
            outcome.outcome,
            outcome.category,
            outcome.status_code,
            outcome.latency_ms,
        )
        return outcome

    def find_applied(self, envelope: Envelope) -> bool | None:
        """Search the EHR by the delivery identifier. True/False only on a clear answer."""
        if not self.settings.supports_identifier_search:
            return None
        rtype = envelope.message_type
        if (
            not _TYPE_NAME_RE.match(rtype or "")
            or not envelope.delivery_system
            or not envelope.delivery_value
        ):
            return None
        url = f"{self.base}/{rtype}"
        try:
            response = self._client.get(
                url,
                params={"identifier": identifier_token(envelope.delivery_system, envelope.delivery_value)},
                headers=self._headers(SEARCH),
                timeout=self.timeout,
            )
        except (httpx.HTTPError, httpx.InvalidURL, AdapterError, _Stop) as exc:
            log.info(
                "fhir search connection=%s key=%s failed: %s",
                self.settings.name,
                envelope.delivery_value,
                exc,
            )
            return None
        if response.status_code != 200:
            if response.status_code == 401:
                self._forget_token()
            return None
        return _bundle_holds(_json_or_none(response.content), rtype, envelope)

    def check_connection(self) -> dict[str, Any]:
        """Fetch the CapabilityStatement (with a token when configured) and compare fhirVersion."""
        started = time.monotonic()
        result: dict[str, Any] = {
            "ok": False,
            "fhirVersion": None,
            "pinned": self.settings.fhir_version,
            "detail": "",
            "status_code": None,
            "latency_ms": 0,
        }
        try:
            version, response = self._fetch_metadata()
        except AdapterError as exc:
            result["detail"] = exc.message
        except _Stop as stop:
            result["detail"] = stop.outcome.detail
            result["status_code"] = stop.outcome.status_code
            result["category"] = str(stop.outcome.category)
        else:
            result["fhirVersion"] = version
            result["status_code"] = response.status_code
            if self._version_matches(version):
                result["ok"] = True
                result["detail"] = f"fhirVersion {version} matches the pinned {self.settings.fhir_version}"
                with self._version_lock:
                    self._version_checked = True
            else:
                result["detail"] = (
                    f"EHR reports fhirVersion {version}, connection pinned to {self.settings.fhir_version}"
                )
                result["category"] = str(Category.CONFIG)
        result["latency_ms"] = _elapsed_ms(started)
        return result


def _bundle_holds(doc: Any, resource_type: str, envelope: Envelope) -> bool | None:
    """Interpret a search Bundle: True only when a returned resource really carries our identifier.

    A server that ignores an unknown search parameter returns *everything*; trusting a non-empty
    Bundle blindly would mark an unsent message as applied, so such answers are "cannot tell".
    """
    if not isinstance(doc, dict) or doc.get("resourceType") != "Bundle":
        return None
    entries = doc.get("entry") or []
    if not isinstance(entries, list):
        return None
    resources = [
        e["resource"]
        for e in entries
        if isinstance(e, dict)
        and isinstance(e.get("resource"), dict)
        and e["resource"].get("resourceType") == resource_type
        and (e.get("search") or {}).get("mode", "match") == "match"
    ]
    for resource in resources:
        idents = resource.get("identifier")
        idents = [idents] if isinstance(idents, dict) else idents if isinstance(idents, list) else []
        for ident in idents:
            if (
                isinstance(ident, dict)
                and ident.get("system") == envelope.delivery_system
                and ident.get("value") == envelope.delivery_value
            ):
                return True
    total = doc.get("total")
    if resources or (isinstance(total, int) and total > 0):
        return None  # matches that do not carry the identifier: the server ignored the search
    return False
