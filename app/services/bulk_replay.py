"""Bulk replay (issue 6): request a fixed list, approve it once, release it paced, pause, cancel.

The rules are in app/domain/bulk_replay.py. What this module adds is storage and the one
transaction per decision:

* `request_batch` — a reviewer lists exceptions (each one they could resubmit on its own) with a
  reason; each moves to `pending_approval` with its own `resubmit` decision and audit event, so
  nothing else acts on it while the batch holds it.
* `decide_batch` — approve (a clinical lead, four-eyes, password re-entered: the single replay's
  rule), reject, pause, resume, cancel; a compare-and-set on the batch's (state, version).
* `release_due` — the pacing step the worker's housekeeping runs (one holder per interval): for
  each releasing batch and connection, the next held items get slots `Pace.spacing` apart; each
  item's replay is created exactly as a single approved replay is (a `queued` replay row and a
  `replay` outbox row committed with its decision and audit event) and runs through the same
  job, claim and adapter call (services/delivery `run_replay`). The outbox row waits for its slot
  (`available_at`), so the database holds the schedule and RQ only carries released work: after
  Redis loses its data, the stranded-work step queues released replays again and held items
  are still held.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
import sqlalchemy.orm as so

from app.db.bulk_replay_models import BulkReplay, BulkReplayItem
from app.db.cas import cas_update
from app.db.models import (
    Connection,
    Decision,
    ExceptionItem,
    Message,
    OutboxEntry,
    PayloadVersion,
    Replay,
    User,
)
from app.db.session import transaction
from app.domain.bulk_replay import (
    FINAL_BATCH_STATES,
    RELEASING_STATES,
    REPLAY_OUTCOMES,
    ApprovalFacts,
    BatchAction,
    BatchState,
    ItemState,
    Pace,
    Progress,
    check_approval,
    check_item_list,
    item_state,
    parse_batch_action,
    plan_batch_action,
    plan_item_request,
    release_slots,
)
from app.domain.errors import Conflict, Forbidden, Invalid, NotFound
from app.domain.roles import Role
from app.domain.states import ExceptionFacts, ExceptionState

from . import audit, connections, users
from .clock import utcnow
from .users import check_password

SYSTEM_ACTOR = "system:bulk_replay"
_PAST = {BatchAction.REJECT: "rejected", BatchAction.CANCEL: "cancelled"}
_FINISHED_REPLAY_STATES = [s for s, outcome in REPLAY_OUTCOMES.items() if outcome is not ItemState.RELEASED]


class BulkApprovalPasswordFailed(Forbidden):
    """A wrong password on a batch approval: 403; the caller records it (`record_password_failure`)
    in a transaction of its own after the refused approval rolled back."""

    def __init__(self, message: str, *, user_id: int, bulk_replay_id: int):
        super().__init__(message, code="password_required")
        self.user_id = user_id
        self.bulk_replay_id = bulk_replay_id


# --- reading ---------------------------------------------------------------------------------------


def get(session: so.Session, bulk_replay_id: int) -> BulkReplay:
    batch = session.get(
        BulkReplay,
        bulk_replay_id,
        options=[
            so.selectinload(BulkReplay.requested_by),
            so.selectinload(BulkReplay.approved_by),
            so.selectinload(BulkReplay.decided_by),
        ],
    )
    if batch is None:
        raise NotFound(f"bulk replay {bulk_replay_id} not found")
    return batch


def pace_of(batch: BulkReplay) -> Pace:
    return Pace(count=batch.pace_count, per_seconds=batch.pace_seconds)


def progress(session: so.Session, bulk_replay_id: int) -> Progress:
    """Where every item is now: a released item follows its replay (one GROUP BY over the batch)."""
    rows = session.execute(
        sa.select(BulkReplayItem.state, Replay.state, sa.func.count())
        .select_from(BulkReplayItem)
        .outerjoin(Replay, Replay.id == BulkReplayItem.replay_id)
        .where(BulkReplayItem.bulk_replay_id == bulk_replay_id)
        .group_by(BulkReplayItem.state, Replay.state)
    ).all()
    counts: dict[str, int] = {}
    for stored, replay_state, n in rows:
        state = item_state(stored, replay_state).value
        counts[state] = counts.get(state, 0) + n
    return Progress.from_counts(counts)


def progress_many(session: so.Session, ids: list[int]) -> dict[int, Progress]:
    if not ids:
        return {}
    rows = session.execute(
        sa.select(BulkReplayItem.bulk_replay_id, BulkReplayItem.state, Replay.state, sa.func.count())
        .select_from(BulkReplayItem)
        .outerjoin(Replay, Replay.id == BulkReplayItem.replay_id)
        .where(BulkReplayItem.bulk_replay_id.in_(ids))
        .group_by(BulkReplayItem.bulk_replay_id, BulkReplayItem.state, Replay.state)
    ).all()
    counts: dict[int, dict[str, int]] = {i: {} for i in ids}
    for batch_id, stored, replay_state, n in rows:
        state = item_state(stored, replay_state).value
        counts[batch_id][state] = counts[batch_id].get(state, 0) + n
    return {i: Progress.from_counts(c) for i, c in counts.items()}


def list_batches(session: so.Session, limit: int = 50) -> list[BulkReplay]:
    """Newest first."""
    return list(
        session.scalars(
            sa.select(BulkReplay)
            .options(so.selectinload(BulkReplay.requested_by), so.selectinload(BulkReplay.approved_by))
            .order_by(BulkReplay.id.desc())
            .limit(limit)
        )
    )


@dataclass(frozen=True)
class ItemRow:
    item: BulkReplayItem
    state: ItemState
    exception: ExceptionItem
    replay: Replay | None


def item_rows(session: so.Session, bulk_replay_id: int) -> list[ItemRow]:
    """The fixed list, in listed order, each with its exception and replay."""
    rows = session.execute(
        sa.select(BulkReplayItem, ExceptionItem, Replay)
        .join(ExceptionItem, ExceptionItem.id == BulkReplayItem.exception_id)
        .outerjoin(Replay, Replay.id == BulkReplayItem.replay_id)
        .where(BulkReplayItem.bulk_replay_id == bulk_replay_id)
        .options(so.joinedload(ExceptionItem.connection))
        .order_by(BulkReplayItem.position)
    ).all()
    return [
        ItemRow(item, item_state(item.state, replay.state if replay else None), exc, replay)
        for item, exc, replay in rows
    ]


def batches_holding(session: so.Session, exception_id: int) -> list[BulkReplay]:
    """The batches that list this exception (newest first)."""
    return list(
        session.scalars(
            sa.select(BulkReplay)
            .join(BulkReplayItem, BulkReplayItem.bulk_replay_id == BulkReplay.id)
            .where(BulkReplayItem.exception_id == exception_id)
            .order_by(BulkReplay.id.desc())
        )
    )


# --- the request -----------------------------------------------------------------------------------


def request_batch(
    session: so.Session,
    actor: User,
    refs: list[tuple[int, int | None]],
    reason: str,
    pace: Pace | None = None,
) -> BulkReplay:
    """A reviewer's request to replay exactly these exceptions (id, version seen or None).

    All or nothing: if any listed exception cannot be resubmitted now (its state, a pending
    confirm_not_applied, changed since the list was shown, not found) nothing is requested and
    the error names them."""
    pace = pace or Pace()
    reason = (reason or "").strip()
    ids = [i for i, _ in refs]
    check_item_list(ids)
    try:
        role = Role(actor.role)
    except ValueError:
        raise Forbidden(f"role {actor.role} may not request replays", code="role_forbidden") from None
    found = {
        i.id: i
        for i in session.scalars(
            sa.select(ExceptionItem)
            .where(ExceptionItem.id.in_(ids))
            .options(so.joinedload(ExceptionItem.connection))
        )
    }
    missing = [i for i in ids if i not in found]
    if missing:
        raise Invalid(f"not found: {_list_ids(missing)}", code="items_not_found")
    refused: list[str] = []
    for exception_id, version in refs:
        item = found[exception_id]
        facts = ExceptionFacts(
            state=ExceptionState(item.state),
            category=item.category,
            needs_not_applied_confirmation=item.needs_not_applied_confirmation,
        )
        try:
            plan_item_request(facts, actor.id, role, reason)
        except (Forbidden, Invalid):
            raise  # the actor's role or the reason: the same for every item
        except Conflict as exc:
            refused.append(f"#{exception_id} ({exc.message})")
            continue
        if version is not None and version != item.version:
            refused.append(f"#{exception_id} (changed since the list was shown)")
    if refused:
        shown = "; ".join(refused[:10]) + (f"; and {len(refused) - 10} more" if len(refused) > 10 else "")
        raise Conflict(
            f"{len(refused)} of the {len(ids)} listed exceptions cannot be replayed now: {shown}",
            code="items_not_replayable",
        )

    now = utcnow()
    batch = BulkReplay(
        state=BatchState.REQUESTED.value,
        version=1,
        total=len(ids),
        reason=reason,
        pace_count=pace.count,
        pace_seconds=float(pace.per_seconds),
        requested_by_id=actor.id,
        requested_at=now,
        updated_at=now,
    )
    session.add(batch)
    session.flush()
    for position, exception_id in enumerate(ids):
        item = found[exception_id]
        from_state = item.state
        if not _move_exception(
            session, item.id, from_state, ExceptionState.PENDING_APPROVAL, now, item.version
        ):
            raise Conflict(
                f"exception #{item.id} changed underneath; nothing was requested", code="state_conflict"
            )
        session.add(
            BulkReplayItem(
                bulk_replay_id=batch.id,
                position=position,
                exception_id=item.id,
                connection_id=item.connection_id,
                state=ItemState.HELD.value,
            )
        )
        _exception_decision(
            session,
            item.id,
            actor_id=actor.id,
            actor=actor.username,
            action="resubmit",
            audit_action="decision.resubmit",
            reason=reason,
            from_state=from_state,
            to_state=ExceptionState.PENDING_APPROVAL.value,
            details={"bulk_replay_id": batch.id},
            now=now,
        )
    audit.record(
        session,
        actor=actor.username,
        action="bulk_replay.request",
        subject_type="bulk_replay",
        subject_id=batch.id,
        to_state=batch.state,
        reason=reason,
        # The fixed list itself is in the chain: what was approved can be compared with it.
        details={"total": len(ids), "exception_ids": ids, "pace": pace.describe()},
    )
    return batch


def _list_ids(ids: list[int], limit: int = 10) -> str:
    shown = ", ".join(f"#{i}" for i in ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


# --- human decisions on a batch --------------------------------------------------------------------


def decide_batch(
    session: so.Session,
    bulk_replay_id: int,
    actor: User,
    action: str,
    *,
    reason: str = "",
    password: str | None = None,
    expected_version: int | None = None,
) -> BulkReplay:
    """approve | reject | pause | resume | cancel. Raises Forbidden (403; a wrong approval password
    as BulkApprovalPasswordFailed), Conflict (409), Invalid (422), NotFound (404)."""
    batch_action = parse_batch_action(action)
    reason = (reason or "").strip()
    batch = get(session, bulk_replay_id)
    try:
        role = Role(actor.role)
    except ValueError:
        raise Forbidden(f"role {actor.role} may not decide bulk replays", code="role_forbidden") from None
    to_state = plan_batch_action(BatchState(batch.state), batch_action, role, reason)
    if batch_action is BatchAction.APPROVE:
        _check_four_eyes(session, batch, actor, password)
    if expected_version is not None and expected_version != batch.version:
        raise Conflict(
            "this bulk replay changed since you loaded it; reload and try again", code="version_conflict"
        )

    now = utcnow()
    from_state = batch.state
    values: dict = {
        "state": to_state.value,
        "version": batch.version + 1,
        "updated_at": now,
        "decided_by_id": actor.id,
        "decided_at": now,
        "decision_reason": reason or None,
    }
    if batch_action is BatchAction.APPROVE:
        values.update(approved_by_id=actor.id, approved_at=now)
    if to_state in FINAL_BATCH_STATES:
        values["finished_at"] = now
    if not _batch_cas(session, batch, from_state, values, version=batch.version):
        raise Conflict(
            "someone else acted on this bulk replay first; reload to see it", code="state_conflict"
        )

    details: dict = {"progress": progress(session, batch.id).as_dict()}
    if batch_action in (BatchAction.REJECT, BatchAction.CANCEL):
        details["stopped"] = _stop_held_items(session, batch, actor, batch_action, reason, now)
    if batch_action is BatchAction.APPROVE:
        details["requested_by"] = batch.requested_by.username
    audit.record(
        session,
        actor=actor.username,
        action=f"bulk_replay.{batch_action.value}",
        subject_type="bulk_replay",
        subject_id=batch.id,
        from_state=from_state,
        to_state=to_state.value,
        reason=reason or None,
        details=details,
    )
    return batch


def _check_four_eyes(session: so.Session, batch: BulkReplay, actor: User, password: str | None) -> None:
    messages = (
        sa.select(ExceptionItem.message_id)
        .join(BulkReplayItem, BulkReplayItem.exception_id == ExceptionItem.id)
        .where(BulkReplayItem.bulk_replay_id == batch.id)
    )
    # As for a single replay: whoever edited a payload of these messages (version 1 is what the
    # sender sent), and who created/enrolled the requester's and those editors' accounts.
    edited = set(
        session.scalars(
            sa.select(PayloadVersion.created_by_id)
            .where(
                PayloadVersion.message_id.in_(messages),
                PayloadVersion.created_by_id.is_not(None),
                PayloadVersion.version > 1,
            )
            .distinct()
        )
    )
    parties = edited | {batch.requested_by_id}
    enrolled: set[int] = set()
    for created_by, enrolled_by in session.execute(
        sa.select(User.created_by_id, User.enrolled_by_id).where(User.id.in_(parties))
    ):
        enrolled.update(i for i in (created_by, enrolled_by) if i is not None)
    locked = actor.approval_locked_at is not None
    try:
        check_approval(
            ApprovalFacts(
                requested_by=batch.requested_by_id,
                edited_by=frozenset(edited),
                parties_enrolled_by=frozenset(enrolled),
            ),
            actor_id=actor.id,
            role=Role(actor.role),
            password_confirmed=not locked and check_password(actor, password or ""),
            password_given=bool(password),
            actor_enrolled_by=frozenset(
                i for i in (actor.created_by_id, actor.enrolled_by_id) if i is not None
            ),
            approvals_locked=locked,
        )
    except Forbidden as exc:
        if exc.code == "password_required":
            raise BulkApprovalPasswordFailed(exc.message, user_id=actor.id, bulk_replay_id=batch.id) from None
        raise


def record_password_failure(session: so.Session, user_id: int, bulk_replay_id: int) -> bool:
    """A wrong password on a batch approval counts towards the same approval lock as one on a
    single replay (the same function), audited with the batch as subject. Returns True if the
    account's approvals are (now) locked."""
    return users.record_approval_password_failure(
        session, user_id, subject_type="bulk_replay", subject_id=bulk_replay_id
    )


