"""Shared fixtures for integration tests: a real simulated EHR on an ephemeral port."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator

import pytest

from app.simulator import SimServer


@pytest.fixture(scope="session")
def sim() -> Iterator[SimServer]:
    """One running simulator for the session; tests isolate themselves with a fresh tenant."""
    server = SimServer(host="127.0.0.1", fhir_port=0).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def tenant() -> str:
    """A fresh tenant slug: its store, counters and profile start empty/default."""
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def closed_port() -> int:
    """A local TCP port with nothing listening (connection refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
