"""SLA policy (SPEC 3.3): due times by category and clinical risk, and the status of a timer."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from .delivery import Category


class SlaStatus(StrEnum):
    ON_TRACK = "on_track"
    AT_RISK = "at_risk"
    BREACHED = "breached"


DEFAULT_HIGH_RISK = timedelta(minutes=30)
DEFAULT_UNKNOWN_OUTCOME = timedelta(minutes=15)
DEFAULT_OTHER = timedelta(hours=4)
AT_RISK_FRACTION = 0.25


@dataclass(frozen=True)
class SlaRule:
    """One row of a policy: category (None = any) × risk (None = any) → minutes."""

    minutes: int
    category: str | None = None
    risk: str | None = None
    customer_id: int | None = None  # None = global default

    def specificity(self) -> tuple[int, int, int]:
        return (self.customer_id is not None, self.category is not None, self.risk is not None)


@dataclass
class SlaPolicy:
    """Rules looked up most-specific first; built-in defaults when nothing matches."""

    rules: list[SlaRule] = field(default_factory=list)

    def window(self, category: str, risk: str, customer_id: int | None = None) -> timedelta:
        matching = [
            r
            for r in self.rules
            if (r.customer_id is None or r.customer_id == customer_id)
            and (r.category is None or r.category == category)
            and (r.risk is None or r.risk == risk)
        ]
        if matching:
            best = max(matching, key=SlaRule.specificity)
            return timedelta(minutes=best.minutes)
        return default_window(category, risk)

    def due_at(self, start: datetime, category: str, risk: str, customer_id: int | None = None) -> datetime:
        return start + self.window(category, risk, customer_id)


def default_window(category: str, risk: str) -> timedelta:
    """Defaults: unknown_outcome 15 min, high-risk 30 min, others 4 h."""
    if category == Category.UNKNOWN_OUTCOME:
        return DEFAULT_UNKNOWN_OUTCOME
    if risk == "high":
        return DEFAULT_HIGH_RISK
    return DEFAULT_OTHER


def sla_status(now: datetime, started_at: datetime, due_at: datetime) -> SlaStatus:
    """On track, at risk (under 25% of the window left) or breached."""
    if now >= due_at:
        return SlaStatus.BREACHED
    total = (due_at - started_at).total_seconds()
    left = (due_at - now).total_seconds()
    if total <= 0 or left / total < AT_RISK_FRACTION:
        return SlaStatus.AT_RISK
    return SlaStatus.ON_TRACK


def format_remaining(now: datetime, due_at: datetime) -> str:
    """'12m 03s left' / 'breached 1h 05m ago' for the server-rendered countdown."""
    seconds = int((due_at - now).total_seconds())
    span = abs(seconds)
    h, rem = divmod(span, 3600)
    m, s = divmod(rem, 60)
    text = f"{h}h {m:02d}m" if h else f"{m}m {s:02d}s"
    return f"{text} left" if seconds > 0 else f"breached {text} ago"