def _stop_held_items(
    session: so.Session, batch: BulkReplay, actor: User, action: BatchAction, reason: str, now: datetime
) -> int:
    """Reject/cancel: every held item is cancelled and its exception goes back to its queue
    (`open`), each with its own decision and audit event. Released items run to their end."""
    held = session.scalars(
        sa.select(BulkReplayItem)
        .where(BulkReplayItem.bulk_replay_id == batch.id, BulkReplayItem.state == ItemState.HELD.value)
        .order_by(BulkReplayItem.position)
    ).all()
    stopped = 0
    for item in held:
        taken = session.execute(
            sa.update(BulkReplayItem)
            .where(BulkReplayItem.id == item.id, BulkReplayItem.state == ItemState.HELD.value)
            .values(state=ItemState.CANCELLED.value, finished_at=now, note=f"{_PAST[action]} before release")
            .execution_options(synchronize_session=False)
        ).rowcount
        if taken != 1:
            continue  # released meanwhile: it runs to its end
        stopped += 1
        if _move_exception(
            session, item.exception_id, ExceptionState.PENDING_APPROVAL, ExceptionState.OPEN, now
        ):
            _exception_decision(
                session,
                item.exception_id,
                actor_id=actor.id,
                actor=actor.username,
                action=action.value,
                audit_action=f"decision.{action.value}",
                reason=f"bulk replay #{batch.id} {_PAST[action]}: {reason}",
                from_state=ExceptionState.PENDING_APPROVAL.value,
                to_state=ExceptionState.OPEN.value,
                details={"bulk_replay_id": batch.id},
                now=now,
            )
    return stopped


