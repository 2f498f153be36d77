"""Adapters to the outside world: EHRs, Redis, RQ."""
