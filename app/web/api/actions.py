"""API for the queue's bulk decisions and for replays (list, one, approve, reject): the same
services and rules as the console's bulk bar and Approvals page."""

from __future__ import annotations

from dataclasses import asdict

from flask import jsonify, request

from app.domain.errors import Invalid
from app.domain.roles import Permission
from app.services import api_views
from app.services.exceptions import DecisionInput

from ..access import current_actor, requires
from ..extensions import sessions, unit_of_work
from ..input_guard import MAX_ROW_ID
from . import bp
from .parsing import field, id_cursor, json_object, limit_arg


def _refs(body: dict) -> list[tuple[int, int | None]]:
    """ids (a fixed list) and, optionally, the version of each the caller saw."""
    ids = body.get("ids")
    if not isinstance(ids, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) and 1 <= i <= MAX_ROW_ID for i in ids
    ):
        raise Invalid("ids must be a list of exception ids", code="invalid_body")
    versions = body.get("expected_versions") or {}
    if not isinstance(versions, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in versions.values()
    ):
        raise Invalid("expected_versions must map exception ids to integers", code="invalid_body")
    return [(i, versions.get(str(i))) for i in ids]


@bp.post("/exceptions/bulk-decisions")
@requires(Permission.DECIDE)
def bulk_decisions():
    """One action on a fixed list of exceptions; each item is decided on its own (a conflict on
    one does not undo the others), and the answer lists every item's result."""
    body = json_object()
    template = DecisionInput(
        action=field(body, "action", str, required=True),
        reason=field(body, "reason", str, default=""),
        reason_code=field(body, "reason_code", str),
        assignee=field(body, "assignee", str),
    )
    results = api_views.bulk_decide(sessions(), current_actor().id, _refs(body), template)
    return jsonify(
        {
            "action": template.action,
            "applied": sum(r.ok for r in results),
            "failed": sum(not r.ok for r in results),
            "results": [asdict(r) for r in results],
        }
    )


@bp.get("/replays")
@requires(Permission.VIEW_QUEUES)
def list_replays():
    """Replays newest first; ?state=pending_approval is the approvals queue."""
    with unit_of_work(read_only=True) as s:
        items, next_cursor = api_views.replay_page(
            s,
            state=request.args.get("state") or None,
            limit=limit_arg(50, api_views.MAX_REPLAY_PAGE),
            before_id=id_cursor(),
        )
    return jsonify({"items": items, "next_cursor": next_cursor})


@bp.get("/replays/<int:replay_id>")
@requires(Permission.VIEW_QUEUES)
def get_replay(replay_id: int):
    with unit_of_work(read_only=True) as s:
        return jsonify(api_views.replay_view(s, replay_id))


def _decide_replay(replay_id: int, action: str):
    body = json_object()
    with unit_of_work() as s:
        out = api_views.decide_replay(
            s,
            current_actor().id,
            replay_id,
            action=action,
            reason=field(body, "reason", str, default=""),
            password=field(body, "password", str),
            expected_version=field(body, "expected_version", int),
        )
    response = jsonify(out)
    response.status_code = 201
    return response


@bp.post("/replays/<int:replay_id>/approve")
@requires(Permission.APPROVE)
def approve_replay(replay_id: int):
    """Approve with your password re-entered; never a request you made, edited or are related to."""
    return _decide_replay(replay_id, "approve")


@bp.post("/replays/<int:replay_id>/reject")
@requires(Permission.APPROVE)
def reject_replay(replay_id: int):
    """Reject with a reason; the exception goes back to its queue."""
    return _decide_replay(replay_id, "reject")
