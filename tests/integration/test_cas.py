"""The one compare-and-set (app/db/cas.py): who wins, and illegal moves refused before any SQL."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from app.db.cas import cas_update
from app.db.models import Connection, Replay
from app.db.session import transaction
from app.domain.states import IllegalTransition, ReplayState


def test_second_compare_and_set_on_the_same_expectation_loses(sessions, fhir_connection):
    with transaction(sessions) as s:
        first = cas_update(
            s, Connection, fhir_connection.id, expect={"enabled": True}, values={"enabled": False}
        )
        second = cas_update(
            s, Connection, fhir_connection.id, expect={"enabled": True}, values={"enabled": False}
        )
        assert (first, second) == (True, False)
        # None means IS NULL; a collection means one of; extra criteria narrow further
        assert (
            cas_update(
                s,
                Connection,
                fhir_connection.id,
                expect={"circuit_open_until": None, "enabled": [False, True]},
                values={"consecutive_failures": 7},
                where=(Connection.name == "someone-else",),
            )
            is False
        )
        assert (
            cas_update(
                s,
                Connection,
                fhir_connection.id,
                expect={"circuit_open_until": None, "enabled": [False, True]},
                values={"consecutive_failures": 7},
            )
            is True
        )
        assert (
            s.scalar(sa.select(Connection.consecutive_failures).where(Connection.id == fhir_connection.id))
            == 7
        )


def test_an_illegal_state_move_raises_before_touching_the_row(sessions):
    with transaction(sessions) as s:
        with pytest.raises(IllegalTransition):
            cas_update(
                s, Replay, 1, expect={"state": ReplayState.SUCCEEDED}, values={"state": ReplayState.RUNNING}
            )
        with pytest.raises(IllegalTransition):  # every expected state is checked
            cas_update(
                s,
                Replay,
                1,
                expect={"state": [ReplayState.QUEUED, ReplayState.LOST]},
                values={"state": ReplayState.RUNNING},
            )
        # a legal move on a missing row simply does not take
        assert (
            cas_update(
                s, Replay, 10**6, expect={"state": ReplayState.QUEUED}, values={"state": ReplayState.RUNNING}
            )
            is False
        )
