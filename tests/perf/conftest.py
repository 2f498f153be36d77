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


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


__all__ = ["report", "percentile", "Timer", "statistics"]
