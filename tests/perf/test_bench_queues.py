"""Queue pages over a large backlog: keyset pagination must not slow down page by page."""

import random
import time
import uuid
from datetime import timedelta

import sqlalchemy as sa

from app.db.models import ExceptionItem, Message
from app.db.session import transaction
from app.domain.delivery import Category
from app.services import queries
from app.services.clock import utcnow
from tests.factories import setup_connection
from tests.perf.conftest import percentile, report

BACKLOG = 20_000
CATEGORIES = [c.value for c in Category]


def _fill(sessions, users) -> None:
    """Bulk rows (not through the services: this measures the read side, not intake)."""
    conn = setup_connection(sessions)
    rng = random.Random(1)
    now = utcnow()
    messages, items = [], []
    for n in range(BACKLOG):
        mid = str(uuid.UUID(int=rng.getrandbits(128)))
        created = now - timedelta(minutes=rng.randint(0, 4000))
        messages.append(
            {
                "id": mid,
                "client_id": users["svc"].id,
                "idempotency_key": f"bulk-{n}",
                "request_fingerprint": "0" * 64,
                "response_json": {},
                "connection_id": conn.id,
                "message_type": "MedicationRequest",
                "content_type": "application/fhir+json",
                "patient_ref": f"Patient/{n}",
                "clinical_risk": "high",
                "status": "exception",
                "delivery_system": "urn:recon:idempotency:svc",
                "control_id": f"R{n:019d}",
                "created_at": created,
                "updated_at": created,
            }
        )
        items.append(
            {
                "message_id": mid,
                "connection_id": conn.id,
                "customer_id": conn.customer_id,
                "message_type": "MedicationRequest",
                "category": rng.choice(CATEGORIES),
                "state": rng.choice(
                    ["open"] * 6 + ["escalated", "resolved", "discarded", "pending_approval"]
                ),
                "version": 1,
                "detail": "bulk",
                "sla_started_at": created,
                "sla_due_at": created + timedelta(minutes=rng.choice([15, 30, 240])),
                "retry_count": 0,
                "needs_not_applied_confirmation": False,
                "created_at": created,
                "updated_at": created,
            }
        )
    with transaction(sessions) as s:
        s.execute(sa.insert(Message), messages)
        s.execute(sa.insert(ExceptionItem), items)


def test_bench_queue_pages(sessions, users, client, auth):
    _fill(sessions, users)
    page_ms: list[float] = []
    pages = 0
    with transaction(sessions, read_only=True) as s:
        cursor = None
        while True:
            t0 = time.perf_counter()
            view = queries.queue_page(s, "all", filters={}, cursor=cursor, limit=50)
            page_ms.append((time.perf_counter() - t0) * 1000)
            pages += 1
            cursor = view.next_cursor
            if cursor is None:
                break
    p95 = percentile(page_ms, 95)
    report(
        "queue_pages_query",
        {
            "backlog": BACKLOG,
            "pages": pages,
            "p50_ms": f"{percentile(page_ms, 50):.1f}",
            "p95_ms": f"{p95:.1f}",
            "last_page_ms": f"{page_ms[-1]:.1f}",
        },
        "p95 ≤ 50 ms per 50-row page at any depth (keyset, with the exact count)",
        p95 <= 50,
    )

    auth.login("rita")
    http_ms = []
    for queue in ["all", "ehr_rejected", "unknown_outcome", "escalated", "awaiting_approval"] * 4:
        t0 = time.perf_counter()
        r = client.get(f"/queues/{queue}")
        http_ms.append((time.perf_counter() - t0) * 1000)
        assert r.status_code == 200
    p95 = percentile(http_ms, 95)
    report(
        "queue_page_http",
        {"requests": len(http_ms), "p50_ms": f"{percentile(http_ms, 50):.1f}", "p95_ms": f"{p95:.1f}"},
        "p95 ≤ 300 ms for a rendered queue page",
        p95 <= 300,
    )
