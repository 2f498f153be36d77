"""/healthz, /readyz and /metrics (SPEC 7)."""

from __future__ import annotations

import sqlalchemy as sa
from flask import current_app, jsonify

from app.db.migrate import at_head
from app.services.db_roles import connection_warnings
from app.services.metrics import render_metrics

from ..access import public, scrape
from ..extensions import redis_client, sessions, unit_of_work
from . import bp


@bp.get("/healthz")
@public
def healthz():
    return jsonify({"status": "ok"})


@bp.get("/readyz")
@public
def readyz():
    checks, warnings = {}, []
    try:
        with unit_of_work() as s:
            s.execute(sa.text("SELECT 1"))
            # PostgreSQL: the app should run as the app role, not the owner or a superuser.
            warnings = connection_warnings(s.connection())
        checks["database"] = "ok"
        checks["migrations"] = "ok" if at_head(sessions().kw["bind"]) else "behind"
    except Exception as exc:  # readiness reports, it does not raise
        checks["database"] = f"error: {type(exc).__name__}"
    try:
        redis_client().ping()
        checks["redis"] = "ok"
    except Exception as exc:
        checks["redis"] = f"error: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    body = {"status": "ready" if ready else "not_ready", "checks": checks, "warnings": warnings}
    return jsonify(body), 200 if ready else 503


@bp.get("/metrics")
@scrape
def metrics():
    with unit_of_work() as s:
        body = render_metrics(s, current_app.config["RECON_SETTINGS"].handoff_policy())
    return body, 200, {"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
