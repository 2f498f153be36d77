"""EHR adapters: one interface (deliver / find_applied / check_connection) for every protocol (SPEC 4)."""

from .base import EhrAdapter, adapter_for
from .errors import AdapterError, AuthError, ConfigError, ValidationFailed, VersionMismatch
from .fhir_r4 import FhirR4Adapter, classify, prepare_resource

__all__ = [
    "AdapterError",
    "AuthError",
    "ConfigError",
    "EhrAdapter",
    "FhirR4Adapter",
    "ValidationFailed",
    "VersionMismatch",
    "adapter_for",
    "classify",
    "prepare_resource",
]
