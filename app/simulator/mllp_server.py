"""The MLLP half of the simulated EHR (SPEC 4): an HL7 v2 receiver over TCP, one thread per
connection, sharing tenants and fault profiles with the FHIR half.

The tenant is the receiving facility, MSH-6 (first component). Each message is counted as received
by its MSH-10, then — by the tenant's profile — reset before storing, stored and dropped without an
ACK, rejected (AR), refused with AE + ERR naming an empty required field, or applied and answered
AA (late by latency_ms; with a wrong MSA-2 if asked). A de-duplicating receiver (the default)
applies each (MSH-3, MSH-4, MSH-10) once and answers AA again for a repeat; a non-de-duplicating
one applies every copy: then our side alone holds the exactly-once invariant.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
from datetime import UTC, datetime

from app.domain.hl7 import frame, msh_field, segments, separators, unframe

from .profiles import Fault, unit_draw

log = logging.getLogger("recon.sim.mllp")


def build_ack(message: str, code: str, control_id: str, errors: list[tuple[str, str]] = ()) -> str:
    field, component, _ = separators(message)
    encoding = msh_field(message, 2) or "^~\\&"
    now = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    msh = field.join(
        [
            "MSH",
            encoding,
            msh_field(message, 5) or "SIM",
            msh_field(message, 6) or "SIM",
            msh_field(message, 3),
            msh_field(message, 4),
            now,
            "",
            f"ACK{component}{(msh_field(message, 9).split(component) + [''])[1]}",
            f"ACK{control_id}"[:20],
            "P",
            msh_field(message, 12) or "2.5.1",
        ]
    )
    lines = [msh, field.join(["MSA", code, control_id])]
    for location, text in errors:
        seg, _, number = location.partition("-")
        lines.append(
            field.join(
                ["ERR", "", component.join([seg, "1", number]), component.join(["101", "Required field missing", "HL70357"]), "E", "", "", "", text]
            )
        )  # fmt: skip
    return "\r".join(lines) + "\r"


def field_empty(message: str, location: str) -> bool:
    """Whether SEG-n (e.g. PID-7) is absent or empty in the message."""
    seg, _, number = location.partition("-")
    field = separators(message)[0]
    for segment in segments(message):
        parts = segment.split(field)
        if parts[0] == seg:
            index = int(number) - (1 if seg == "MSH" else 0)
            return not (len(parts) > index and parts[index].strip())
    return True


class _Handler(socketserver.BaseRequestHandler):
    server: _MllpServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        with self.server.open_lock:
            self.server.open_sockets.add(sock)
        try:
            self._serve(sock)
        finally:
            with self.server.open_lock:
                self.server.open_sockets.discard(sock)

    def _serve(self, sock: socket.socket) -> None:
        buffer = b""
        while not self.server.stop_event.is_set():
            try:
                chunk = sock.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            buffer += chunk
            while True:
                raw, buffer = unframe(buffer)
                if raw is None:
                    break
                if not self._one(sock, raw):
                    return

    def _one(self, sock: socket.socket, raw: bytes) -> bool:
        """Handle one message; False when the connection must close."""
        # MSH is ASCII: read it before decoding, then decode by MSH-18 like a careful receiver.
        from app.domain.payloads import HL7_ER7, decode_text

        text = decode_text(raw, HL7_ER7).text
        control_id = msh_field(text, 10)
        component = separators(text)[1]
        tenant = self.server.state.tenant((msh_field(text, 6).split(component)[0] or "default").lower())
        with tenant.lock:
            tenant.all_requests += 1
            tenant.hl7_received[control_id] += 1
            n = tenant.draw_counts[f"hl7:{control_id}"]
            tenant.draw_counts[f"hl7:{control_id}"] += 1
            profile = tenant.profile
        fault, _ = tenant.fault_now(profile.fault_for(unit_draw(tenant.name, control_id, n, profile.seed)))
        if fault in (Fault.UNAVAILABLE_503, Fault.THROTTLED_429) and tenant.burst()["fault"]:
            fault = Fault.RESET  # a 503/429 burst has no HL7 form: the engine drops the connection
        if fault is Fault.RESET:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            return False
        if fault is Fault.REJECT:
            return self._send(sock, build_ack(text, "AR", control_id), text)
        missing = [loc for loc in profile.hl7_required_fields if field_empty(text, loc)]
        if missing:
            errors = [(loc, f"{loc} is required") for loc in missing]
            return self._send(sock, build_ack(text, "AE", control_id, errors), text)
        key = (msh_field(text, 3), msh_field(text, 4), control_id)
        with tenant.lock:
            if not (profile.mllp_dedupe and key in tenant.hl7_seen):
                tenant.hl7_seen.add(key)
                tenant.hl7_applied[control_id] += 1
                tenant.hl7_last[control_id] = raw
        if fault in (Fault.COMMIT_THEN_DROP, Fault.SLOW_COMMIT_THEN_DROP):
            return False  # applied, and no ACK ever comes
        if profile.latency_ms:
            self.server.stop_event.wait(profile.latency_ms / 1000)
        echoed = f"X{control_id}"[:20] if profile.mllp_wrong_msa2 else control_id
        return self._send(sock, build_ack(text, "AA", echoed), text)

    def _send(self, sock: socket.socket, ack: str, message: str) -> bool:
        from app.domain.payloads import encode_text

        try:
            sock.sendall(frame(encode_text(ack, "x-application/hl7-v2+er7")))
        except OSError:
            return False
        return True


class _MllpServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, address, state, stop_event: threading.Event):
        self.state, self.stop_event = state, stop_event
        self.open_sockets: set[socket.socket] = set()
        self.open_lock = threading.Lock()
        super().__init__(address, _Handler)

    def close_connections(self) -> None:
        """A stopping engine closes its connections, as a real one does on restart."""
        with self.open_lock:
            for sock in self.open_sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class MllpListener:
    """Start/stop/port, like the FHIR listener."""

    def __init__(self, host: str, port: int, state, stop_event: threading.Event):
        self.host, self.requested_port, self.state, self.stop_event = host, port, state, stop_event
        self._server: _MllpServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server else self.requested_port

    def start(self) -> None:
        self._server = _MllpServer((self.host, self.requested_port), self.state, self.stop_event)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="sim-mllp", daemon=True
        )
        self._thread.start()
        log.info("sim: HL7 v2 MLLP listening on %s:%s", self.host, self.port)

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._server.close_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