# --- the pacing step ---------------------------------------------------------------------------------


@dataclass
class StepResult:
    released: int = 0
    settled: int = 0
    completed: int = 0

    def __int__(self) -> int:
        return self.released + self.settled + self.completed


def release_due(
    sessions: so.sessionmaker, *, horizon_seconds: float = 2.0, now: datetime | None = None
) -> StepResult:
    """One pacing step (the worker's housekeeping runs it; see module doc). One transaction:
    settle the items whose replay ended, release the next paced items of every releasing batch,
    complete the batches with nothing held and nothing in flight."""
    result = StepResult()
    with transaction(sessions) as s:
        now = now or utcnow()
        result.settled = _settle_released(s, now)
        # A step still running when the next interval's holder starts skips the batch it holds.
        batches = s.scalars(
            sa.select(BulkReplay)
            .where(BulkReplay.state.in_([b.value for b in RELEASING_STATES]))
            .order_by(BulkReplay.id)
            .with_for_update(skip_locked=True)
        ).all()
        last_slot: dict[int, datetime | None] = {}
        for batch in batches:
            if batch.state == BatchState.APPROVED.value:
                _system_move(s, batch, BatchAction.START, now, started_at=now)
            result.released += _release_batch(s, batch, last_slot, now, timedelta(seconds=horizon_seconds))
        result.completed = _complete_settled(s, now)
    return result


