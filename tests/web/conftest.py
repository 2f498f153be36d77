"""Fixtures for console tests: logged-in clients and exceptions created through the services."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from app.db.models import AuditEvent
from app.db.session import transaction
from tests.conftest import csrf_token
from tests.factories import make_exception, setup_connection


@pytest.fixture
def login(client, auth, users):
    """login("rita") -> the client, logged in through the real form."""

    def _login(name: str):
        response = auth.login(name)
        assert response.status_code == 302, response.get_data(as_text=True)
        return client

    return _login


@pytest.fixture
def connection(sessions):
    return setup_connection(sessions)


@pytest.fixture
def make(sessions, users, connection):
    """make(**kwargs) -> a new open exception id (see tests.factories.make_exception)."""

    def _make(**kwargs) -> int:
        return make_exception(sessions, users["svc"], **kwargs)

    return _make


@pytest.fixture
def post(client):
    """post(url, data) with this session's CSRF token added."""

    token = {}

    def _post(url: str, data: dict | None = None, **kwargs):
        # The token belongs to the session cookie, which survives logging in as someone else.
        if "value" not in token:
            token["value"] = csrf_token(client, "/login")
        data = dict(data or {})
        data.setdefault("csrf_token", token["value"])
        return client.post(url, data=data, **kwargs)

    return _post


@pytest.fixture
def audit_events(sessions):
    """audit_events(action=..., subject_type=..., subject_id=...) -> matching events, oldest first."""

    def _events(**where):
        with transaction(sessions) as s:
            stmt = sa.select(AuditEvent).order_by(AuditEvent.id)
            for name, value in where.items():
                stmt = stmt.where(
                    getattr(AuditEvent, name) == (str(value) if name == "subject_id" else value)
                )
            return list(s.scalars(stmt))

    return _events
