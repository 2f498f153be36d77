"""Bulk exception history for plan tests and the 1M benchmark: PostgreSQL INSERT … SELECT over
generate_series, satisfying the real schema (foreign keys, NOT NULLs, the migrated indexes).

Shape: `resolved_fraction` of the items are history (resolved, some discarded) spread over 60 days;
the rest are active (open, escalated, awaiting approval, retrying, replaying) created in the last 8
hours, so SLA statuses are mixed. Rows are interleaved by a hash of their number: active items sit
among the history in the heap, the pessimistic case for anything reading them. One message and
one attempt per item.
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa

CATEGORIES = (
    "transport",
    "ehr_unavailable",
    "ehr_rejected",
    "unknown_outcome",
    "malformed_response",
    "data_shape",
    "code_set",
    "duplicate_suspected",
    "auth",
    "config",
)


def setup_scopes(
    conn: sa.Connection, customers: int, connections_per_customer: int, now: datetime
) -> list[int]:
    """Customers `bulk-customer-NN` with connections `bulk-NN-M`; returns the connection ids."""
    ids = []
    for c in range(customers):
        customer_id = conn.execute(
            sa.text("INSERT INTO customers (name, created_at) VALUES (:n, :t) RETURNING id"),
            {"n": f"bulk-customer-{c:02d}", "t": now},
        ).scalar_one()
        for k in range(connections_per_customer):
            ids.append(
                conn.execute(
                    sa.text(
                        "INSERT INTO connections (name, customer_id, vendor, environment, protocol, endpoint,"
                        " fhir_version, diagnosis_code_system, supports_conditional_create,"
                        " supports_identifier_search, connect_timeout, read_timeout, enabled,"
                        " enabled_message_types, max_auto_retries, retry_backoff_seconds,"
                        " circuit_failure_threshold, circuit_cooldown_seconds, consecutive_failures, created_at)"
                        " VALUES (:n, :c, 'epic', 'prod', 'fhir-r4', 'http://127.0.0.1:9/fhir', '4.0.1', 'icd-10',"
                        " true, true, 5, 30, true, '[]', 3, 30, 5, 60, 0, :t) RETURNING id"
                    ),
                    {"n": f"bulk-{c:02d}-{k}", "c": customer_id, "t": now},
                ).scalar_one()
            )
    return ids


def fill(
    conn: sa.Connection,
    *,
    total: int,
    resolved_fraction: float,
    client_id: int,
    assignee_ids: list[int],
    connection_ids: list[int],
    now: datetime,
    chunk: int = 250_000,
) -> None:
    """Insert `total` messages, exceptions and attempts (in chunks, each one INSERT … SELECT)."""
    history_per_mille = round(resolved_fraction * 1000)
    params = {
        "client": client_id,
        "now": now,
        "conns": connection_ids,
        "users": assignee_ids or [None],
        "hist": history_per_mille,
        "cats": list(CATEGORIES),
    }
    # r: a well-mixed number per item; r < hist: history. s picks the active state / category.
    gen = """
        WITH g AS (
            SELECT n,
                   (n::bigint * 2654435761) % 1000 AS r,
                   (n::bigint * 40503) % 997 AS s,
                   md5('recon-bulk-' || n)::uuid::text AS mid
            FROM generate_series(CAST(:lo AS integer), CAST(:hi AS integer)) AS n
        ), item AS (
            SELECT n, mid, r, s,
                   (CAST(:conns AS integer[]))[1 + n % cardinality(CAST(:conns AS integer[]))] AS connection_id,
                   CASE WHEN r < :hist THEN
                        CASE WHEN s % 10 = 0 THEN 'discarded' ELSE 'resolved' END
                   ELSE CASE WHEN s % 100 < 60 THEN 'open' WHEN s % 100 < 80 THEN 'escalated'
                             WHEN s % 100 < 88 THEN 'pending_approval' WHEN s % 100 < 95 THEN 'retrying'
                             ELSE 'replaying' END
                   END AS state,
                   CASE WHEN r < :hist
                        THEN CAST(:now AS timestamp) - (480 + (n::bigint * 7919 % 86400)::int) * interval '1 minute'
                        ELSE CAST(:now AS timestamp) - ((n::bigint * 104729 % 28800)::int) * interval '1 second'
                   END AS created_at,
                   (CAST(:cats AS text[]))[1 + s % 10] AS category,
                   CASE WHEN s % 3 = 0 THEN 15 WHEN s % 3 = 1 THEN 30 ELSE 240 END AS window_min
            FROM g
        )
    """
    lo = 1
    while lo <= total:
        hi = min(total, lo + chunk - 1)
        bounds = {**params, "lo": lo, "hi": hi}
        conn.execute(
            sa.text(
                gen
                + """
            INSERT INTO messages (id, client_id, idempotency_key, request_fingerprint, response_json,
                connection_id, message_type, content_type, patient_ref, clinical_risk, status,
                delivery_system, control_id, current_payload_id, created_at, updated_at)
            SELECT mid, :client, 'bulk-' || n, repeat('0', 64), '{}', connection_id,
                'MedicationRequest', 'application/fhir+json', 'Patient/' || n,
                CASE WHEN s % 3 = 0 THEN 'high' ELSE 'normal' END,
                CASE WHEN state = 'resolved' THEN 'delivered' WHEN state = 'discarded' THEN 'discarded'
                     ELSE 'exception' END,
                'urn:recon:idempotency:svc', 'B' || lpad(n::text, 19, '0'), NULL, created_at, created_at
            FROM item
            """
            ),
            bounds,
        )
        conn.execute(
            sa.text(
                gen
                + """
            INSERT INTO exceptions (message_id, connection_id, customer_id, message_type, category, state,
                version, detail, sla_started_at, sla_due_at, assignee_id, needs_not_applied_confirmation,
                retry_count, next_retry_at, created_at, updated_at, resolved_at)
            SELECT mid, connection_id, (SELECT c.customer_id FROM connections c WHERE c.id = connection_id), 'MedicationRequest', category, state, 1, 'bulk',
                created_at, created_at + (window_min) * interval '1 minute',
                CASE WHEN s % 3 = 0 THEN NULL
                     ELSE (CAST(:users AS integer[]))[1 + s % cardinality(CAST(:users AS integer[]))] END,
                false, CASE WHEN state = 'retrying' THEN 1 ELSE 0 END,
                CASE WHEN state = 'retrying' THEN created_at + (5 + s % 600) * interval '1 minute' END,
                created_at, created_at,
                CASE WHEN state IN ('resolved', 'discarded') THEN created_at + interval '1 hour' END
            FROM item
            """
            ),
            bounds,
        )
        conn.execute(
            sa.text(
                gen
                + """
            INSERT INTO attempts (message_id, trigger, started_at, finished_at, request_summary, status_code,
                response_excerpt, outcome, category, detail, issues, latency_ms)
            SELECT mid, 'intake', created_at, created_at + interval '1 second', 'POST MedicationRequest',
                CASE WHEN state = 'resolved' THEN 201 ELSE 422 END, '',
                CASE WHEN state = 'resolved' THEN 'delivered' ELSE 'rejected' END,
                CASE WHEN state = 'resolved' THEN NULL ELSE category END, '', '[]', 120
            FROM item
            """
            ),
            bounds,
        )
        lo = hi + 1