def _release_batch(
    s: so.Session, batch: BulkReplay, last_slot: dict[int, datetime | None], now: datetime, horizon: timedelta
) -> int:
    pace = pace_of(batch)
    held_by_connection = s.execute(
        sa.select(BulkReplayItem.connection_id, sa.func.count())
        .where(BulkReplayItem.bulk_replay_id == batch.id, BulkReplayItem.state == ItemState.HELD.value)
        .group_by(BulkReplayItem.connection_id)
    ).all()
    released = 0
    for connection_id, held in held_by_connection:
        conn = s.get(Connection, connection_id)
        if (conn.circuit_open_until is not None and conn.circuit_open_until > now) or connections.is_paused(
            conn, now
        ):
            continue  # nothing may reach this EHR now: the items stay held (not sent, not failed)
        if connection_id not in last_slot:
            last_slot[connection_id] = s.scalar(
                sa.select(sa.func.max(BulkReplayItem.release_at)).where(
                    BulkReplayItem.connection_id == connection_id
                )
            )
        slots = release_slots(held, last_slot[connection_id], pace, now, horizon)
        if not slots:
            continue
        items = s.scalars(
            sa.select(BulkReplayItem)
            .where(
                BulkReplayItem.bulk_replay_id == batch.id,
                BulkReplayItem.state == ItemState.HELD.value,
                BulkReplayItem.connection_id == connection_id,
            )
            .order_by(BulkReplayItem.position)
            .limit(len(slots))
        ).all()
        for item, slot in zip(items, slots, strict=False):
            if _release_item(s, batch, item, slot, now):
                released += 1
                last_slot[connection_id] = slot
    return released


