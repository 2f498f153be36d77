"""Fault profiles of the simulated EHR (SPEC 4 'Simulated EHR').

A profile is a plain, JSON-serialisable dataclass. Every random-looking behaviour
(fault rates, latency jitter) is drawn from a SHA-256 of (tenant, key, request
number, seed), so a test or a chaos drill replays exactly the same faults for the
same inputs, while a retry of the same identifier (next request number) gets a
fresh draw.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

ICD9_SYSTEM = "http://hl7.org/fhir/sid/icd-9-cm"


class Fault(StrEnum):
    """What the simulator does to one create request instead of (or after) applying it."""

    RESET = "reset"  # close the connection with a TCP RST before processing: nothing stored
    COMMIT_THEN_DROP = "commit_then_drop"  # store, then close the connection without a response
    MALFORMED = "malformed"  # store, then answer 201 with a truncated body
    ERROR_500 = "error_500"  # internal error before the commit: nothing stored
    UNAVAILABLE_503 = "unavailable_503"  # refused before processing: nothing stored
    THROTTLED_429 = "throttled_429"  # refused before processing: nothing stored
    REJECT = "reject"  # 422 OperationOutcome "invalid": nothing stored
    SLOW_COMMIT_THEN_DROP = "slow_commit_then_drop"  # wait slow_commit_seconds, store, then drop


# Order in which the rates carve up the unit interval; fixed so draws stay reproducible.
_FAULT_RATES: tuple[tuple[Fault, str], ...] = (
    (Fault.RESET, "rate_reset"),
    (Fault.COMMIT_THEN_DROP, "rate_commit_then_drop"),
    (Fault.MALFORMED, "rate_malformed"),
    (Fault.ERROR_500, "rate_500"),
    (Fault.UNAVAILABLE_503, "rate_503"),
    (Fault.THROTTLED_429, "rate_429"),
    (Fault.REJECT, "rate_reject"),
    (Fault.SLOW_COMMIT_THEN_DROP, "rate_slow_commit_then_drop"),  # last: earlier draws stay the same
)


class ProfileError(ValueError):
    """A profile document names an unknown preset or field, or has a value of the wrong type."""


@dataclass(frozen=True)
class FaultProfile:
    """How one simulated tenant behaves. Rates are probabilities in [0, 1] applied to creates."""

    name: str = "default"
    description: str = ""
    seed: str = "0"
    # Timing: added to every FHIR request except metadata (and never to /_sim).
    latency_ms: int = 0
    latency_jitter_ms: int = 0  # deterministic extra 0..jitter ms per request
    # Fault rates for create (POST) requests; they are mutually exclusive per request.
    rate_500: float = 0.0
    rate_503: float = 0.0
    rate_429: float = 0.0
    retry_after_seconds: int = 1  # Retry-After sent with 429 and 503
    rate_reset: float = 0.0
    rate_commit_then_drop: float = 0.0
    rate_malformed: float = 0.0
    rate_reject: float = 0.0
    # Applied late: after slow_commit_seconds (often past the client's read timeout), then dropped.
    rate_slow_commit_then_drop: float = 0.0
    slow_commit_seconds: int = 30
    # Authentication.
    expired_token: bool = False  # every request but metadata and the token endpoint gets 401 "expired"
    require_bearer_token: bool = False  # requests need a token from POST /fhir/{t}/auth/token
    client_id: str | None = None  # when set, the token endpoint checks these credentials
    client_secret: str | None = None
    token_ttl_seconds: int = 300
    # Vendor quirks.
    ignore_if_none_exist: bool = False
    create_returns_200: bool = False
    require_fields: dict[str, list[str]] = field(default_factory=dict)
    reject_code_systems: list[str] = field(default_factory=list)
    fhir_version: str = "4.0.1"
    # HL7 v2 over MLLP. The rates above apply too: reset (closed before storing), commit_then_drop
    # (stored, no ACK), reject (AR), latency_ms (before the ACK: a late ACK). A burst (POST
    # /_sim/tenants/{t}/burst, fhir_server.py) overrides the draw on both halves for its duration;
    # on MLLP a 503/429 burst drops the connection before storing (HL7 has no "try later").
    hl7_required_fields: list[str] = field(default_factory=list)  # e.g. ["PID-7"]: AE + ERR when empty
    mllp_dedupe: bool = True  # a careful receiver: one apply per (MSH-3, MSH-4, MSH-10)
    mllp_wrong_msa2: bool = False  # ACK AA echoing another control id

    def __post_init__(self) -> None:
        _check_types(self)
        for _fault, attr in _FAULT_RATES:
            rate = getattr(self, attr)
            if not 0.0 <= rate <= 1.0:
                raise ProfileError(f"{attr} must be between 0 and 1, got {rate}")
        if sum(getattr(self, attr) for _f, attr in _FAULT_RATES) > 1.0 + 1e-9:
            raise ProfileError("the fault rates add up to more than 1")
        for attr in (
            "latency_ms",
            "latency_jitter_ms",
            "retry_after_seconds",
            "token_ttl_seconds",
            "slow_commit_seconds",
        ):
            if getattr(self, attr) < 0:
                raise ProfileError(f"{attr} must not be negative")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy of the profile."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> FaultProfile:
        """Build a profile from a complete or partial document (missing fields take defaults)."""
        return cls().merged(doc)

    def merged(self, overrides: dict[str, Any]) -> FaultProfile:
        """A copy with `overrides` applied; unknown field names are an error."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ProfileError(f"unknown profile field(s): {', '.join(unknown)}")
        values = {k: _coerce(k, v) for k, v in overrides.items()}
        return dataclasses.replace(self, **values)

    def fault_for(self, u: float) -> Fault | None:
        """The fault selected by the uniform draw `u` in [0, 1), or None for a normal response."""
        edge = 0.0
        for fault, attr in _FAULT_RATES:
            edge += getattr(self, attr)
            if u < edge:
                return fault
        return None


