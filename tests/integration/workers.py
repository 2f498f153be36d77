"""Real `recon worker` processes for liveness and kill tests: started with short, test-sized timing,
optionally with a fault planted at a named point of the delivery path (app/services/faults.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from app.domain.liveness import HandoffPolicy

# Test-sized timing: lease 2 s, housekeeping every 0.5 s, margin 3 s → bound 2 + 1 + 3 = 6 s.
POLICY = HandoffPolicy(lease_seconds=2, housekeeping_seconds=0.5, margin_seconds=3)


def start_worker(database_url: str, redis_url: str, queue_name: str, *extra: str, fault: str | None = None):
    env = dict(
        os.environ,
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        RECON_QUEUE=queue_name,
        RECON_LEASE_SECONDS=str(POLICY.lease_seconds),
        RECON_HOUSEKEEPING_SECONDS=str(POLICY.housekeeping_seconds),
        RECON_HANDOFF_MARGIN_SECONDS=str(POLICY.margin_seconds),
    )
    env.pop("RECON_FAULT_INJECT", None)
    if fault:
        env["RECON_FAULT_INJECT"] = fault
    return subprocess.Popen(
        [sys.executable, "-m", "app.cli", "worker", *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def wait_for(predicate, timeout: float = 30.0, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return False


def wait_until_alive(redis_client, queue_name: str, proc, timeout: float = 30.0) -> float:
    """Block until the worker process has beaten once (it is up and housekeeping); returns when."""
    key = f"recon:worker-alive:{queue_name}:recon-{socket.gethostname()}-{proc.pid}"
    assert wait_for(lambda: redis_client.exists(key) or proc.poll() is not None, timeout), "worker never beat"
    assert proc.poll() is None, proc.stdout.read().decode()
    return time.monotonic()


def stop(proc) -> str:
    """Stop a worker (SIGKILL if it still runs) and return what it printed."""
    if proc.poll() is None:
        proc.kill()
    out, _ = proc.communicate(timeout=30)
    return out.decode(errors="replace")