def _release_item(
    s: so.Session, batch: BulkReplay, item: BulkReplayItem, slot: datetime, now: datetime
) -> bool:
    """Create this item's replay as an approved single replay is created (queued, with its outbox
    row, decision and audit event), its outbox row available from its slot."""
    exc = s.get(ExceptionItem, item.exception_id)
    if not _move_exception(s, exc.id, ExceptionState.PENDING_APPROVAL, ExceptionState.REPLAYING, now):
        s.execute(
            sa.update(BulkReplayItem)
            .where(BulkReplayItem.id == item.id, BulkReplayItem.state == ItemState.HELD.value)
            .values(
                state=ItemState.CANCELLED.value,
                finished_at=now,
                note=f"not released: the exception was {exc.state}, not pending approval",
            )
        )
        return False
    message = s.get(Message, exc.message_id)
    replay = Replay(
        exception_id=exc.id,
        message_id=message.id,
        payload_version_id=message.current_payload_id,
        state="queued",
        corrected=False,
        requested_by_id=batch.requested_by_id,
        requested_at=batch.requested_at,
        request_reason=batch.reason,
        approved_by_id=batch.approved_by_id,
        approved_at=batch.approved_at,
        not_before=slot,  # ready for a worker from its slot (liveness measures from here)
    )
    s.add(replay)
    s.flush()
    taken = s.execute(
        sa.update(BulkReplayItem)
        .where(BulkReplayItem.id == item.id, BulkReplayItem.state == ItemState.HELD.value)
        .values(state=ItemState.RELEASED.value, release_at=slot, replay_id=replay.id)
        .execution_options(synchronize_session=False)
    ).rowcount
    if taken != 1:  # cancelled meanwhile: undo this transaction's work rather than leave a replay
        raise Conflict(f"bulk replay item {item.id} left held during its release", code="state_conflict")
    # Relayed at once (the relay runs once a housekeeping pass); the job waits for the slot.
    s.add(OutboxEntry(kind="replay", ref_id=str(replay.id), job_id=f"replay-{replay.id}", created_at=now))
    approver = batch.approved_by.username if batch.approved_by else None
    _exception_decision(
        s,
        exc.id,
        actor_id=batch.approved_by_id,
        actor=approver or SYSTEM_ACTOR,
        action="approve",
        audit_action="bulk_replay.release",
        audit_actor=SYSTEM_ACTOR,
        reason=f"bulk replay #{batch.id}, approved by {approver}",
        from_state=ExceptionState.PENDING_APPROVAL.value,
        to_state=ExceptionState.REPLAYING.value,
        details={
            "bulk_replay_id": batch.id,
            "replay_id": replay.id,
            "approved_by": approver,
            "requested_by": batch.requested_by.username,
            "release_at": slot.isoformat() + "Z",
        },
        now=now,
    )
    return True


