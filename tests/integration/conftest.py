"""Integration fixtures beside the root conftest (which runs the real simulator, `sim`)."""

from __future__ import annotations

import socket
import uuid

import pytest


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
