"""Dashboard: exceptions by category × SLA status, per customer/connection, trends, circuits, throughput."""

from flask import current_app, render_template

from app.domain.roles import Permission
from app.services import liveness, queries

from ..access import requires
from ..extensions import unit_of_work
from . import bp
from .charts import bar_widths, line_chart


@bp.route("/")
@requires(Permission.CONSOLE_LOGIN)
def index():
    """The operations overview every console role lands on."""
    with unit_of_work(read_only=True) as s:
        board = queries.dashboard(s)
        running = queries.replays_running(s)
        handoffs = liveness.handoff_report(
            s, current_app.config["RECON_SETTINGS"].handoff_policy(), board.now
        )
    return render_template(
        "dashboard/index.html",
        board=board,
        running=running,
        handoffs=handoffs,
        handoff_labels=liveness.STAGE_LABELS,
        depth_chart=line_chart(board.depth_series, board.series_times),
        breach_chart=line_chart(board.breach_series, board.series_times),
        attempt_bars=bar_widths(board.attempts_24h),
        replay_bars=bar_widths(board.replays_24h),
        categories=queries.CATEGORIES,
        statuses=queries.SLA_STATUSES,
    )