def _settle_released(s: so.Session, now: datetime) -> int:
    """Released items whose replay has ended take its outcome (delivered or failed)."""
    rows = s.execute(
        sa.select(BulkReplayItem.id, Replay.state)
        .join(Replay, Replay.id == BulkReplayItem.replay_id)
        .where(BulkReplayItem.state == ItemState.RELEASED.value, Replay.state.in_(_FINISHED_REPLAY_STATES))
    ).all()
    for item_id, replay_state in rows:
        s.execute(
            sa.update(BulkReplayItem)
            .where(BulkReplayItem.id == item_id, BulkReplayItem.state == ItemState.RELEASED.value)
            .values(state=item_state(ItemState.RELEASED, replay_state).value, finished_at=now)
        )
    return len(rows)


def _complete_settled(s: so.Session, now: datetime) -> int:
    """Running or paused batches with nothing held and nothing in flight are completed."""
    candidates = s.scalars(
        sa.select(BulkReplay).where(BulkReplay.state.in_([BatchState.RUNNING.value, BatchState.PAUSED.value]))
    ).all()
    completed = 0
    for batch in candidates:
        done = progress(s, batch.id)
        if not done.settled:
            continue
        if _system_move(s, batch, BatchAction.COMPLETE, now, finished_at=now, details=done.as_dict()):
            completed += 1
    return completed


def _system_move(
    s: so.Session, batch: BulkReplay, action: BatchAction, now: datetime, details=None, **values
) -> bool:
    from_state = batch.state
    to_state = plan_batch_action(BatchState(from_state), action, None)
    if not _batch_cas(
        s,
        batch,
        from_state,
        {"state": to_state.value, "version": batch.version + 1, "updated_at": now, **values},
    ):
        return False
    audit.record(
        s,
        actor=SYSTEM_ACTOR,
        action=f"bulk_replay.{action.value}",
        subject_type="bulk_replay",
        subject_id=batch.id,
        from_state=from_state,
        to_state=to_state.value,
        details=details or {},
    )
    return True


# --- compare-and-set helpers ------------------------------------------------------------------------


def _batch_cas(
    s: so.Session, batch: BulkReplay, from_state: str, values: dict, version: int | None = None
) -> bool:
    stmt = sa.update(BulkReplay).where(BulkReplay.id == batch.id, BulkReplay.state == from_state)
    if version is not None:
        stmt = stmt.where(BulkReplay.version == version)
    if s.execute(stmt.values(**values).execution_options(synchronize_session=False)).rowcount != 1:
        return False
    s.refresh(batch)
    return True


