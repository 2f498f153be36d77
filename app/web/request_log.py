"""Request ids and one structured access-log line per request (no PHI: no bodies, no query strings)."""

from __future__ import annotations

import logging
import os
import re
import time

from flask import Flask, g, request

log = logging.getLogger("recon.access")
_VALID_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def new_request_id(random: bytes | None = None) -> str:
    """uuid.uuid4().hex without building the UUID object: 16 random bytes with the version (4) and
    variant bits set as UUID(bytes=..., version=4) sets them."""
    value = int.from_bytes(random if random is not None else os.urandom(16), "big")
    return f"{value & _UUID4_CLEAR | _UUID4_SET:032x}"


_UUID4_CLEAR = ~((0xC000 << 48) | (0xF000 << 64))
_UUID4_SET = (0x8000 << 48) | (4 << 76)


def init_app(app: Flask) -> None:
    @app.before_request
    def _start():
        incoming = request.headers.get("X-Request-Id", "")
        ctx_g = g._get_current_object()
        ctx_g.request_id = incoming if incoming and _VALID_ID.match(incoming) else new_request_id()
        ctx_g.request_started = time.perf_counter()

    @app.after_request
    def _finish(response):
        # The request's context objects looked up once, not once per field.
        req = request._get_current_object()
        ctx_g = g._get_current_object()
        request_id = getattr(ctx_g, "request_id", None)
        if request_id:
            response.headers["X-Request-Id"] = request_id
        if req.endpoint != "static":
            actor = getattr(ctx_g, "actor", None)
            path = req.path
            status = response.status_code
            log.info(
                "%s %s %s",
                req.method,
                path,
                status,
                extra={
                    "request_id": request_id,
                    "path": path,
                    "status": status,
                    "actor": actor.username if actor is not None else None,
                    "duration_ms": round(
                        (time.perf_counter() - ctx_g.get("request_started", time.perf_counter())) * 1000, 1
                    ),
                    "idempotency_key": req.headers.get("Idempotency-Key"),
                    # intake: the message the request created or (replayed) found
                    "message_id": ctx_g.get("message_id"),
                },
            )
        return response
