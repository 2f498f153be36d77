"""Liveness: a bound on every hand-off, and the rule that re-queues work lost between two owners.

Safety (never applied twice) comes from compare-and-set claims; liveness (never stuck) comes from
here. Every piece of work is handed from one owner to the next — intake → outbox → RQ → a worker's
claim → the EHR → a result — and each hand-off either completes, or is noticed and repeated within
a bound that follows from configuration alone:

* H — the housekeeping interval: every live worker relays the outbox, schedules due retries, reaps
  expired leases and re-queues lost work at least this often, whatever jobs it is running;
* W — the worker timeout, 3·H: a worker whose heartbeat is older than this is dead;
* L — the lease: a worker that claimed work renews its lease every L/3 while it lives;
* M — a margin for queue wait and database latency.

Unclaimed work is relayed within H; if the worker that took its job dies before claiming it, the job
is re-queued within W + H; a worker that dies after claiming lets its lease lapse within L and the
reaper moves the item to a human queue within H. The bound is therefore

    bound = L + 2·H + M        (with W ≤ L; otherwise W replaces L)

from the moment an item becomes ready (accepted, retry due, replay approved) to a claim, a human
queue or a terminal state — given a live worker with a free slot. Work that waits longer is shown
as stalled (dashboard, /metrics): a backlog or no live worker at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


@dataclass(frozen=True)
class HandoffPolicy:
    """The timing every worker and every monitor agrees on; built from the environment."""

    lease_seconds: float = 90.0
    housekeeping_seconds: float = 2.0
    margin_seconds: float = 10.0

    @property
    def worker_timeout_seconds(self) -> float:
        """A worker silent for this long is dead (three missed housekeeping heartbeats)."""
        return 3 * self.housekeeping_seconds

    @property
    def claim_timeout_seconds(self) -> float:
        """How long a job may sit with a live worker, taken but unclaimed, before it is queued again.
        A claim follows a dequeue within milliseconds; a worker stuck that long is treated as gone."""
        return max(self.worker_timeout_seconds, 2 * self.housekeeping_seconds)

    @property
    def bound_seconds(self) -> float:
        """The longest a ready item should wait for a claim, a human queue or a terminal state."""
        return (
            max(self.lease_seconds, self.worker_timeout_seconds)
            + 2 * self.housekeeping_seconds
            + self.margin_seconds
        )


class JobStatus(StrEnum):
    """RQ's job states, as far as this rule cares (anything else counts as OTHER)."""

    QUEUED = "queued"
    STARTED = "started"
    FINISHED = "finished"
    FAILED = "failed"
    STOPPED = "stopped"
    CANCELED = "canceled"
    SCHEDULED = "scheduled"
    DEFERRED = "deferred"
    OTHER = "other"


_ENDED = {JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED}


@dataclass(frozen=True)
class JobView:
    """What the queue says about the latest job of an unclaimed item.

    status: None when the job no longer exists (Redis lost its data, or it expired).
    waiting_in_queue: the job id is in the queue's list, in line for a worker.
    in_transit: the job id is in the queue's hand-over list: a worker has just taken it and is
        about to start it (or died doing so).
    worker_alive: for a started job, whether the worker that took it still beats (None: unknown).
    started_seconds: for a started job, how long ago it started (None: unknown).
    """

    status: JobStatus | None
    waiting_in_queue: bool = False
    in_transit: bool = False
    worker_alive: bool | None = None
    started_seconds: float | None = None


def requeue_reason(job: JobView, unclaimed_seconds: float, policy: HandoffPolicy) -> str | None:
    """Why an item still unclaimed `unclaimed_seconds` after its job was relayed must be queued
    again, or None when its job is still on its way. Re-queueing is always safe (the claim is a
    compare-and-set), so when in doubt past the claim timeout, this says yes."""
    if unclaimed_seconds < policy.housekeeping_seconds:
        return None  # just relayed: give the queue one pass before judging
    if job.status is None:
        return "its job is gone from Redis"
    if job.status in _ENDED:
        return f"its job is {job.status.value} but the work was never claimed"
    if job.status is JobStatus.QUEUED:
        if job.waiting_in_queue:
            return None  # in line behind other work: a backlog, shown as such, not a lost hand-off
        if job.in_transit:
            if unclaimed_seconds >= policy.claim_timeout_seconds:
                return "its job was taken from the queue but never started (the worker died)"
            return None
        return "its job left the queue but never started (the worker that took it died)"
    if job.status is JobStatus.STARTED:
        if job.worker_alive is False:
            return "the worker that took its job died before claiming it"
        running_for = unclaimed_seconds if job.started_seconds is None else job.started_seconds
        if running_for >= policy.claim_timeout_seconds:
            return f"its job started {running_for:.0f} s ago but nothing claimed the work"
        return None
    if unclaimed_seconds >= policy.claim_timeout_seconds:
        return f"its job is {job.status.value} and nothing claimed the work for {unclaimed_seconds:.0f} s"
    return None
