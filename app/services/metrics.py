"""Prometheus text exposition of the queue and delivery state (SPEC 7), read from the database
so every web process reports the same numbers."""

from __future__ import annotations

import sqlalchemy as sa
import sqlalchemy.orm as so

from app.db.models import Attempt, Connection, ExceptionItem, Replay
from app.domain.delivery import Category
from app.domain.liveness import HandoffPolicy
from app.domain.states import FINAL_STATES

from . import drift
from .clock import utcnow
from .connections import circuit_state
from .liveness import handoff_report

LATENCY_BUCKETS_MS = (50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000)


def _label(value) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


def render_metrics(session: so.Session, policy: HandoffPolicy | None = None) -> str:
    now = utcnow()
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")

    active = ExceptionItem.state.notin_([s.value for s in FINAL_STATES])
    family("recon_queue_depth", "gauge", "Exceptions not yet resolved or discarded, by category and state.")
    for category, state, n in session.execute(
        sa.select(ExceptionItem.category, ExceptionItem.state, sa.func.count())
        .where(active)
        .group_by(ExceptionItem.category, ExceptionItem.state)
    ):
        lines.append(f'recon_queue_depth{{category="{_label(category)}",state="{_label(state)}"}} {n}')

    family("recon_sla_breached", "gauge", "Open exceptions past their SLA due time, by category.")
    for category, n in session.execute(
        sa.select(ExceptionItem.category, sa.func.count())
        .where(active, ExceptionItem.sla_due_at <= now)
        .group_by(ExceptionItem.category)
    ):
        lines.append(f'recon_sla_breached{{category="{_label(category)}"}} {n}')

    family("recon_attempts_total", "counter", "Delivery attempts by trigger kind and outcome.")
    kind = sa.case(
        (Attempt.trigger.like("replay:%"), "replay"),
        (Attempt.trigger.like("auto_retry:%"), "retry"),
        else_="intake",
    )
    for trig, outcome, n in session.execute(
        sa.select(kind, Attempt.outcome, sa.func.count()).group_by(kind, Attempt.outcome)
    ):
        lines.append(f'recon_attempts_total{{trigger="{trig}",outcome="{_label(outcome)}"}} {n}')

    family("recon_replays_total", "counter", "Replays by state.")
    for state, n in session.execute(sa.select(Replay.state, sa.func.count()).group_by(Replay.state)):
        lines.append(f'recon_replays_total{{state="{_label(state)}"}} {n}')

    family("recon_attempt_latency_ms", "histogram", "Latency of finished delivery attempts in milliseconds.")
    cases = [sa.func.sum(sa.case((Attempt.latency_ms <= b, 1), else_=0)) for b in LATENCY_BUCKETS_MS]
    row = session.execute(
        sa.select(*cases, sa.func.count(), sa.func.coalesce(sa.func.sum(Attempt.latency_ms), 0)).where(
            Attempt.finished_at.is_not(None)
        )
    ).one()
    for bound, value in zip(LATENCY_BUCKETS_MS, row[: len(LATENCY_BUCKETS_MS)], strict=True):
        lines.append(f'recon_attempt_latency_ms_bucket{{le="{bound}"}} {value or 0}')
    lines.append(f'recon_attempt_latency_ms_bucket{{le="+Inf"}} {row[-2]}')
    lines.append(f"recon_attempt_latency_ms_sum {row[-1]}")
    lines.append(f"recon_attempt_latency_ms_count {row[-2]}")

    family("recon_circuit_open", "gauge", "1 when a connection's circuit breaker is open (0.5 half-open).")
    for conn in session.scalars(sa.select(Connection).order_by(Connection.name)):
        value = {"closed": 0, "half_open": 0.5, "open": 1}[circuit_state(conn, now)]
        lines.append(f'recon_circuit_open{{connection="{_label(conn.name)}"}} {value}')

    family("recon_data_shape_exceptions", "gauge", "data_shape exceptions by connection and kind.")
    kind_expr = sa.func.substr(ExceptionItem.detail, 1, 7)
    shape_counts: dict[tuple[str, str], int] = {}
    for name, prefix, n in session.execute(
        sa.select(Connection.name, kind_expr, sa.func.count())
        .join(Connection, Connection.id == ExceptionItem.connection_id)
        .where(ExceptionItem.category == Category.DATA_SHAPE.value)
        .group_by(Connection.name, kind_expr)
    ):
        head = (prefix or "").split(":")[0]
        kind_name = head if head in ("decode", "parse", "shape", "mojibake") else "validation"
        shape_counts[(name, kind_name)] = shape_counts.get((name, kind_name), 0) + n
    for (name, kind_name), n in sorted(shape_counts.items()):
        lines.append(f'recon_data_shape_exceptions{{connection="{_label(name)}",kind="{kind_name}"}} {n}')

    family(
        "recon_drift_observations_total",
        "counter",
        "Messages showing a kind of data-shape drift (decode fallback, mojibake, Z-segment, ...) per connection.",
    )
    for name, kind_name, n in drift.counts_by_connection(session):
        lines.append(f'recon_drift_observations_total{{connection="{_label(name)}",kind="{kind_name}"}} {n}')
    family(
        "recon_drift_unacknowledged",
        "gauge",
        "1 per kind first seen on a connection and not yet acknowledged.",
    )
    for flag in drift.open_flags(session, now, limit=1000):
        lines.append(
            f'recon_drift_unacknowledged{{connection="{_label(flag.connection)}",kind="{flag.kind}"}} 1'
        )

    report = handoff_report(session, policy or HandoffPolicy(), now)
    family(
        "recon_handoff_bound_seconds",
        "gauge",
        "The longest ready work should wait for a claim, a human queue or a terminal state.",
    )
    lines.append(f"recon_handoff_bound_seconds {report.bound_seconds:g}")
    family("recon_handoff_waiting", "gauge", "Ready work waiting at a hand-off, by stage.")
    for stage, age in report.stages.items():
        lines.append(f'recon_handoff_waiting{{stage="{stage}"}} {age.waiting}')
    family("recon_handoff_oldest_age_seconds", "gauge", "Age of the oldest work waiting at each hand-off.")
    for stage, age in report.stages.items():
        lines.append(f'recon_handoff_oldest_age_seconds{{stage="{stage}"}} {age.oldest_seconds:.1f}')
    family("recon_handoff_stalled", "gauge", "Work waiting at a hand-off for longer than the bound.")
    for stage, age in report.stages.items():
        lines.append(f'recon_handoff_stalled{{stage="{stage}"}} {age.stalled}')
    return "\n".join(lines) + "\n"