def _move_exception(
    s: so.Session,
    exception_id: int,
    from_state: ExceptionState | str,
    to_state: ExceptionState,
    now: datetime,
    version: int | None = None,
) -> bool:
    """The exception's move, through the one compare-and-set (checked against the state tables)."""
    expect: dict = {"state": str(from_state)}
    if version is not None:
        expect["version"] = version
    return cas_update(
        s,
        ExceptionItem,
        exception_id,
        expect=expect,
        values={"state": to_state.value, "updated_at": now},
        bump_version=True,
    )


def _exception_decision(
    s: so.Session,
    exception_id: int,
    *,
    actor_id: int | None,
    actor: str,
    action: str,
    audit_action: str,
    reason: str,
    from_state: str,
    to_state: str,
    details: dict,
    now: datetime,
    audit_actor: str | None = None,
) -> None:
    """The exception's own decision row and audit event (its history reads like a single replay's)."""
    decision = Decision(
        exception_id=exception_id,
        actor_id=actor_id,
        actor=actor,
        action=action,
        reason=reason[:2000],
        from_state=from_state,
        to_state=to_state,
        details=dict(details),
        created_at=now,
    )
    s.add(decision)
    s.flush()
    audit.record(
        s,
        actor=audit_actor or actor,
        action=audit_action,
        subject_type="exception",
        subject_id=exception_id,
        from_state=from_state,
        to_state=to_state,
        reason=reason[:500] or None,
        details={**details, "decision_id": decision.id},
    )


# --- the worker's side ------------------------------------------------------------------------------

MAX_SLOT_WAIT_SECONDS = 10.0


def housekeeping_step(rt) -> int:
    """The pacing step as the worker's housekeeping runs it (app/adapters/queue.py): slots planned
    one housekeeping pass ahead, the next pass plans the rest."""
    return int(release_due(rt.sessions, horizon_seconds=rt.housekeeping_seconds))


def wait_for_slot(sessions: so.sessionmaker, replay_id: int, *, sleep=time.sleep) -> float:
    """Before a replay job claims its replay: a bulk item released ahead of its slot (at most one
    housekeeping pass ahead) waits for it, so the EHR sees the pace, not the relay's cadence.
    Nothing is claimed while waiting: a worker that dies here strands no lease. Returns seconds."""
    with transaction(sessions, read_only=True) as s:
        slot = s.scalar(
            sa.select(BulkReplayItem.release_at)
            .join(Replay, Replay.id == BulkReplayItem.replay_id)
            .where(BulkReplayItem.replay_id == replay_id, Replay.state == "queued")
        )
    if slot is None:
        return 0.0
    wait = min((slot - utcnow()).total_seconds(), MAX_SLOT_WAIT_SECONDS)
    if wait <= 0:
        return 0.0
    sleep(wait)
    return wait


def still_moving(batch: BulkReplay, progress: Progress) -> bool:
    """Worth watching: not final yet, or final with released items still in flight (a cancelled
    batch's released items run to their end)."""
    return BatchState(batch.state) not in FINAL_BATCH_STATES or progress.released > 0


def why_not_replayable(
    actor: User, refs: list[tuple[int, int | None]], found: dict[int, ExceptionItem]
) -> dict[int, str]:
    """For a confirmation page: the listed exceptions `request_batch` would refuse, and why
    (the same rule, read-only)."""
    reasons: dict[int, str] = {}
    for exception_id, version in refs:
        item = found.get(exception_id)
        if item is None:
            reasons[exception_id] = "not found"
            continue
        facts = ExceptionFacts(
            state=ExceptionState(item.state),
            category=item.category,
            needs_not_applied_confirmation=item.needs_not_applied_confirmation,
        )
        try:
            plan_item_request(facts, actor.id, Role(actor.role), "reason given with the request")
        except (Conflict, Forbidden) as exc:
            reasons[exception_id] = exc.message
            continue
        if version is not None and version != item.version:
            reasons[exception_id] = "changed since the list was shown"
    return reasons
