"""Simulated EHR (`recon sim`): a real network server for the demo, the tests and chaos drills (SPEC 4)."""

from .fhir_server import RESOURCE_TYPES, SimServer, SimState, run_sim
from .profiles import PRESETS, Fault, FaultProfile, ProfileError

__all__ = [
    "PRESETS",
    "RESOURCE_TYPES",
    "Fault",
    "FaultProfile",
    "ProfileError",
    "SimServer",
    "SimState",
    "run_sim",
]
