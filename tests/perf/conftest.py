"""Benchmarks print their figures beside the target; `make bench` runs them (never `make test`)."""

import statistics
import time


def report(name: str, figures: dict, target: str, ok: bool) -> None:
    shown = ", ".join(f"{k}={v}" for k, v in figures.items())
    print(f"\nBENCH {name}: {shown} | target: {target} | {'MEETS' if ok else 'MISSES'} target")


def percentile(values, p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    k = max(0, min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def quiesce_postgres(url: str, timeout: float = 60.0) -> str:
    """Before a throughput benchmark on PostgreSQL: what the previous benchmark wrote (a million
    audit or history rows) flushed by a CHECKPOINT, and no autovacuum worker still busy with it,
    so the run and its anchors measure their own work, not that backlog. Returns what it did."""
    import psycopg

    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    waited = 0.0
    with psycopg.connect(dsn, autocommit=True) as conn:
        try:
            conn.execute("CHECKPOINT")
        except psycopg.Error as exc:  # not allowed for this role: the wait below still applies
            checkpoint = f"no checkpoint ({type(exc).__name__})"
        else:
            checkpoint = "checkpoint"
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            busy = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'"
            ).fetchone()[0]
            if not busy:
                break
            time.sleep(0.5)
        waited = time.monotonic() - started
    return f"{checkpoint}, autovacuum idle after {waited:.1f} s"


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


__all__ = ["report", "percentile", "quiesce_postgres", "Timer", "statistics"]
