"""Simulated EHR: a multi-tenant FHIR R4 server on the standard library (SPEC 4).

Every FHIR URL lives under ``/fhir/{tenant}/``; each tenant has its own store and its own
fault profile (see :mod:`app.simulator.profiles`). The ``/_sim`` API lets tests and drills
inspect what was applied and switch profiles at runtime.

Design notes:

* ``ThreadingHTTPServer`` with one thread per connection, so a slow (latency) request never
  blocks another one.
* A request whose client has gone away is still processed to the end (the latency sleep is not
  interrupted by a disconnect), because "the worker was killed mid-call but the EHR applied the
  order anyway" is exactly the situation the console must reconcile.
* The application logic (:class:`SimState`) knows nothing about sockets; the handler turns its
  :class:`SimResponse` into bytes, or into a dropped / reset connection.
* Further listeners (the HL7 v2 MLLP listener is a later issue) share the same
  :class:`SimState` and are started and stopped by :class:`SimServer` alongside the FHIR one.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import secrets
import signal
import socket
import struct
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from .profiles import PRESETS, Fault, FaultProfile, ProfileError, latency_for, resolve, unit_draw

log = logging.getLogger("app.simulator")

RESOURCE_TYPES = frozenset(
    {"Patient", "Encounter", "Observation", "MedicationRequest", "ServiceRequest", "DiagnosticReport"}
)
FHIR_JSON = "application/fhir+json; charset=utf-8"
MAX_BODY_BYTES = 10 * 1024 * 1024
_TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_ID_RE = re.compile(r"^[A-Za-z0-9.-]{1,64}$")
_ETAG_RE = re.compile(r'^\s*(?:W/)?"?([^"]*)"?\s*$')
# Search/result parameters a FHIR server accepts on any search; we ignore their effect.
_IGNORED_SEARCH_PARAMS = {"_count", "_format", "_summary", "_elements", "_pretty", "_sort", "_total"}


# --------------------------------------------------------------------------- responses


@dataclass
class SimResponse:
    """What the handler should do: send a response, or drop / reset the connection."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    action: str = "respond"  # "respond" | "drop" (shutdown without answering) | "reset" (TCP RST)

    @classmethod
    def json(cls, status: int, doc: Any, headers: dict[str, str] | None = None, *, fhir: bool = True):
        body = json.dumps(doc, separators=(",", ":")).encode("utf-8")
        hdrs = {"Content-Type": FHIR_JSON if fhir else "application/json"}
        hdrs.update(headers or {})
        return cls(status, body, hdrs)

    @classmethod
    def drop(cls) -> SimResponse:
        return cls(0, action="drop")

    @classmethod
    def reset(cls) -> SimResponse:
        return cls(0, action="reset")


def operation_outcome(code: str, diagnostics: str, *, expression: list[str] | None = None, severity="error"):
    """A one-issue OperationOutcome document."""
    issue: dict[str, Any] = {"severity": severity, "code": code, "diagnostics": diagnostics}
    if expression:
        issue["expression"] = expression
    return {"resourceType": "OperationOutcome", "issue": [issue]}


def _oo(status: int, code: str, diagnostics: str, headers: dict[str, str] | None = None, **kw) -> SimResponse:
    return SimResponse.json(status, operation_outcome(code, diagnostics, **kw), headers)


def _oo_many(status: int, issues: list[dict[str, Any]]) -> SimResponse:
    return SimResponse.json(status, {"resourceType": "OperationOutcome", "issue": issues})


def _control(status: int, doc: Any) -> SimResponse:
    return SimResponse.json(status, doc, fhir=False)


@dataclass
class SimRequest:
    """A parsed HTTP request as the application logic sees it."""

    method: str
    path: str
    segments: list[str]
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names
    body: bytes
    base_url: str  # scheme://host:port as the client addressed us

    def header(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name.lower(), default)


# --------------------------------------------------------------------------- identifiers


def identifier_tokens(resource: dict[str, Any]) -> list[str]:
    """'system|value' for every identifier of a resource (system may be empty)."""
    idents = resource.get("identifier")
    if isinstance(idents, dict):  # tolerate a single identifier object
        idents = [idents]
    if not isinstance(idents, list):
        return []
    tokens = []
    for ident in idents:
        if isinstance(ident, dict) and isinstance(ident.get("value"), str):
            system = ident.get("system") if isinstance(ident.get("system"), str) else ""
            tokens.append(f"{system}|{ident['value']}")
    return tokens


def _unescape(text: str) -> str:
    return re.sub(r"\\([\\|,$])", r"\1", text)


def parse_token(param: str) -> tuple[str | None, str | None]:
    """FHIR token search value -> (system, value); None means "any".

    ``system|value``, ``|value`` (no system), ``value`` (any system), ``system|`` (any value).
    A backslash escapes ``|`` inside either part.
    """
    parts = re.split(r"(?<!\\)\|", param, maxsplit=1)
    if len(parts) == 1:
        return None, _unescape(parts[0])
    system, value = _unescape(parts[0]), _unescape(parts[1])
    return system, (value if value != "" else None)


