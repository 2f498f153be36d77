"""One parser for the timestamps people and tools type (API, console filters, CLI)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


def parse_utc(value: str, *, end_of_day: bool = False) -> datetime:
    """'2026-05-01' or an ISO 8601 time, as naive UTC. A date-only value with end_of_day covers
    that whole day. Raises ValueError for anything else (including out-of-range values)."""
    value = value.strip()
    try:
        if len(value) == 10:
            day = datetime.fromisoformat(value)
            return day + timedelta(days=1) if end_of_day else day
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
        return when.astimezone(UTC).replace(tzinfo=None) if when.tzinfo else when
    except OverflowError:
        raise ValueError(f"{value!r} is out of range") from None
