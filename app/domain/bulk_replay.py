"""Bulk replay (issue 6): one approval for a fixed, listed batch of exceptions, paced per connection.

Pure rules, no storage: the batch's state machine (`plan_batch_action`), each item's state, the
pacing rule (`release_slots`), the progress arithmetic (`Progress`) and the four-eyes check of the
approval, which is the single replay's own rule (`states.plan_transition`) applied to the batch.

A batch is a fixed list chosen by a reviewer with a reason. Each item keeps its own replay: its
own idempotency key (the message's), claim, attempt and audit events. The batch only decides
*when* each item's replay is created and queued.

    requested --approve--> approved --(system: first release)--> running <--pause/resume--> paused
    requested --reject--> rejected
    requested | approved | running | paused --cancel--> cancelled
    running | paused --(system: nothing held, nothing in flight)--> completed
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from .errors import Conflict, Forbidden, Invalid
from .roles import Role
from .states import Action, DecisionRequest, ExceptionFacts, ExceptionState, plan_transition


class BatchState(StrEnum):
    REQUESTED = "requested"
    APPROVED = "approved"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    REJECTED = "rejected"


FINAL_BATCH_STATES = frozenset({BatchState.COMPLETED, BatchState.CANCELLED, BatchState.REJECTED})
# States in which the pacing step releases items.
RELEASING_STATES = frozenset({BatchState.APPROVED, BatchState.RUNNING})


class BatchAction(StrEnum):
    APPROVE = "approve"
    REJECT = "reject"
    PAUSE = "pause"
    RESUME = "resume"
    CANCEL = "cancel"
    # the system's own moves
    START = "start"
    COMPLETE = "complete"


class ItemState(StrEnum):
    """One item of a batch. `held`: not released yet (awaiting approval, its pacing slot, a
    resume, or a closed circuit); `released`: its replay exists and is queued or running."""

    HELD = "held"
    RELEASED = "released"
    DELIVERED = "delivered"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL_ITEM_STATES = frozenset({ItemState.DELIVERED, ItemState.FAILED, ItemState.CANCELLED})

_PEOPLE = frozenset({Role.REVIEWER, Role.CLINICAL_LEAD})
_LEADS = frozenset({Role.CLINICAL_LEAD})
SYSTEM = frozenset()  # no human role may take a system move


@dataclass(frozen=True)
class BatchRule:
    from_states: frozenset[BatchState]
    roles: frozenset[Role]
    to_state: BatchState
    needs_reason: bool = False


BATCH_RULES: dict[BatchAction, BatchRule] = {
    BatchAction.APPROVE: BatchRule(frozenset({BatchState.REQUESTED}), _LEADS, BatchState.APPROVED),
    BatchAction.REJECT: BatchRule(frozenset({BatchState.REQUESTED}), _LEADS, BatchState.REJECTED, True),
    # Stopping is a brake anyone working the queues may pull; resuming only continues what a
    # clinical lead already approved.
    BatchAction.PAUSE: BatchRule(
        frozenset({BatchState.APPROVED, BatchState.RUNNING}), _PEOPLE, BatchState.PAUSED
    ),
    BatchAction.RESUME: BatchRule(frozenset({BatchState.PAUSED}), _PEOPLE, BatchState.RUNNING),
    BatchAction.CANCEL: BatchRule(
        frozenset({BatchState.REQUESTED, BatchState.APPROVED, BatchState.RUNNING, BatchState.PAUSED}),
        _PEOPLE,
        BatchState.CANCELLED,
        True,
    ),
    BatchAction.START: BatchRule(frozenset({BatchState.APPROVED}), SYSTEM, BatchState.RUNNING),
    BatchAction.COMPLETE: BatchRule(
        frozenset({BatchState.RUNNING, BatchState.PAUSED}), SYSTEM, BatchState.COMPLETED
    ),
}

HUMAN_ACTIONS = tuple(a for a, rule in BATCH_RULES.items() if rule.roles)


def parse_batch_action(value: str) -> BatchAction:
    try:
        action = BatchAction(value)
    except ValueError:
        raise Invalid(f"unknown bulk replay action {value!r}", code="unknown_action") from None
    if action not in HUMAN_ACTIONS:
        raise Invalid(f"{action} is the system's own move", code="unknown_action")
    return action


def plan_batch_action(
    state: BatchState, action: BatchAction, role: Role | None, reason: str = ""
) -> BatchState:
    """The state a batch moves to, or raise. role None: the system. Checks: role (403), content
    (422), state (409) — the order of `states.plan_transition`."""
    rule = BATCH_RULES[action]
    if role is None:
        if rule.roles:
            raise Forbidden(f"{action} is a person's decision", code="role_forbidden")
    elif role not in rule.roles:
        raise Forbidden(f"role {role} may not {action} a bulk replay", code="role_forbidden")
    if rule.needs_reason and not (reason or "").strip():
        raise Invalid(f"{action} needs a reason", code="reason_required")
    if state not in rule.from_states:
        raise Conflict(f"cannot {action} a bulk replay that is {state}", code="state_conflict")
    return rule.to_state


def available_batch_actions(state: BatchState | str, role: Role | str) -> list[BatchAction]:
    """What `role` may do to a batch in `state` now (for the console's buttons)."""
    try:
        state, role = BatchState(state), Role(role)
    except ValueError:
        return []
    return [a for a in HUMAN_ACTIONS if role in BATCH_RULES[a].roles and state in BATCH_RULES[a].from_states]


# --- the request and its approval ----------------------------------------------------------------

MAX_ITEMS = 1000


def check_item_list(exception_ids: list[int]) -> None:
    """A batch is a fixed list: non-empty, bounded, no id twice."""
    if not exception_ids:
        raise Invalid("a bulk replay needs at least one exception", code="empty_batch")
    if len(exception_ids) > MAX_ITEMS:
        raise Invalid(f"a bulk replay holds at most {MAX_ITEMS} exceptions", code="batch_too_large")
    if len(set(exception_ids)) != len(exception_ids):
        raise Invalid("an exception is listed twice", code="duplicate_item")


def plan_item_request(facts: ExceptionFacts, actor_id: int, role: Role, reason: str) -> ExceptionState:
    """Each listed exception must be one its requester could resubmit on its own (same rule)."""
    return plan_transition(
        facts, DecisionRequest(action=Action.RESUBMIT, actor_id=actor_id, actor_role=role, reason=reason)
    )


@dataclass(frozen=True)
class ApprovalFacts:
    """The people of a batch: its requester, who edited a payload an item would send, and which
    accounts created/enrolled those people's accounts (the single replay's four-eyes facts)."""

    requested_by: int
    edited_by: frozenset[int] = frozenset()
    parties_enrolled_by: frozenset[int] = frozenset()


def check_approval(
    facts: ApprovalFacts,
    *,
    actor_id: int,
    role: Role,
    password_confirmed: bool,
    password_given: bool = False,
    actor_enrolled_by: frozenset[int] = frozenset(),
    approvals_locked: bool = False,
) -> None:
    """Four-eyes for the batch: exactly the rule a single replay's approval passes — a clinical
    lead who is not the requester, edited none of the payloads, is not enrolled by (and did not
    enroll) those people, whose approvals are not locked, with the password re-entered."""
    plan_transition(
        ExceptionFacts(
            state=ExceptionState.PENDING_APPROVAL,
            category="",
            replay_requested_by=facts.requested_by,
            replay_edited_by=facts.edited_by,
            replay_parties_enrolled_by=facts.parties_enrolled_by,
        ),
        DecisionRequest(
            action=Action.APPROVE,
            actor_id=actor_id,
            actor_role=role,
            password_confirmed=password_confirmed,
            password_given=password_given,
            actor_enrolled_by=actor_enrolled_by,
            approvals_locked=approvals_locked,
        ),
    )


# --- pacing ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pace:
    """At most `count` releases per `per_seconds` on one connection, evenly spaced (no bursts)."""

    count: int = 5
    per_seconds: float = 1.0

    MAX_COUNT = 1000
    MIN_SECONDS = 0.1
    MAX_SECONDS = 3600.0

    def __post_init__(self) -> None:
        if not isinstance(self.count, int) or isinstance(self.count, bool):
            raise Invalid("pace count must be a whole number", code="invalid_pace")
        if not 1 <= self.count <= self.MAX_COUNT:
            raise Invalid(f"pace count must be between 1 and {self.MAX_COUNT}", code="invalid_pace")
        if not self.MIN_SECONDS <= float(self.per_seconds) <= self.MAX_SECONDS:
            raise Invalid(
                f"pace interval must be between {self.MIN_SECONDS} and {self.MAX_SECONDS:.0f} seconds",
                code="invalid_pace",
            )

    @property
    def spacing(self) -> timedelta:
        """The gap between two releases on one connection, rounded up to the microsecond (rounded
        down, `count` gaps would fall short of the interval and let one release too many in)."""
        return timedelta(microseconds=math.ceil(round(float(self.per_seconds) * 1_000_000) / self.count))

    def describe(self) -> str:
        per = f"{self.per_seconds:g} s" if self.per_seconds != 1 else "second"
        return f"{self.count} per {per} per connection"


DEFAULT_PACE = Pace()


def release_slots(
    pending: int, last_slot: datetime | None, pace: Pace, now: datetime, horizon: timedelta
) -> list[datetime]:
    """When to release the next items of one connection: evenly spaced `pace.spacing` apart,
    the first no earlier than `now` and no sooner than one spacing after the connection's last
    release (`last_slot`, any batch), up to `now + horizon` (the next pacing step plans the rest).

    Never a catch-up burst after a pause or an idle worker: slots start from now. Hence, over the
    slots of every call, any window of `pace.per_seconds` holds at most `pace.count` of them.
    """
    if pending <= 0:
        return []
    spacing = pace.spacing
    slot = now if last_slot is None else max(now, last_slot + spacing)
    end = now + max(horizon, timedelta(0))
    slots = []
    while len(slots) < pending and slot <= end:
        slots.append(slot)
        slot += spacing
    return slots


# --- progress -------------------------------------------------------------------------------------

# A released item's replay, by the replay's state: still in flight, or how it ended.
REPLAY_OUTCOMES: dict[str, ItemState] = {
    "queued": ItemState.RELEASED,
    "running": ItemState.RELEASED,
    "succeeded": ItemState.DELIVERED,
    "failed": ItemState.FAILED,
    "lost": ItemState.FAILED,  # the worker died mid-call: unknown_outcome, a human reconciles it
    "rejected": ItemState.FAILED,
}


def item_state(stored: ItemState | str, replay_state: str | None) -> ItemState:
    """An item's state as of now: a released item follows its replay."""
    stored = ItemState(stored)
    if stored is ItemState.RELEASED and replay_state is not None:
        return REPLAY_OUTCOMES.get(replay_state, ItemState.RELEASED)
    return stored


@dataclass(frozen=True)
class Progress:
    """Where every item of a batch is. held + released + delivered + failed + cancelled = total."""

    total: int
    held: int = 0
    released: int = 0
    delivered: int = 0
    failed: int = 0
    cancelled: int = 0

    @classmethod
    def of(cls, states: Iterable[ItemState | str]) -> Progress:
        counts = Counter(ItemState(s) for s in states)
        return cls(
            total=sum(counts.values()),
            held=counts[ItemState.HELD],
            released=counts[ItemState.RELEASED],
            delivered=counts[ItemState.DELIVERED],
            failed=counts[ItemState.FAILED],
            cancelled=counts[ItemState.CANCELLED],
        )

    @classmethod
    def from_counts(cls, counts: dict[str, int]) -> Progress:
        """From {item state: count}; an unknown state name is an error, not silently dropped."""
        parsed = {ItemState(k): v for k, v in counts.items()}
        return cls(
            total=sum(parsed.values()),
            held=parsed.get(ItemState.HELD, 0),
            released=parsed.get(ItemState.RELEASED, 0),
            delivered=parsed.get(ItemState.DELIVERED, 0),
            failed=parsed.get(ItemState.FAILED, 0),
            cancelled=parsed.get(ItemState.CANCELLED, 0),
        )

    @property
    def finished(self) -> int:
        return self.delivered + self.failed + self.cancelled

    @property
    def adds_up(self) -> bool:
        return self.held + self.released + self.delivered + self.failed + self.cancelled == self.total

    @property
    def settled(self) -> bool:
        """Nothing waits and nothing is in flight."""
        return self.held == 0 and self.released == 0

    @property
    def percent_done(self) -> int:
        return 100 if self.total == 0 else (100 * self.finished) // self.total

    def as_dict(self) -> dict[str, int]:
        return {
            "total": self.total,
            "held": self.held,
            "released": self.released,
            "delivered": self.delivered,
            "failed": self.failed,
            "cancelled": self.cancelled,
        }