def _coerce(name: str, value: Any) -> Any:
    """Accept JSON's int-for-float and copy containers so a profile never shares mutable state."""
    if name.startswith("rate_") and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if name == "seed" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if name == "require_fields" and isinstance(value, dict):
        return {str(k): list(v) if isinstance(v, list | tuple) else v for k, v in value.items()}
    if name == "reject_code_systems" and isinstance(value, list | tuple):
        return list(value)
    return value


def _check_types(profile: FaultProfile) -> None:
    """Reject wrongly typed values early, with the field name in the message."""
    for f in dataclasses.fields(profile):
        value = getattr(profile, f.name)
        expected = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        ok: bool
        if expected == "str":
            ok = isinstance(value, str)
        elif expected == "str | None":
            ok = value is None or isinstance(value, str)
        elif expected == "int":
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif expected == "float":
            ok = isinstance(value, float)
        elif expected == "bool":
            ok = isinstance(value, bool)
        elif f.name == "require_fields":
            ok = isinstance(value, dict) and all(
                isinstance(k, str) and isinstance(v, list) and all(isinstance(x, str) for x in v)
                for k, v in value.items()
            )
        elif f.name == "reject_code_systems":
            ok = isinstance(value, list) and all(isinstance(x, str) for x in value)
        else:  # pragma: no cover - a new field without a type rule
            ok = True
        if not ok:
            raise ProfileError(f"{f.name} has the wrong type ({type(value).__name__}); expected {expected}")


def unit_draw(tenant: str, key: str, n: int, seed: str, salt: str = "fault") -> float:
    """Deterministic uniform number in [0, 1) for request number `n` of `key` at `tenant`."""
    material = "\x1f".join((salt, tenant, key, str(n), str(seed))).encode("utf-8")
    digest = hashlib.sha256(material).digest()
    return int.from_bytes(digest[:8], "big") / float(1 << 64)


