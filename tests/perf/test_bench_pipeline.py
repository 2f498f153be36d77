"""Throughput of intake (HTTP API, `recon web` in its own process) and of delivery
(worker → FHIR adapter → simulator)."""

import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.perf.conftest import Timer, percentile, report
from tests.samples import medication_request, message_body

MESSAGES = 400
CLIENT_THREADS = 8


@pytest.fixture
def web_process(database_url, redis_url):
    """`recon web` as its own process, as in production: the benchmark's HTTP clients do not
    share its interpreter lock."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, DATABASE_URL=database_url, REDIS_URL=redis_url)
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "web", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_bench_intake_and_delivery(web_process, users, fhir_connection, run_worker, sim_control):
    live_server = web_process
    latencies: list[float] = []
    lock = threading.Lock()
    numbers = iter(range(MESSAGES))

    def client_loop():
        with httpx.Client(
            base_url=live_server, headers={"Authorization": f"Bearer {users['svc_token']}"}
        ) as http:
            while True:
                with lock:
                    n = next(numbers, None)
                if n is None:
                    return
                t0 = time.perf_counter()
                r = http.post(
                    "/api/v1/messages",
                    json=message_body("mercy-epic", medication_request(n)),
                    headers={"Idempotency-Key": f"bench-{n}"},
                )
                assert r.status_code == 202
                with lock:
                    latencies.append((time.perf_counter() - t0) * 1000)

    with Timer() as intake:
        threads = [threading.Thread(target=client_loop) for _ in range(CLIENT_THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    rate = MESSAGES / intake.seconds
    p95 = percentile(latencies, 95)
    report(
        "intake",
        {
            "messages": MESSAGES,
            "msg_per_s": f"{rate:.0f}",
            "p50_ms": f"{percentile(latencies, 50):.1f}",
            "p95_ms": f"{p95:.1f}",
        },
        "≥ 100 msg/s and p95 ≤ 250 ms, one `recon web` process on the embedded defaults",
        rate >= 100 and p95 <= 250,
    )

    with Timer() as delivery:
        counts = run_worker()
    assert sim_control.applied(fhir_connection.tenant)["total"] == MESSAGES
    drate = MESSAGES / delivery.seconds
    report(
        "delivery",
        {"messages": MESSAGES, "deliveries_per_s": f"{drate:.0f}", "jobs": counts["jobs"]},
        "≥ 40 deliveries/s for one worker process",
        drate >= 40,
    )
