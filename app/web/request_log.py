"""Request ids and one structured access-log line per request (no PHI: no bodies, no query strings)."""

from __future__ import annotations

import logging
import re
import time
import uuid

from flask import Flask, g, request

log = logging.getLogger("recon.access")
_VALID_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def init_app(app: Flask) -> None:
    @app.before_request
    def _start():
        incoming = request.headers.get("X-Request-Id", "")
        g.request_id = incoming if _VALID_ID.match(incoming) else uuid.uuid4().hex
        g.request_started = time.perf_counter()

    @app.after_request
    def _finish(response):
        request_id = getattr(g, "request_id", None)
        if request_id:
            response.headers["X-Request-Id"] = request_id
        if request.endpoint != "static":
            actor = getattr(g, "actor", None)
            log.info(
                "%s %s %s",
                request.method,
                request.path,
                response.status_code,
                extra={
                    "request_id": request_id,
                    "path": request.path,
                    "status": response.status_code,
                    "actor": actor.username if actor is not None else None,
                    "duration_ms": round(
                        (time.perf_counter() - g.get("request_started", time.perf_counter())) * 1000, 1
                    ),
                    "idempotency_key": request.headers.get("Idempotency-Key"),
                    # intake: the message the request created or (replayed) found
                    "message_id": g.get("message_id"),
                },
            )
        return response