def latency_for(profile: FaultProfile, tenant: str, key: str, n: int) -> float:
    """Seconds to delay this request: fixed latency plus deterministic jitter."""
    ms = profile.latency_ms
    if profile.latency_jitter_ms:
        ms += int(unit_draw(tenant, key, n, profile.seed, salt="latency") * (profile.latency_jitter_ms + 1))
    return ms / 1000.0


PRESETS: dict[str, FaultProfile] = {
    p.name: p
    for p in (
        FaultProfile(name="default", description="A well-behaved FHIR R4 server: no faults."),
        FaultProfile(
            name="flaky",
            description="Occasional 503 and 429 and a little latency.",
            latency_ms=20,
            latency_jitter_ms=30,
            rate_503=0.1,
            rate_429=0.05,
        ),
        FaultProfile(
            name="chaos",
            description="Every failure mode at once, for chaos drills.",
            latency_ms=10,
            latency_jitter_ms=50,
            rate_500=0.05,
            rate_503=0.1,
            rate_429=0.05,
            rate_reset=0.05,
            rate_commit_then_drop=0.05,
            rate_malformed=0.03,
            rate_reject=0.02,
        ),
        FaultProfile(
            name="epic-like",
            description="Requires dosage instructions and a requester on medication orders; refuses ICD-9.",
            latency_ms=5,
            require_fields={"MedicationRequest": ["dosageInstruction", "requester"]},
            reject_code_systems=[ICD9_SYSTEM],
        ),
        FaultProfile(
            name="cerner-like",
            description="Answers a successful create with 200 instead of 201.",
            latency_ms=5,
            create_returns_200=True,
        ),
        FaultProfile(
            name="legacy-ignores-conditional",
            description="Ignores If-None-Exist: a repeated create makes a duplicate.",
            ignore_if_none_exist=True,
        ),
        FaultProfile(
            name="requires-extra-fields",
            description="Requires dosage instructions on medication orders and a category on observations.",
            require_fields={"MedicationRequest": ["dosageInstruction"], "Observation": ["category"]},
        ),
        FaultProfile(
            name="icd9-strict", description="Refuses ICD-9-CM codings.", reject_code_systems=[ICD9_SYSTEM]
        ),
        FaultProfile(name="slow", description="Two seconds per request.", latency_ms=2000),
        FaultProfile(name="unavailable", description="Every create gets 503 with Retry-After.", rate_503=1.0),
        FaultProfile(name="throttled", description="Every create gets 429 with Retry-After.", rate_429=1.0),
        FaultProfile(name="flapping-500", description="Every create gets 500.", rate_500=1.0),
        FaultProfile(
            name="drop-after-commit",
            description="Stores every create, then drops the connection without answering.",
            rate_commit_then_drop=1.0,
        ),
        FaultProfile(
            name="malformed",
            description="Stores every create, then answers with a broken body.",
            rate_malformed=1.0,
        ),
        FaultProfile(name="rejecting", description="Rejects every create with 422.", rate_reject=1.0),
        FaultProfile(
            name="reset", description="Resets every create connection before processing.", rate_reset=1.0
        ),
        FaultProfile(
            name="expired-token", description="Every request gets 401 'expired'.", expired_token=True
        ),
        FaultProfile(
            name="smart",
            description="SMART backend services: requests need a bearer token from /auth/token.",
            require_bearer_token=True,
        ),
        FaultProfile(
            name="r4b", description="Reports fhirVersion 4.3.0 (pinned-version drills).", fhir_version="4.3.0"
        ),
    )
}


def resolve(document: dict[str, Any] | None, default_preset: str = "default") -> FaultProfile:
    """Effective profile for a control-API document: `{"preset": NAME, ...overrides}`.

    Without "preset" the overrides apply to `default_preset` (PUT replaces the whole profile).
    """
    doc = dict(document or {})
    preset_name = doc.pop("preset", None) or default_preset
    if not isinstance(preset_name, str) or preset_name not in PRESETS:
        raise ProfileError(f"unknown preset {preset_name!r}; known: {', '.join(sorted(PRESETS))}")
    base = PRESETS[preset_name]
    doc.pop("name", None)  # the name always says which preset the profile started from
    return base.merged(doc)