def _token_matches(token: str, system: str | None, value: str | None) -> bool:
    t_system, _, t_value = token.partition("|")
    if system is not None and t_system != system:
        return False
    return value is None or t_value == value


# --------------------------------------------------------------------------- per-tenant state


class TenantState:
    """One tenant's store, counters and profile. All access goes through ``lock``."""

    def __init__(self, name: str, profile: FaultProfile):
        self.name = name
        self.profile = profile
        self.lock = threading.RLock()
        self.resources: dict[tuple[str, str], dict[str, Any]] = {}
        self.by_token: dict[str, list[tuple[str, str]]] = {}
        self.next_id = 1
        self.create_requests: Counter[str] = Counter()  # per identifier token, received creates
        self.create_requests_without_identifier = 0
        self.create_requests_total = 0
        self.all_requests = 0
        self.draw_counts: Counter[str] = Counter()  # per draw key: how many creates so far
        self.tokens: dict[str, float] = {}  # bearer token -> monotonic expiry
        # HL7 v2 over MLLP (app/simulator/mllp_server.py), by MSH-10 control id.
        self.hl7_received: Counter[str] = Counter()
        self.hl7_applied: Counter[str] = Counter()
        self.hl7_seen: set[tuple[str, str, str]] = set()  # (MSH-3, MSH-4, MSH-10) for de-duplication
        self.hl7_last: dict[str, bytes] = {}  # control id -> the bytes last applied
        # Faults served (drawn or from a burst), by Fault value, over both halves.
        self.faults: Counter[str] = Counter()
        self.burst_faults: Counter[str] = Counter()  # of which served by a burst
        # A burst: every create / HL7 message gets `burst_fault` until `burst_until` (monotonic).
        self.burst_fault: Fault | None = None
        self.burst_until = 0.0
        self.burst_retry_after: int | None = None

    def fault_now(self, drawn: Fault | None) -> tuple[Fault | None, int | None]:
        """The fault for this request — a running burst's, else the drawn one — counted, and the
        burst's own Retry-After (None: the profile's)."""
        with self.lock:
            fault, retry_after = drawn, None
            if self.burst_fault is not None and time.monotonic() < self.burst_until:
                fault, retry_after = self.burst_fault, self.burst_retry_after
                self.burst_faults[fault.value] += 1
            if fault is not None:
                self.faults[fault.value] += 1
            return fault, retry_after

    def start_burst(self, fault: Fault | None, seconds: float, retry_after: int | None = None) -> None:
        """From now on, for `seconds`, every create (FHIR) and message (MLLP) gets `fault`."""
        with self.lock:
            self.burst_fault = fault if seconds > 0 else None
            self.burst_until = time.monotonic() + max(seconds, 0)
            self.burst_retry_after = retry_after

    def burst(self) -> dict[str, Any]:
        """The running burst (if any) and the faults served so far."""
        with self.lock:
            left = self.burst_until - time.monotonic()
            running = self.burst_fault is not None and left > 0
            return {
                "fault": self.burst_fault.value if running else None,
                "remaining_seconds": round(left, 3) if running else 0.0,
                "faults": dict(sorted(self.faults.items())),
                "burst_faults": dict(sorted(self.burst_faults.items())),
            }

    # -- store (callers hold the lock)

    def _index(self, key: tuple[str, str], resource: dict[str, Any], add: bool) -> None:
        for token in set(identifier_tokens(resource)):
            refs = self.by_token.setdefault(token, [])
            if add:
                refs.append(key)
            else:
                refs.remove(key)
                if not refs:
                    del self.by_token[token]

    def store(self, rtype: str, resource: dict[str, Any], rid: str | None = None) -> dict[str, Any]:
        """Create or replace a resource, stamping id and meta; returns the stored copy."""
        if rid is None:
            rid = str(self.next_id)
            self.next_id += 1
        key = (rtype, rid)
        previous = self.resources.get(key)
        version = 1
        if previous is not None:
            version = int(previous["meta"]["versionId"]) + 1
            self._index(key, previous, add=False)
        stored = json.loads(json.dumps(resource))  # private deep copy
        stored["id"] = rid
        meta = stored.get("meta") if isinstance(stored.get("meta"), dict) else {}
        meta["versionId"] = str(version)
        meta["lastUpdated"] = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        stored["meta"] = meta
        self.resources[key] = stored
        self._index(key, stored, add=True)
        return stored

    def search(self, rtype: str | None, system: str | None, value: str | None) -> list[dict[str, Any]]:
        """Resources (of `rtype`, or any type) carrying a matching identifier."""
        if system is not None and value is not None:
            keys = list(self.by_token.get(f"{system}|{value}", []))
        else:
            keys = sorted(
                {
                    k
                    for tok, refs in self.by_token.items()
                    if _token_matches(tok, system, value)
                    for k in refs
                },
                key=lambda k: (k[0], int(k[1]) if k[1].isdigit() else 0, k[1]),
            )
        return [self.resources[k] for k in keys if rtype is None or k[0] == rtype]

    # -- inspection (takes the lock)

    def applied(self, identifier: str | None = None) -> dict[str, Any]:
        """Stored resources per identifier, or the matches for one identifier."""
        with self.lock:
            if identifier is not None:
                system, value = parse_token(identifier)
                found = self.search(None, system, value)
                return {
                    "identifier": identifier,
                    "count": len(found),
                    "ids": [r["id"] for r in found],
                    "refs": [f"{r['resourceType']}/{r['id']}" for r in found],
                }
            return {
                "by_identifier": {tok: len(refs) for tok, refs in sorted(self.by_token.items())},
                "total": len(self.resources),
            }

    def requests(self) -> dict[str, Any]:
        """Create requests received (including dropped and reset ones) and all requests."""
        with self.lock:
            return {
                "by_identifier": dict(sorted(self.create_requests.items())),
                "without_identifier": self.create_requests_without_identifier,
                "total": self.create_requests_total,
                "all_requests": self.all_requests,
            }


