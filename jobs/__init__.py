"""RQ entry points: plain functions that open their own session and call a service."""
