"""An idle MLLP connection the receiver closed (engine restart, idle timeout) is replaced before
the next message, so that message is delivered — not recorded as an unknown outcome that a
clinical lead must then confirm as not applied. Real sockets, the real simulator."""

from __future__ import annotations

import time

from app.adapters.ehr.hl7v2_mllp import Hl7MllpAdapter
from app.domain.delivery import AttemptOutcome, ConnectionSettings, Envelope
from app.simulator import SimServer
from tests.chaos.drill import adt_message


def _envelope(tenant: str, control_id: str, n: int) -> Envelope:
    return Envelope(
        message_id=f"m{n}",
        message_type="ADT^A08",
        content_type="x-application/hl7-v2+er7",
        payload=adt_message(tenant, n),
        delivery_system="s",
        delivery_value=control_id,
        control_id=control_id,
    )


def test_a_receiver_restart_between_messages_does_not_make_the_next_one_unknown():
    tenant = "stale"
    first = SimServer(fhir_port=0, mllp_port=0).start()
    port = first.mllp_port
    adapter = Hl7MllpAdapter(
        ConnectionSettings(name="c", protocol="hl7v2-mllp", endpoint=f"127.0.0.1:{port}", read_timeout=2.0)
    )
    try:
        assert adapter.deliver(_envelope(tenant, "C1", 1)).outcome == AttemptOutcome.DELIVERED
        first.stop()  # the engine restarts: its idle connections are closed
        second = SimServer(fhir_port=0, mllp_port=port).start()
        try:
            time.sleep(0.1)
            outcome = adapter.deliver(_envelope(tenant, "C2", 2))
            assert outcome.outcome == AttemptOutcome.DELIVERED, outcome
            assert second.state.peek(tenant).hl7_received["C2"] == 1
            # and the fresh connection is reused for the next message
            sock = adapter._sock
            assert adapter.deliver(_envelope(tenant, "C3", 3)).outcome == AttemptOutcome.DELIVERED
            assert adapter._sock is sock
        finally:
            second.stop()
    finally:
        adapter.close()
