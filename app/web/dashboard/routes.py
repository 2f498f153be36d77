"""Dashboard: exceptions by category × SLA status, per customer/connection, trends, circuits, throughput."""

from flask import current_app, flash, redirect, render_template, request, url_for

from app.domain.roles import Permission
from app.services import drift, liveness, queries
from app.services.clock import utcnow

from ..access import current_actor, requires
from ..console import page_or_fragment
from ..extensions import unit_of_work
from ..queues.routes import LIVE_HEADER, keep_idle_clock
from . import bp
from .charts import bar_widths, line_chart


@bp.route("/")
@requires(Permission.CONSOLE_LOGIN)
def index():
    """The operations overview every console role lands on. htmx (the live refresh) gets the
    figures alone."""
    if request.headers.get(LIVE_HEADER) == "1":
        keep_idle_clock()
    with unit_of_work(read_only=True) as s:
        token = queries.change_token(s)
        board = queries.dashboard(s)
        running = queries.replays_running(s)
        handoffs = liveness.handoff_report(
            s, current_app.config["RECON_SETTINGS"].handoff_policy(), board.now
        )
        drift_flags = drift.open_flags(s, board.now, limit=5)
        drift_total = drift.open_flag_count(s)
        drift_recent = drift.recent_by_connection(s, board.now)
    return page_or_fragment(
        "dashboard/index.html",
        "dashboard/_board.html",
        token=token,
        board=board,
        running=running,
        handoffs=handoffs,
        handoff_labels=liveness.STAGE_LABELS,
        drift_flags=drift_flags,
        drift_total=drift_total,
        drift_recent=drift_recent,
        drift_labels=drift.KIND_LABELS,
        depth_chart=line_chart(board.depth_series, board.series_times),
        breach_chart=line_chart(board.breach_series, board.series_times),
        attempt_bars=bar_widths(board.attempts_24h),
        replay_bars=bar_widths(board.replays_24h),
        categories=queries.CATEGORIES,
        statuses=queries.SLA_STATUSES,
    )


@bp.route("/drift")
@requires(Permission.CONSOLE_LOGIN)
def drift_page():
    """Every unacknowledged new kind, and the counts per connection and kind."""
    with unit_of_work(read_only=True) as s:
        now = utcnow()
        flags = drift.open_flags(s, now, limit=500)
        recent = drift.recent_by_connection(s, now)
    return render_template(
        "dashboard/drift.html",
        now=now,
        drift_flags=flags,
        drift_recent=recent,
        drift_labels=drift.KIND_LABELS,
    )


@bp.route("/drift/<int:flag_id>/acknowledge", methods=["POST"])
@requires(Permission.DECIDE)
def acknowledge_drift(flag_id: int):
    """Someone has looked at a new kind of data on a connection: it stops being flagged (audited)."""
    with unit_of_work() as s:
        kind = drift.acknowledge(s, flag_id, current_actor().username, utcnow())
        found = kind is not None
    if not found:
        flash("That drift flag does not exist.", "error")
    else:
        flash("Drift acknowledged.", "success")
    back = url_for(".drift_page") if request.form.get("next") == "drift" else url_for(".index") + "#drift"
    return redirect(back, code=303)
