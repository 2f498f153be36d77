"""The one clock: naive UTC (freezegun-friendly), and a way to run code at another time.

Services import `utcnow` by name; it consults an injected clock first, so a caller that must set
the time (the demo loader replaying three days of history through the worker's own functions)
wraps its calls in `use_clock(fn)` instead of patching every module. The override is a context
variable: it applies to the calling thread (and tasks started from it) only, never to a web
request or a worker thread running beside it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime

_override: ContextVar[Callable[[], datetime] | None] = ContextVar("recon_clock", default=None)


def utcnow() -> datetime:
    """Now, naive UTC — or the injected clock's time inside `use_clock`."""
    injected = _override.get()
    if injected is not None:
        return injected()
    return datetime.now(UTC).replace(tzinfo=None)


@contextmanager
def use_clock(clock: Callable[[], datetime]) -> Iterator[None]:
    """Within this block (this thread / context), `utcnow()` returns `clock()`."""
    token = _override.set(clock)
    try:
        yield
    finally:
        _override.reset(token)
