"""Delivery, automatic retries, approved replays and the lease reaper (SPEC 2, 3.1), one module per
flow: deliver (first delivery and retries' attempts), retries (the scheduler), replays, reaper,
outbox (what the relay reads), batch (several deliveries of one connection per job); common (the gate, the call, the heartbeat, the bookkeeping after a
call) and runtime (what a worker needs).

A network call never happens inside a database transaction: each flow is
claim (one transaction, compare-and-set) → call the adapter → record (one
transaction, compare-and-set). A duplicate job finds nothing to claim and does
nothing; a worker that dies mid-call leaves an expired lease that the reaper
turns into `unknown_outcome` — never into a silent re-send.
"""

from .batch import deliver_batch
from .common import (
    Heartbeat,
    attempt_result_values,
    call,
    envelope_for,
    finish_attempt,
    gate,
    late_result,
    resolve,
)
from .deliver import claim_attempt, deliver_attempt, settle_attempt, settle_delivery
from .outbox import mark_relayed, next_deferred_at, pending_outbox
from .reaper import escalate_breached, reap_expired_leases
from .replays import claim_replay, run_replay, settle_replay
from .retries import end_expired_pauses, queue_retry, schedule_due_retries
from .runtime import AdapterFactory, Runtime, cached_adapters, close_adapters, default_adapter_factory
from .versions import VERSION_CHECK_STEP, check_pinned_versions

__all__ = [
    "VERSION_CHECK_STEP",
    "AdapterFactory",
    "Heartbeat",
    "Runtime",
    "attempt_result_values",
    "cached_adapters",
    "call",
    "check_pinned_versions",
    "claim_attempt",
    "claim_replay",
    "close_adapters",
    "default_adapter_factory",
    "deliver_attempt",
    "deliver_batch",
    "envelope_for",
    "escalate_breached",
    "finish_attempt",
    "gate",
    "late_result",
    "mark_relayed",
    "next_deferred_at",
    "pending_outbox",
    "queue_retry",
    "reap_expired_leases",
    "resolve",
    "run_replay",
    "schedule_due_retries",
    "end_expired_pauses",
    "settle_attempt",
    "settle_delivery",
    "settle_replay",
]
