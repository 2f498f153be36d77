"""The one adapter interface every EHR protocol implements (SPEC 4)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

from app.domain.delivery import ConnectionSettings, Envelope, Outcome, Protocol

from .errors import ConfigError

if TYPE_CHECKING:
    import httpx


class EhrAdapter(ABC):
    """Delivers envelopes to one EHR connection.

    Implementations never raise for delivery problems: every attempt ends in an Outcome whose
    category comes from real signals (status, OperationOutcome, exception type).
    """

    settings: ConnectionSettings

    @abstractmethod
    def deliver(self, envelope: Envelope) -> Outcome:
        """Send one message once. Never retries by itself."""

    def find_applied(self, envelope: Envelope) -> bool | None:
        """Whether the EHR already holds this message (by its delivery identifier).

        True/False when the EHR answered clearly, None when we cannot tell (no search support,
        an error, an ambiguous answer). Callers must treat None as "a human has to check".
        """
        return None

    @abstractmethod
    def check_connection(self) -> dict[str, Any]:
        """Probe the connection without delivering anything: {"ok": bool, "detail": str, ...}."""

    def close(self) -> None:  # noqa: B027 - optional hook, most adapters own nothing to close
        """Release network resources the adapter owns."""

    def __enter__(self) -> EhrAdapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def adapter_for(settings: ConnectionSettings, *, client: httpx.Client | None = None) -> EhrAdapter:
    """The adapter for a connection's protocol. Raises ConfigError (category config) otherwise.

    A passed-in `client` is used as is and not closed by the adapter.
    """
    protocol = str(settings.protocol)
    if protocol == Protocol.FHIR_R4:
        from .fhir_r4 import FhirR4Adapter

        return FhirR4Adapter(settings, client=client)
    if protocol == Protocol.HL7V2_MLLP:
        from .hl7v2_mllp import Hl7MllpAdapter

        return Hl7MllpAdapter(settings)
    raise ConfigError(f"connection {settings.name}: unknown protocol {protocol!r}")
