"""The product's own bookkeeping of hand-offs (app/domain/liveness.py has the rule and the bound).

`unclaimed_work` lists the work that is ready but not yet claimed by a worker, with the latest job
relayed for it; the worker's housekeeping asks the queue about each and `queue_again` gives lost
work a new job. `handoff_report` tells the console and /metrics how old the waiting work is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import sqlalchemy as sa
import sqlalchemy.orm as so

from app.db.active import literal_states
from app.db.models import Attempt, ExceptionItem, OutboxEntry, Replay
from app.db.session import transaction
from app.domain.liveness import HandoffPolicy
from app.domain.states import AttemptState, ExceptionState, ReplayState

from .clock import utcnow

log = logging.getLogger("recon.liveness")


def replay_ready_at() -> sa.ColumnElement:
    """When an approved replay became ready for a worker: its approval, or the end of the window
    it was deferred to (an earlier request may have been in the EHR's hands until then)."""
    approved = sa.func.coalesce(Replay.approved_at, Replay.requested_at)
    return sa.case(
        (sa.and_(Replay.not_before.is_not(None), Replay.not_before > approved), Replay.not_before),
        else_=approved,
    )


@dataclass(frozen=True)
class UnclaimedWork:
    """A queued attempt or an approved replay that no worker has claimed yet."""

    kind: str  # deliver | replay
    ref_id: int
    ready_at: datetime  # when it became ready: the attempt was queued, the replay approved
    job_id: str | None  # the latest job relayed for it (None: no outbox row relayed yet)
    relayed_at: datetime | None
    has_outbox_entry: bool


def unclaimed_work(sessions: so.sessionmaker, limit: int = 500) -> list[UnclaimedWork]:
    """Ready, unclaimed work, oldest first. Reads only the active few (index on outcome / state)."""
    with transaction(sessions, read_only=True) as s:
        # ix_attempts_queued (id) WHERE outcome = 'queued': the unclaimed few, already in id order.
        attempts = s.execute(
            sa.select(Attempt.id, Attempt.started_at)
            # held behind an earlier message (ordering): released by that message's settle
            .where(
                literal_states(Attempt.outcome, [AttemptState.QUEUED.value]), Attempt.held_behind.is_(None)
            )
            .order_by(Attempt.id)
            .limit(limit)
        ).all()
        replays = s.execute(
            sa.select(Replay.id, replay_ready_at())
            .where(Replay.state == ReplayState.QUEUED)
            .order_by(Replay.id)
            .limit(limit)
        ).all()
        ready = {("deliver", str(i)): at for i, at in attempts} | {
            ("replay", str(i)): at for i, at in replays
        }
        if not ready:
            return []
        latest: dict[tuple[str, str], tuple[str | None, datetime | None]] = {}
        for kind, ids in (
            ("deliver", [str(i) for i, _ in attempts]),
            ("replay", [str(i) for i, _ in replays]),
        ):
            if not ids:
                continue
            rows = s.execute(
                sa.select(OutboxEntry.ref_id, OutboxEntry.job_id, OutboxEntry.relayed_at)
                .where(OutboxEntry.kind == kind, OutboxEntry.ref_id.in_(ids))
                .order_by(OutboxEntry.id)
            ).all()
            for ref_id, job_id, relayed_at in rows:  # ascending ids: the last one wins
                latest[(kind, ref_id)] = (job_id if relayed_at else None, relayed_at)
    out = []
    for (kind, ref_id), ready_at in ready.items():
        job_id, relayed_at = latest.get((kind, ref_id), (None, None))
        out.append(
            UnclaimedWork(
                kind=kind,
                ref_id=int(ref_id),
                ready_at=ready_at,
                job_id=job_id,
                relayed_at=relayed_at,
                has_outbox_entry=(kind, ref_id) in latest,
            )
        )
    return sorted(out, key=lambda w: w.ready_at)


def queue_again(sessions: so.sessionmaker, work: list[tuple[UnclaimedWork, str]]) -> int:
    """A new outbox row (a new job id) for each lost piece of work; the relay enqueues it."""
    if not work:
        return 0
    with transaction(sessions) as s:
        now = utcnow()
        for item, reason in work:
            stamp = now.strftime("%Y%m%d%H%M%S%f")
            s.add(
                OutboxEntry(
                    kind=item.kind,
                    ref_id=str(item.ref_id),
                    job_id=f"{item.kind}-{item.ref_id}-again-{stamp}",
                    created_at=now,
                )
            )
            log.warning(
                "re-queued %s %s: %s",
                item.kind,
                item.ref_id,
                reason,
                extra={"kind": item.kind, "ref_id": item.ref_id, "last_job_id": item.job_id},
            )
    return len(work)


# --- visible age ---------------------------------------------------------------------------------

STAGES = ("queued_delivery", "retrying", "replaying", "lease_expired")
STAGE_LABELS = {
    "queued_delivery": "Deliveries waiting for a worker",
    "retrying": "Automatic retries past due",
    "replaying": "Approved replays waiting for a worker",
    "lease_expired": "Claimed work whose lease ran out, not yet reaped",
}


@dataclass
class StageAge:
    waiting: int = 0
    oldest_seconds: float = 0.0
    stalled: int = 0  # older than the bound


@dataclass
class HandoffReport:
    bound_seconds: float
    stages: dict[str, StageAge] = field(default_factory=dict)

    @property
    def stalled(self) -> int:
        return sum(stage.stalled for stage in self.stages.values())


def _age(session: so.Session, since_expr, where, now: datetime, bound: float) -> StageAge:
    count, oldest = session.execute(sa.select(sa.func.count(), sa.func.min(since_expr)).where(*where)).one()
    if not count:
        return StageAge()
    cutoff = now - timedelta(seconds=bound)
    stalled = session.scalar(sa.select(sa.func.count()).where(*where, since_expr < cutoff))
    return StageAge(waiting=count, oldest_seconds=max((now - oldest).total_seconds(), 0.0), stalled=stalled)


def handoff_report(session: so.Session, policy: HandoffPolicy, now: datetime | None = None) -> HandoffReport:
    """How long ready work has waited at each hand-off, and how much of it is past the bound.

    Ages run from when the item became ready (queued, due, approved), not from its latest job, so a
    piece of work re-queued again and again still shows its true age. Each query reads only active
    rows through the (outcome | state, …) indexes.
    """
    now = now or utcnow()
    bound = policy.bound_seconds
    report = HandoffReport(bound_seconds=bound)
    report.stages["queued_delivery"] = _age(
        session,
        Attempt.started_at,
        [literal_states(Attempt.outcome, [AttemptState.QUEUED.value]), Attempt.held_behind.is_(None)],
        now,
        bound,
    )
    report.stages["retrying"] = _age(
        session,
        ExceptionItem.next_retry_at,
        [
            literal_states(ExceptionItem.state, [ExceptionState.RETRYING.value]),
            ExceptionItem.next_retry_at <= now,
        ],
        now,
        bound,
    )
    report.stages["replaying"] = _age(
        session,
        replay_ready_at(),
        [Replay.state == ReplayState.QUEUED],
        now,
        bound,
    )
    # Reaped within one housekeeping pass when workers live: any that wait longer are a signal.
    grace = now - timedelta(seconds=policy.housekeeping_seconds + policy.margin_seconds)
    expired_attempts = _age(
        session,
        Attempt.lease_expires_at,
        [Attempt.outcome == AttemptState.IN_FLIGHT, Attempt.lease_expires_at < grace],
        now,
        0,
    )
    expired_replays = _age(
        session,
        Replay.lease_expires_at,
        [Replay.state == ReplayState.RUNNING, Replay.lease_expires_at < grace],
        now,
        0,
    )
    report.stages["lease_expired"] = StageAge(
        waiting=expired_attempts.waiting + expired_replays.waiting,
        oldest_seconds=max(expired_attempts.oldest_seconds, expired_replays.oldest_seconds),
        stalled=expired_attempts.waiting + expired_replays.waiting,
    )
    return report
