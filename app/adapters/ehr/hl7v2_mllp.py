"""HL7 v2 over MLLP (SPEC 4): one persistent connection per connection settings per worker.

Every attempt and replay of one logical message carries the same MSH-10 — our control id, derived
from the idempotency key — so a careful receiver can de-duplicate. What the ACK means is decided in
app/domain/hl7.py. What happens on the wire decides the rest:

* cannot connect, or the connection fails before the whole message was written → transport
  (provably not sent); the next attempt connects afresh;
* no ACK within the read timeout (the connection's ACK timeout), or the connection closes after
  the message was written → unknown_outcome: it may have been applied; MLLP cannot be searched,
  so a clinical lead must confirm "not applied" before a resend (the confirm_not_applied gate).
"""

from __future__ import annotations

import socket
import time
from typing import Any

from app.domain.delivery import AttemptOutcome, Category, ConnectionSettings, Envelope, Outcome
from app.domain.hl7 import ack_outcome, frame, unframe, with_control_id
from app.domain.payloads import HL7_ER7, decode_text, encode_text

from .base import EhrAdapter
from .errors import ConfigError


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"MLLP endpoint {endpoint!r} must be HOST:PORT")
    return host.strip("[]"), int(port)


class Hl7MllpAdapter(EhrAdapter):
    def __init__(self, settings: ConnectionSettings):
        self.settings = settings
        self.host, self.port = parse_endpoint(settings.endpoint)
        self._sock: socket.socket | None = None
        self._buffer = b""

    # -- connection

    def _connect(self) -> socket.socket:
        if self._sock is not None and not self._reusable(self._sock):
            self.close()  # the receiver closed it while idle (engine restart, idle timeout)
        if self._sock is None:
            self._sock = socket.create_connection(
                (self.host, self.port), timeout=self.settings.connect_timeout
            )
            self._buffer = b""
        return self._sock

    @staticmethod
    def _reusable(sock: socket.socket) -> bool:
        """Whether an idle persistent connection can carry the next message. A receiver that
        closed it (engine restart, idle timeout) shows as end-of-file or a reset; sending into it
        would make a message that provably never arrived look like an unknown outcome. Bytes
        waiting on an idle connection (a very late ACK) must not answer the next message either."""
        try:
            sock.setblocking(False)
            try:
                sock.recv(1, socket.MSG_PEEK)  # b"" = closed by the receiver
            finally:
                sock.setblocking(True)
        except (BlockingIOError, InterruptedError):
            return True  # nothing to read: open and idle
        except OSError:
            return False  # reset
        return False  # b"" (closed by the receiver) or stray bytes

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None
                self._buffer = b""

    # -- delivery

    def deliver(self, envelope: Envelope) -> Outcome:
        started = time.monotonic()
        summary = f"MLLP {self.host}:{self.port} {envelope.message_type} MSH-10={envelope.control_id}"

        def ms() -> int:
            return int((time.monotonic() - started) * 1000)

        def may_have_applied(detail: str) -> Outcome:
            self.close()  # a late ACK on this socket must never answer the next message
            return Outcome(
                AttemptOutcome.UNKNOWN,
                Category.UNKNOWN_OUTCOME,
                summary=summary,
                latency_ms=ms(),
                detail=detail,
            )

        text = with_control_id(envelope.payload, envelope.control_id)
        payload = encode_text(text, HL7_ER7)  # in MSH-18's character set when the text fits it
        try:
            sock = self._connect()
        except OSError as exc:
            self.close()
            return Outcome(
                AttemptOutcome.TRANSIENT,
                Category.TRANSPORT,
                summary=summary,
                latency_ms=ms(),
                provably_not_applied=True,
                detail=f"could not connect to {self.host}:{self.port}: {exc}",
            )
        try:
            sock.sendall(frame(payload))
        except OSError as exc:
            # sendall cannot tell how much of the frame went out before the failure.
            return may_have_applied(f"the connection failed while sending ({exc}): it may have been received")
        ack = self._read_ack(sock)
        if ack is None:
            return may_have_applied(
                f"no ACK within {self.settings.read_timeout:g} s (or the connection closed): "
                "it may have been applied; MLLP cannot be searched — a clinical lead must confirm"
            )
        return ack_outcome(
            decode_text(ack, HL7_ER7).text, envelope.control_id, latency_ms=ms(), summary=summary
        )

    def _read_ack(self, sock: socket.socket) -> bytes | None:
        deadline = time.monotonic() + self.settings.read_timeout
        while True:
            message, self._buffer = unframe(self._buffer)
            if message is not None:
                return message
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except OSError:  # timeout or reset
                return None
            if not chunk:
                return None
            self._buffer += chunk

    def find_applied(self, envelope: Envelope) -> bool | None:
        return None  # MLLP has no query for what was applied: a human confirms

    def check_connection(self) -> dict[str, Any]:
        try:
            with socket.create_connection((self.host, self.port), timeout=self.settings.connect_timeout):
                return {"ok": True, "detail": f"TCP connection to {self.host}:{self.port} accepted"}
        except OSError as exc:
            return {"ok": False, "detail": f"cannot connect to {self.host}:{self.port}: {exc}"}
