"""The PHI rule applied to everything the console and the API send (docs/SECURITY.md "PHI").

One response filter: for a role the rule masks (app.domain.phi.PHI_RULE), every known identifier
of every message the request loaded (collected by app.services.phi's ORM load events) is masked
in the body — HTML pages and fragments, JSON answers, CSV — whatever field or template put it
there. The one exception is a response that showed a full payload to a role that may open it:
that response is covered by the `phi.view` recorded before it was sent.
Streamed audit exports are masked chunk by chunk as they are sent (app.services.phi.redact_export).
"""

from __future__ import annotations

import json

from flask import Flask, Response, current_app

from app.domain.phi import PHI_RULE
from app.services import phi

from .access import current_actor
from .extensions import sessions, unit_of_work

TEXT_TYPES = {"text/html", "application/json", "text/csv", "text/plain", "application/x-ndjson"}


def init_app(app: Flask) -> None:
    # First of the before-request functions: the access check already loads rows.
    app.before_request_funcs.setdefault(None, []).insert(0, _open_scope)
    app.after_request(redact_response)
    app.teardown_request(lambda _exc: phi.close_scope())


def _open_scope() -> None:
    phi.open_scope()


def redact_response(response: Response) -> Response:
    """Mask the known identifiers of this request's messages for a role without PHI access."""
    scope = phi.current_scope()
    actor = current_actor()
    if scope is None or (actor is not None and not PHI_RULE.masks(actor.role)):
        return response
    if response.is_streamed and response.mimetype in phi.EXPORT_FORMATS:
        # An audit export, streamed in constant memory: masked chunk by chunk as it is sent.
        response.response = phi.redact_export(
            sessions(), response.response, phi.EXPORT_FORMATS[response.mimetype]
        )
        return response
    if scope.empty():
        return response
    if scope.payload_shown and actor is not None and PHI_RULE.may_view_payload(actor.role):
        return response
    if response.is_streamed or response.direct_passthrough or response.mimetype not in TEXT_TYPES:
        return response
    with unit_of_work(read_only=True) as s:
        identifiers = phi.scope_identifiers(s, scope)
    redactor = phi.redactor_for(identifiers)
    if not redactor:
        return response
    body = response.get_data(as_text=True)
    if response.mimetype == "text/html":
        redacted = redactor.html(body)
    elif response.mimetype == "application/json" and redactor.found_in(body):
        try:
            redacted = current_app.json.dumps(redactor.data(json.loads(body)))
        except ValueError:
            redacted = redactor.text(body)
    else:
        redacted = redactor.text(body)
    if redacted != body:
        response.set_data(redacted)
    return response
