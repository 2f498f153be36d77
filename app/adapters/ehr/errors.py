"""Adapter exceptions. Each carries the delivery category it stands for (SPEC 3.2).

Adapters mostly *return* an Outcome; these exceptions are for conditions found before any
request goes out (bad configuration, a payload that cannot be sent), and every one of them can
be turned into an Outcome that says, truthfully, that nothing reached the EHR.
"""

from __future__ import annotations

from app.domain.delivery import AttemptOutcome, Category, Outcome


class AdapterError(Exception):
    """Base class: a delivery problem detected on our side, before anything was sent."""

    category: Category = Category.CONFIG

    def __init__(self, message: str, *, category: Category | None = None, issues: list[dict] | None = None):
        super().__init__(message)
        self.message = message
        if category is not None:
            self.category = category
        self.issues = list(issues or [])

    def to_outcome(self, summary: str = "", latency_ms: int = 0) -> Outcome:
        """A REJECTED Outcome: the EHR never saw the request, so it provably did not apply."""
        return Outcome(
            outcome=AttemptOutcome.REJECTED,
            category=self.category,
            summary=summary,
            detail=self.message,
            latency_ms=latency_ms,
            provably_not_applied=True,
            issues=list(self.issues),
        )


class ConfigError(AdapterError):
    """The connection is misconfigured or asks for something this adapter cannot do."""

    category = Category.CONFIG


class VersionMismatch(ConfigError):
    """The EHR's CapabilityStatement reports a different fhirVersion than the pinned one."""


class ValidationFailed(AdapterError):
    """The payload could not be parsed or failed FHIR validation (data_shape)."""

    category = Category.DATA_SHAPE


class AuthError(AdapterError):
    """No usable credentials (e.g. the secret's environment variable is unset) or the token was refused."""

    category = Category.AUTH