class SimState:
    """All tenants of one simulator. Thread-safe; shared by every listener of a SimServer."""

    def __init__(self, default_profile: str = "default", stop_event: threading.Event | None = None):
        if default_profile not in PRESETS:
            raise ProfileError(f"unknown preset {default_profile!r}; known: {', '.join(sorted(PRESETS))}")
        self.default_profile = default_profile
        self._lock = threading.Lock()
        self._tenants: dict[str, TenantState] = {}
        self._stop = stop_event or threading.Event()

    # -- tenants

    def tenant(self, name: str) -> TenantState:
        """The tenant, created with the default profile on first use."""
        with self._lock:
            state = self._tenants.get(name)
            if state is None:
                state = self._tenants[name] = TenantState(name, PRESETS[self.default_profile])
            return state

    def peek(self, name: str) -> TenantState:
        """The tenant if it exists, else an empty unregistered one (inspection must not create)."""
        with self._lock:
            return self._tenants.get(name) or TenantState(name, PRESETS[self.default_profile])

    def tenant_names(self) -> list[str]:
        with self._lock:
            return sorted(self._tenants)

    def set_profile(self, name: str, document: dict[str, Any] | None = None) -> FaultProfile:
        """Replace a tenant's profile with `{"preset": NAME, ...overrides}`; returns the effective one."""
        profile = resolve(document, self.default_profile)
        tenant = self.tenant(name)
        with tenant.lock:
            tenant.profile = profile
        log.info("sim tenant %s profile %s", name, profile.name)
        return profile

    def reset(self, name: str | None = None) -> None:
        """Forget one tenant (store, counters, tokens, profile) or all of them."""
        with self._lock:
            if name is None:
                self._tenants.clear()
            else:
                self._tenants.pop(name, None)

    # -- dispatch

    def handle(self, req: SimRequest) -> SimResponse:
        """Route one HTTP request."""
        segs = req.segments
        try:
            if segs[:1] == ["_sim"]:
                return self._handle_control(req, segs[1:])
            if len(segs) >= 2 and segs[0] == "fhir":
                if not _TENANT_RE.match(segs[1]):
                    return _oo(404, "not-found", f"Unknown tenant path {segs[1]!r}")
                return self._handle_fhir(req, self.tenant(segs[1]), segs[2:])
            return _oo(404, "not-found", "Not a FHIR endpoint: use /fhir/{tenant}/...")
        except Exception:  # a bug in the simulator must still produce an answer
            log.exception("sim: unhandled error for %s %s", req.method, req.path)
            return _oo(500, "exception", "Internal simulator error")

    # -- control API

    def _handle_control(self, req: SimRequest, segs: list[str]) -> SimResponse:
        m = req.method
        if segs == ["health"] and m == "GET":
            return _control(200, {"status": "ok", "tenants": len(self.tenant_names())})
        if segs == ["presets"] and m == "GET":
            return _control(200, {name: p.to_dict() for name, p in sorted(PRESETS.items())})
        if segs == ["tenants"] and m == "GET":
            return _control(200, {"tenants": self.tenant_names(), "default_profile": self.default_profile})
        if segs == ["reset"] and m == "POST":
            self.reset()
            return _control(200, {"reset": "all"})
        if len(segs) == 3 and segs[0] == "tenants" and _TENANT_RE.match(segs[1]):
            tenant_name, what = segs[1], segs[2]
            if what == "applied" and m == "GET":
                ident = (req.query.get("identifier") or [None])[0]
                return _control(200, self.peek(tenant_name).applied(ident))
            if what == "requests" and m == "GET":
                return _control(200, self.peek(tenant_name).requests())
            if what == "hl7" and m == "GET":
                tenant = self.peek(tenant_name)
                with tenant.lock:
                    return _control(
                        200,
                        {
                            "received": dict(sorted(tenant.hl7_received.items())),
                            "applied": dict(sorted(tenant.hl7_applied.items())),
                        },
                    )
            if what == "burst" and m == "GET":
                return _control(200, self.peek(tenant_name).burst())
            if what == "burst" and m == "POST":
                try:
                    doc = json.loads(req.body or b"{}")
                    fault = Fault(doc["fault"]) if doc.get("fault") else None
                    seconds, retry_after = float(doc.get("seconds", 0)), doc.get("retry_after")
                    if retry_after is not None and (not isinstance(retry_after, int) or retry_after < 0):
                        raise ValueError("retry_after must be a non-negative integer")
                except (ValueError, TypeError, KeyError, AttributeError) as exc:
                    return _control(400, {"error": f"burst: {exc}"})
                tenant = self.tenant(tenant_name)
                tenant.start_burst(fault, seconds, retry_after)
                return _control(200, tenant.burst())
            if what == "profile" and m == "GET":
                return _control(200, self.peek(tenant_name).profile.to_dict())
            if what == "profile" and m == "PUT":
                try:
                    doc = json.loads(req.body or b"{}")
                    if not isinstance(doc, dict):
                        raise ProfileError("the profile document must be a JSON object")
                    profile = self.set_profile(tenant_name, doc)
                except (ValueError, TypeError) as exc:  # ProfileError and JSON errors
                    return _control(400, {"error": str(exc)})
                return _control(200, profile.to_dict())
            if what == "reset" and m == "POST":
                self.reset(tenant_name)
                return _control(200, {"reset": tenant_name})
        return _control(404, {"error": f"no control endpoint {m} /_sim/{'/'.join(segs)}"})

    # -- FHIR API

    def _handle_fhir(self, req: SimRequest, tenant: TenantState, rest: list[str]) -> SimResponse:
        with tenant.lock:
            tenant.all_requests += 1
            profile = tenant.profile
            n = tenant.all_requests
        m = req.method
        if rest == ["metadata"]:
            if m != "GET":
                return _oo(405, "not-supported", "metadata only supports GET")
            return SimResponse.json(200, self._capability(req, tenant, profile))
        if rest == ["auth", "token"]:
            self._delay(latency_for(profile, tenant.name, req.path, n))
            if m != "POST":
                return _control(405, {"error": "invalid_request", "error_description": "use POST"})
            return self._token(req, tenant, profile)
        if not rest or rest[0] not in RESOURCE_TYPES:
            what = rest[0] if rest else ""
            self._delay(latency_for(profile, tenant.name, req.path, n))
            return _oo(404, "not-found", f"Resource type {what!r} is not supported by this server")
        rtype = rest[0]
        if len(rest) == 1 and m == "POST":
            return self._create(req, tenant, rtype)  # applies its own latency after counting
        self._delay(latency_for(profile, tenant.name, req.path, n))
        denied = self._authorize(req, tenant, profile)
        if denied:
            return denied
        if len(rest) == 1 and m == "GET":
            return self._search(req, tenant, rtype)
        if len(rest) == 2 and _ID_RE.match(rest[1]):
            if m == "GET":
                return self._read(req, tenant, rtype, rest[1])
            if m == "PUT":
                return self._update(req, tenant, profile, rtype, rest[1])
        return _oo(405, "not-supported", f"{m} {'/'.join(rest)} is not supported")

    def _delay(self, seconds: float) -> None:
        """Simulated latency. A client disconnect does not cut it short; stopping the server does."""
        if seconds > 0:
            self._stop.wait(seconds)

    def _capability(self, req: SimRequest, tenant: TenantState, profile: FaultProfile) -> dict[str, Any]:
        base = f"{req.base_url}/fhir/{tenant.name}"
        rest: dict[str, Any] = {
            "mode": "server",
            "resource": [
                {
                    "type": t,
                    "interaction": [{"code": c} for c in ("read", "create", "update", "search-type")],
                    "versioning": "versioned-update",
                    "updateCreate": True,
                    # A server that ignores If-None-Exist still claims support: that is the trap.
                    "conditionalCreate": True,
                    "searchParam": [
                        {"name": "identifier", "type": "token"},
                        {"name": "_id", "type": "token"},
                    ],
                }
                for t in sorted(RESOURCE_TYPES)
            ],
        }
        if profile.require_bearer_token:
            rest["security"] = {
                "service": [
                    {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                "code": "SMART-on-FHIR",
                            }
                        ]
                    }
                ],
                "extension": [
                    {
                        "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                        "extension": [{"url": "token", "valueUri": f"{base}/auth/token"}],
                    }
                ],
            }
        return {
            "resourceType": "CapabilityStatement",
            "status": "active",
            "date": datetime.now(UTC).date().isoformat(),
            "kind": "instance",
            "software": {"name": "Recon simulated EHR", "version": "1.0"},
            "implementation": {"description": f"Simulated EHR tenant {tenant.name}", "url": base},
            "fhirVersion": profile.fhir_version,
            "format": ["json"],
            "rest": [rest],
        }

    # -- auth

    def _token(self, req: SimRequest, tenant: TenantState, profile: FaultProfile) -> SimResponse:
        """OAuth2 client-credentials token endpoint (client_secret_basic or client_secret_post)."""
        form = {k: v[0] for k, v in parse_qs(req.body.decode("utf-8", "replace")).items()}
        if form.get("grant_type") != "client_credentials":
            return _control(400, {"error": "unsupported_grant_type"})
        client_id, client_secret = form.get("client_id"), form.get("client_secret")
        auth = req.header("authorization") or ""
        if auth.lower().startswith("basic "):
            try:
                client_id, _, client_secret = base64.b64decode(auth[6:]).decode("utf-8").partition(":")
            except ValueError:
                return _control(400, {"error": "invalid_request", "error_description": "bad Basic header"})
        if profile.client_id is not None and (
            client_id != profile.client_id or client_secret != profile.client_secret
        ):
            return _control(401, {"error": "invalid_client", "error_description": "unknown client or secret"})
        token = secrets.token_urlsafe(24)
        with tenant.lock:
            now = time.monotonic()
            tenant.tokens = {t: exp for t, exp in tenant.tokens.items() if exp > now}
            tenant.tokens[token] = now + profile.token_ttl_seconds
        return _control(
            200,
            {
                "access_token": token,
                "token_type": "bearer",
                "expires_in": profile.token_ttl_seconds,
                "scope": form.get("scope", "system/*.*"),
            },
        )

    def _authorize(self, req: SimRequest, tenant: TenantState, profile: FaultProfile) -> SimResponse | None:
        """401 OperationOutcome when the token profile says so; None when the request may proceed."""

        def deny(code: str, message: str, error: str = "invalid_token") -> SimResponse:
            challenge = f'Bearer realm="recon-sim", error="{error}", error_description="{message}"'
            return _oo(401, code, message, {"WWW-Authenticate": challenge})

        if profile.expired_token:
            return deny("expired", "The access token expired")
        if not profile.require_bearer_token:
            return None
        auth = req.header("authorization") or ""
        if not auth.lower().startswith("bearer "):
            return deny("login", "A bearer token is required", error="invalid_request")
        with tenant.lock:
            expiry = tenant.tokens.get(auth[7:].strip())
        if expiry is None:
            return deny("security", "Unknown access token")
        if expiry <= time.monotonic():
            return deny("expired", "The access token expired")
        return None

    # -- interactions

    def _create(self, req: SimRequest, tenant: TenantState, rtype: str) -> SimResponse:
        resource, parse_error = _parse_resource(req.body)
        tokens = identifier_tokens(resource) if resource else []
        # The draw key names the logical message: the same identifiers on a retry give the same
        # key, and the request number n makes the retry's draw independent of the first one.
        draw_key = ",".join(sorted(set(tokens))) or req.path
        with tenant.lock:
            tenant.create_requests_total += 1
            for token in set(tokens):
                tenant.create_requests[token] += 1
            if not tokens:
                tenant.create_requests_without_identifier += 1
            n = tenant.draw_counts[draw_key]
            tenant.draw_counts[draw_key] += 1
            profile = tenant.profile
        self._delay(latency_for(profile, tenant.name, draw_key, n))

        denied = self._authorize(req, tenant, profile)
        if denied:
            return denied
        if parse_error or resource is None:
            return _oo(400, "structure", parse_error or "Body is not a resource")
        if resource["resourceType"] != rtype:
            return _oo(400, "invalid", f"Body is a {resource['resourceType']}, but the URL is for {rtype}")

        fault, seconds = tenant.fault_now(
            profile.fault_for(unit_draw(tenant.name, draw_key, n, profile.seed))
        )
        retry_after = {"Retry-After": str(profile.retry_after_seconds if seconds is None else seconds)}
        if fault is Fault.RESET:
            return SimResponse.reset()
        if fault is Fault.UNAVAILABLE_503:
            return _oo(
                503, "transient", "Service temporarily unavailable; nothing was processed", retry_after
            )
        if fault is Fault.THROTTLED_429:
            return _oo(429, "throttled", "Too many requests; nothing was processed", retry_after)
        if fault is Fault.ERROR_500:
            return _oo(500, "exception", "Internal server error")
        if fault is Fault.REJECT:
            return _oo(422, "invalid", f"{rtype} failed business rule validation (simulated rejection)")

        problems = _quirk_problems(profile, rtype, resource)
        if problems:
            return _oo_many(422, problems)

        if fault is Fault.SLOW_COMMIT_THEN_DROP:
            self._delay(profile.slow_commit_seconds)
        with tenant.lock:
            condition = req.header("if-none-exist")
            if condition and not profile.ignore_if_none_exist:
                criteria = parse_qs(condition.lstrip("?"), keep_blank_values=True)
                if set(criteria) != {"identifier"} or len(criteria["identifier"]) != 1:
                    return _oo(400, "invalid", "If-None-Exist supports exactly one identifier=system|value")
                matches = tenant.search(rtype, *parse_token(criteria["identifier"][0]))
                if len(matches) == 1:
                    existing = matches[0]
                    return SimResponse.json(200, existing, _resource_headers(req, tenant, existing))
                if len(matches) > 1:
                    return _oo(
                        412, "multiple-matches", f"If-None-Exist matched {len(matches)} {rtype} resources"
                    )
            stored = tenant.store(rtype, resource)

        if fault in (Fault.COMMIT_THEN_DROP, Fault.SLOW_COMMIT_THEN_DROP):
            return SimResponse.drop()
        status = 200 if profile.create_returns_200 else 201
        response = SimResponse.json(status, stored, _resource_headers(req, tenant, stored))
        if fault is Fault.MALFORMED:
            response.body = response.body[: max(1, len(response.body) // 2)]  # truncated, not JSON
        return response

    def _read(self, req: SimRequest, tenant: TenantState, rtype: str, rid: str) -> SimResponse:
        with tenant.lock:
            resource = tenant.resources.get((rtype, rid))
        if resource is None:
            return _oo(404, "not-found", f"{rtype}/{rid} is not known")
        return SimResponse.json(200, resource, _resource_headers(req, tenant, resource, location=False))

    def _search(self, req: SimRequest, tenant: TenantState, rtype: str) -> SimResponse:
        unknown = sorted(set(req.query) - {"identifier", "_id"} - _IGNORED_SEARCH_PARAMS)
        if unknown:
            return _oo(400, "processing", f"Unknown search parameter(s): {', '.join(unknown)}")
        with tenant.lock:
            found = [
                r
                for (t, _i), r in sorted(tenant.resources.items(), key=lambda kv: _sort_key(kv[0]))
                if t == rtype
            ]
            for param in req.query.get("identifier", []):
                allowed = set()
                for alternative in re.split(r"(?<!\\),", param):  # comma = OR
                    allowed |= {id(r) for r in tenant.search(rtype, *parse_token(alternative))}
                found = [r for r in found if id(r) in allowed]
            for param in req.query.get("_id", []):
                ids = set(param.split(","))
                found = [r for r in found if r["id"] in ids]
        base = f"{req.base_url}/fhir/{tenant.name}"
        bundle = {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(found),
            "link": [{"relation": "self", "url": f"{req.base_url}{req.path}"}],
            "entry": [
                {"fullUrl": f"{base}/{rtype}/{r['id']}", "resource": r, "search": {"mode": "match"}}
                for r in found
            ],
        }
        return SimResponse.json(200, bundle)

    def _update(
        self, req: SimRequest, tenant: TenantState, profile: FaultProfile, rtype: str, rid: str
    ) -> SimResponse:
        resource, parse_error = _parse_resource(req.body)
        if parse_error or resource is None:
            return _oo(400, "structure", parse_error or "Body is not a resource")
        if resource["resourceType"] != rtype:
            return _oo(400, "invalid", f"Body is a {resource['resourceType']}, but the URL is for {rtype}")
        if resource.get("id") != rid:
            return _oo(
                400, "invalid", f"Resource id {resource.get('id')!r} does not match the URL id {rid!r}"
            )
        problems = _quirk_problems(profile, rtype, resource)
        if problems:
            return _oo_many(422, problems)
        if_match = req.header("if-match")
        with tenant.lock:
            current = tenant.resources.get((rtype, rid))
            if if_match is not None:
                wanted = _ETAG_RE.match(if_match)
                wanted_version = wanted.group(1) if wanted else if_match
                if current is None:
                    return _oo(412, "conflict", f"If-Match given but {rtype}/{rid} does not exist")
                if current["meta"]["versionId"] != wanted_version:
                    return _oo(
                        412,
                        "conflict",
                        f"Version conflict: If-Match {if_match} but current version is "
                        f"{current['meta']['versionId']}",
                    )
            stored = tenant.store(rtype, resource, rid)
        status = 201 if current is None else 200
        return SimResponse.json(
            status, stored, _resource_headers(req, tenant, stored, location=current is None)
        )


def _sort_key(key: tuple[str, str]) -> tuple[str, int, str]:
    return key[0], int(key[1]) if key[1].isdigit() else 0, key[1]


def _parse_resource(body: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """(resource, None) or (None, reason) for a body that is not a JSON resource of a known type."""
    if not body:
        return None, "Request body is empty"
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        return None, f"Body is not valid JSON: {exc}"
    if not isinstance(doc, dict):
        return None, "Body is not a JSON object"
    rtype = doc.get("resourceType")
    if not isinstance(rtype, str) or not rtype:
        return None, "Body has no resourceType"
    if rtype not in RESOURCE_TYPES:
        return None, f"Unknown or unsupported resourceType {rtype!r}"
    return doc, None


def _quirk_problems(profile: FaultProfile, rtype: str, resource: dict[str, Any]) -> list[dict[str, Any]]:
    """OperationOutcome issues for vendor quirks: required extra fields and refused code systems."""
    issues: list[dict[str, Any]] = []
    for name in profile.require_fields.get(rtype, []):
        if resource.get(name) in (None, "", [], {}):
            issues.append(
                {
                    "severity": "error",
                    "code": "required",
                    "diagnostics": f"{rtype}.{name} is required by this server",
                    "expression": [f"{rtype}.{name}"],
                }
            )
    if profile.reject_code_systems:
        refused = set(profile.reject_code_systems)
        for path, coding in _codings(resource, rtype):
            system = coding.get("system")
            if system in refused:
                issues.append(
                    {
                        "severity": "error",
                        "code": "code-invalid",
                        "diagnostics": f"Code system {system} is not accepted (code {coding.get('code')!r})",
                        "expression": [f"{path}.system"],
                    }
                )
    return issues


def _codings(node: Any, path: str):
    """Yield (FHIRPath-like path, coding) for every Coding anywhere below `node`."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "coding" and isinstance(value, list):
                for i, coding in enumerate(value):
                    if isinstance(coding, dict):
                        yield f"{path}.coding[{i}]", coding
            yield from _codings(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _codings(item, f"{path}[{i}]")


def _resource_headers(
    req: SimRequest, tenant: TenantState, resource: dict[str, Any], *, location: bool = True
) -> dict[str, str]:
    version = resource["meta"]["versionId"]
    headers = {
        "ETag": f'W/"{version}"',
        "Last-Modified": format_datetime(datetime.now(UTC), usegmt=True),
    }
    if location:
        headers["Location"] = (
            f"{req.base_url}/fhir/{tenant.name}/{resource['resourceType']}/{resource['id']}/_history/{version}"
        )
    return headers


# --------------------------------------------------------------------------- HTTP plumbing


class _Handler(BaseHTTPRequestHandler):
    """Turns bytes into SimRequest and SimResponse back into bytes (or a dropped connection)."""

    protocol_version = "HTTP/1.1"  # keep-alive, like a real EHR front end
    server_version = "ReconSimEHR/1.0"
    timeout = 60  # idle keep-alive connections close after a minute (longer than httpx's 5 s)
    # Headers and body go out in separate writes; without this, Nagle plus delayed ACK add ~40 ms.
    disable_nagle_algorithm = True
    server: _HttpServer

    def do_GET(self) -> None:
        self._serve()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

    def _serve(self) -> None:
        body = self._read_body()
        if body is None:
            return
        url = urlsplit(self.path)
        segments = [unquote(s) for s in url.path.split("/") if s]
        host = self.headers.get("Host") or "{}:{}".format(*self.server.server_address[:2])
        req = SimRequest(
            method=self.command,
            path=self.path,
            segments=segments,
            query=parse_qs(url.query, keep_blank_values=True),
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
            base_url=f"http://{host}",
        )
        resp = self.server.state.handle(req)
        if resp.action == "respond":
            self._respond(resp)
        else:
            self._abort(reset=resp.action == "reset")

    def _read_body(self) -> bytes | None:
        """The request body (Content-Length or chunked); None when the request was answered already."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            total = 0
            while True:
                line = self.rfile.readline(1024)
                try:
                    size = int(line.split(b";")[0].strip() or b"0", 16)
                except ValueError:
                    self._respond(_oo(400, "structure", "Bad chunked encoding"), close=True)
                    return None
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                total += size
                if total > MAX_BODY_BYTES:
                    self._respond(_oo(413, "too-long", "Request body too large"), close=True)
                    return None
                chunks.append(self.rfile.read(size))
                self.rfile.readline(16)
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self._respond(_oo(400, "structure", "Bad Content-Length"), close=True)
            return None
        if length > MAX_BODY_BYTES:
            self._respond(_oo(413, "too-long", "Request body too large"), close=True)
            return None
        body = self.rfile.read(length) if length else b""
        if len(body) < length:  # the client went away mid-body: nothing to process
            self.close_connection = True
            return None
        return body

    def _respond(self, resp: SimResponse, *, close: bool = False) -> None:
        try:
            self.send_response(resp.status)
            for name, value in resp.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(resp.body)))
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(resp.body)
        except OSError as exc:  # the client is gone; the work is done regardless
            log.debug("sim: client went away before the response: %s", exc)
            self.close_connection = True

    def _abort(self, *, reset: bool) -> None:
        """Close the connection without a response: FIN (drop) or RST (reset)."""
        self.close_connection = True
        sock = self.connection
        try:
            if reset:
                # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.rfile.close()  # release the makefile reference so close() really closes
                sock.close()
            else:
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("sim %s - %s", self.address_string(), format % args)


class _HttpServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that remembers its open connections so stop() can close them."""

    daemon_threads = True
    block_on_close = True  # stop() joins handler threads after closing their sockets
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], state: SimState):
        self.state = state
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def process_request(self, request, client_address):
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._open_lock:
            open_now = list(self._open)
        for sock in open_now:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request, client_address) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):  # resets, broken pipes, timeouts on idle keep-alive
            log.debug("sim: connection error from %s: %s", client_address, exc)
        else:
            log.exception("sim: error while handling a request from %s", client_address)


class _FhirListener:
    """The HTTP listener. Other listeners (MLLP) follow the same start/stop/port shape."""

    def __init__(self, host: str, port: int, state: SimState):
        self.host, self.requested_port, self.state = host, port, state
        self._httpd: _HttpServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._httpd.server_address[1] if self._httpd else self.requested_port

    def start(self) -> None:
        self._httpd = _HttpServer((self.host, self.requested_port), self.state)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1}, name="sim-fhir", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()  # stops accepting
        self._httpd.close_connections()  # wakes keep-alive readers
        self._httpd.server_close()  # closes the listening socket and joins handler threads
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = None


class SimServer:
    """The simulated EHR: shared state plus its network listeners.

    >>> sim = SimServer(fhir_port=0).start()
    >>> sim.tenant_url("acme-epic")  # doctest: +SKIP
    'http://127.0.0.1:54321/fhir/acme-epic'
    >>> sim.stop()
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        fhir_port: int = 0,
        default_profile: str = "default",
        mllp_port: int | None = None,
    ):
        self.host = host
        self._stop_event = threading.Event()
        self.state = SimState(default_profile, self._stop_event)
        self._fhir = _FhirListener(host, fhir_port, self.state)
        self._listeners: list[Any] = [self._fhir]
        self._mllp = None
        if mllp_port is not None:
            from .mllp_server import MllpListener

            self._mllp = MllpListener(host, mllp_port, self.state, self._stop_event)
            self._listeners.append(self._mllp)
        self._started = False
        self._stopped = threading.Event()

    # -- lifecycle

    def start(self) -> SimServer:
        """Bind and serve in background threads; returns self."""
        if self._started:
            return self
        self._stop_event.clear()
        self._stopped.clear()
        started = []
        try:
            for listener in self._listeners:
                listener.start()
                started.append(listener)
        except BaseException:
            for listener in reversed(started):
                listener.stop()
            raise
        self._started = True
        log.info(
            "sim: FHIR R4 listening on %s (default profile %s)", self.base_url, self.state.default_profile
        )
        return self

    def stop(self) -> None:
        """Stop listening, cut open connections and wake sleeping requests."""
        if not self._started:
            return
        self._stop_event.set()
        for listener in reversed(self._listeners):
            listener.stop()
        self._started = False
        self._stopped.set()

    def serve_forever(self) -> None:
        """Serve in the foreground until stop() is called from another thread or Ctrl-C."""
        self.start()
        try:
            while not self._stopped.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def __enter__(self) -> SimServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- addresses

    @property
    def fhir_port(self) -> int:
        return self._fhir.port

    @property
    def mllp_port(self) -> int | None:
        return self._mllp.port if self._mllp else None

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.fhir_port}"

    def tenant_url(self, tenant: str) -> str:
        """FHIR base URL of a tenant, e.g. http://127.0.0.1:8090/fhir/acme-epic."""
        return f"{self.base_url}/fhir/{tenant}"

    # -- in-process inspection (same documents as the /_sim HTTP API)

    def set_profile(self, tenant: str, preset: str | None = None, **overrides: Any) -> FaultProfile:
        """Like PUT /_sim/tenants/{t}/profile: `preset` (default: the server's) plus field overrides."""
        doc = dict(overrides)
        if preset:
            doc["preset"] = preset
        return self.state.set_profile(tenant, doc)

    def applied(self, tenant: str, identifier: str | None = None) -> dict[str, Any]:
        """Like GET /_sim/tenants/{t}/applied[?identifier=system|value]."""
        return self.state.peek(tenant).applied(identifier)

    def requests(self, tenant: str) -> dict[str, Any]:
        """Like GET /_sim/tenants/{t}/requests."""
        return self.state.peek(tenant).requests()

    def reset(self, tenant: str | None = None) -> None:
        """Like POST /_sim/tenants/{t}/reset, or POST /_sim/reset without a tenant."""
        self.state.reset(tenant)

    def burst(self, tenant: str, fault: Fault | str | None, seconds: float, retry_after: int | None = None):
        """Like POST /_sim/tenants/{t}/burst: `fault` on every create and HL7 message for `seconds`."""
        state = self.state.tenant(tenant)
        state.start_burst(Fault(fault) if fault else None, seconds, retry_after)
        return state.burst()


def run_sim(
    host: str = "127.0.0.1", fhir_port: int = 8090, profile: str = "default", mllp_port: int | None = None
) -> None:
    """Serve the simulator until SIGINT or SIGTERM (``recon sim``)."""
    server = SimServer(host=host, fhir_port=fhir_port, default_profile=profile, mllp_port=mllp_port).start()
    done = threading.Event()
    previous: dict[int, Any] = {}

    def _on_signal(signum: int, _frame: Any) -> None:
        done.set()

    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, _on_signal)
    except ValueError:  # not the main thread: rely on KeyboardInterrupt / the caller
        pass
    mllp = f"HL7 v2 MLLP on {host}:{server.mllp_port} (tenant = MSH-6); " if server.mllp_port else ""
    print(
        f"recon sim: FHIR R4 on {server.base_url}/fhir/<tenant> (default profile {profile}); {mllp}"
        f"control API {server.base_url}/_sim/health",
        flush=True,
    )
    try:
        while not done.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.stop()
