"""API for bulk replays (issue 6): request a fixed list, read its progress, approve once (password
re-entered), reject, pause, resume, cancel — the console's services and rules."""

from __future__ import annotations

from flask import jsonify

from app.db.bulk_replay_models import BulkReplay
from app.domain.bulk_replay import Pace, Progress
from app.domain.errors import Invalid, NotFound
from app.domain.roles import Permission
from app.services import bulk_replay

from ..access import current_actor, requires
from ..extensions import unit_of_work
from ..input_guard import MAX_ROW_ID
from . import bp
from .parsing import field, json_object

ACTIONS = ("approve", "reject", "pause", "resume", "cancel")


def _iso(value) -> str | None:
    return value.isoformat(timespec="seconds") + "Z" if value else None


def batch_json(batch: BulkReplay, progress: Progress, items: list | None = None) -> dict:
    out = {
        "id": batch.id,
        "state": batch.state,
        "version": batch.version,
        "total": batch.total,
        "reason": batch.reason,
        "pace": {"count": batch.pace_count, "per_seconds": batch.pace_seconds},
        "requested_by": batch.requested_by.username,
        "requested_at": _iso(batch.requested_at),
        "approved_by": batch.approved_by.username if batch.approved_by else None,
        "approved_at": _iso(batch.approved_at),
        "started_at": _iso(batch.started_at),
        "finished_at": _iso(batch.finished_at),
        "progress": progress.as_dict(),
    }
    if items is not None:
        out["items"] = [
            {
                "position": row.item.position,
                "exception_id": row.item.exception_id,
                "state": row.state.value,
                "replay_id": row.item.replay_id,
                "release_at": _iso(row.item.release_at),
                "note": row.item.note,
            }
            for row in items
        ]
    return out


def _refs(body: dict) -> list[tuple[int, int | None]]:
    ids = body.get("exception_ids")
    if not isinstance(ids, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) and 1 <= i <= MAX_ROW_ID for i in ids
    ):
        raise Invalid("exception_ids must be a list of exception ids", code="invalid_body")
    versions = body.get("expected_versions") or {}
    if not isinstance(versions, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in versions.values()
    ):
        raise Invalid("expected_versions must map exception ids to integers", code="invalid_body")
    return [(i, versions.get(str(i))) for i in ids]


def _pace(body: dict) -> Pace:
    pace = body.get("pace")
    if pace is None:
        return Pace()
    if not isinstance(pace, dict):
        raise Invalid("pace must be an object {count, per_seconds}", code="invalid_body")
    return Pace(
        count=field(pace, "count", int, default=Pace().count),
        per_seconds=float(field(pace, "per_seconds", float, default=Pace().per_seconds)),
    )


@bp.get("/bulk-replays")
@requires(Permission.VIEW_QUEUES)
def list_bulk_replays():
    """The latest bulk replays, newest first, each with its progress."""
    with unit_of_work(read_only=True) as s:
        batches = bulk_replay.list_batches(s)
        progress = bulk_replay.progress_many(s, [b.id for b in batches])
        return jsonify({"items": [batch_json(b, progress[b.id]) for b in batches]})


@bp.post("/bulk-replays")
@requires(Permission.DECIDE)
def create_bulk_replay():
    """Request the replay of exactly these exceptions (all or nothing); 201 with the batch."""
    body = json_object()
    refs = _refs(body)
    reason = field(body, "reason", str, default="")
    pace = _pace(body)
    with unit_of_work() as s:
        batch = bulk_replay.request_batch(s, current_actor(), refs, reason, pace)
        out = batch_json(batch, bulk_replay.progress(s, batch.id))
    response = jsonify(out)
    response.status_code = 201
    response.headers["Location"] = f"/api/v1/bulk-replays/{out['id']}"
    return response


@bp.get("/bulk-replays/<int:bulk_replay_id>")
@requires(Permission.VIEW_QUEUES)
def get_bulk_replay(bulk_replay_id: int):
    """One batch: its fixed list (each item's state and replay) and its progress."""
    with unit_of_work(read_only=True) as s:
        batch = bulk_replay.get(s, bulk_replay_id)
        return jsonify(
            batch_json(batch, bulk_replay.progress(s, batch.id), bulk_replay.item_rows(s, batch.id))
        )


@bp.post("/bulk-replays/<int:bulk_replay_id>/<action>")
@requires(Permission.DECIDE)
def decide_bulk_replay(bulk_replay_id: int, action: str):
    """approve (password) | reject (reason) | pause | resume | cancel (reason)."""
    body = json_object()
    if action not in ACTIONS:
        raise NotFound(f"no bulk replay action {action!r}; one of {', '.join(ACTIONS)}")
    reason = field(body, "reason", str, default="")
    password = field(body, "password", str)
    expected = field(body, "expected_version", int)
    try:
        with unit_of_work() as s:
            batch = bulk_replay.decide_batch(
                s,
                bulk_replay_id,
                current_actor(),
                action,
                reason=reason,
                password=password,
                expected_version=expected,
            )
            out = batch_json(batch, bulk_replay.progress(s, batch.id))
    except bulk_replay.BulkApprovalPasswordFailed as exc:
        with unit_of_work() as s:  # after the refused approval rolled back: audited, counted
            bulk_replay.record_password_failure(s, exc.user_id, exc.bulk_replay_id)
        raise
    return jsonify(out)
