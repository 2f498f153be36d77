"""Approvals (four-eyes replay approval for clinical leads) and replay progress."""

from __future__ import annotations

from flask import flash, redirect, render_template, url_for
from flask_wtf import FlaskForm
from wtforms import HiddenField, IntegerField, PasswordField, TextAreaField
from wtforms.validators import AnyOf, DataRequired, Length, Optional
from wtforms.widgets import HiddenInput

from app.domain.errors import DomainError
from app.domain.payload_diff import review
from app.domain.roles import Permission
from app.services import exceptions, queries

from ..access import can, current_actor, requires
from ..console import first_error, page_or_fragment, stop_polling
from ..extensions import htmx, unit_of_work
from . import bp


class ApprovalForm(FlaskForm):
    action = HiddenField(validators=[DataRequired(), AnyOf(["approve", "reject"])])
    expected_version = IntegerField(widget=HiddenInput(), validators=[Optional()])
    password = PasswordField("Re-enter your password", validators=[Optional(), Length(max=200)])
    reason = TextAreaField("Reason", validators=[Optional(), Length(max=2000)])


def _render_index(*, status: int = 200, error: str | None = None, error_for: int | None = None):
    actor = current_actor()
    # Values are payload content; a role without payload access would see the changed paths only.
    show_values = can(Permission.VIEW_PAYLOAD)
    with unit_of_work() as s:
        pending = queries.pending_approvals(s)
        reviews = {}
        for p in pending:
            if p.replay.corrected and p.original is not None:
                if show_values:
                    # The change list shows payload content: an audited PHI view, like the viewer.
                    exceptions.view_payload(
                        s, p.item, actor, channel="console-approvals", payload_version_id=p.proposed.id
                    )
                reviews[p.replay.id] = review(
                    p.item.message.content_type, p.original.text or "", p.proposed.text or ""
                )
    return (
        render_template(
            "approvals/index.html",
            pending=pending,
            reviews=reviews,
            show_values=show_values,
            error=error,
            error_for=error_for,
        ),
        status,
    )


@bp.route("/approvals")
@requires(Permission.APPROVE)
def index():
    """Replays waiting for a clinical lead; a corrected payload shows its changed fields first."""
    return _render_index()


@bp.route("/approvals/<int:exception_id>", methods=["POST"])
@requires(Permission.APPROVE)
def decide(exception_id: int):
    """Approve (password re-entry; never your own request) or reject (reason) through `decide`."""
    form = ApprovalForm()
    if not form.validate():
        return _render_index(status=422, error=first_error(form), error_for=exception_id)
    data = exceptions.DecisionInput(
        action=form.action.data,
        reason=form.reason.data or "",
        password=form.password.data or None,
        expected_version=form.expected_version.data,
    )
    try:
        with unit_of_work() as s:
            exceptions.decide(s, exception_id, current_actor(), data)
    except DomainError as exc:
        return _render_index(status=exc.http_status, error=exc.message, error_for=exception_id)
    if form.action.data == "approve":
        flash(f"Replay of exception #{exception_id} approved; a worker will deliver it.", "success")
    else:
        flash(f"Replay of exception #{exception_id} rejected; it is back in its queue.", "success")
    return redirect(url_for(".index"), code=303)


@bp.route("/replays")
@requires(Permission.VIEW_QUEUES)
def replays():
    """Replay progress. The htmx widget polls while replays run and is told to stop (286) after."""
    with unit_of_work(read_only=True) as s:
        rows = queries.replay_list(s)
        counts = queries.replay_state_counts(s)
        running = queries.replays_running(s)
    context = dict(rows=rows, counts=counts, running=running)
    if htmx and not running:
        return stop_polling(render_template("approvals/_replays.html", **context))
    return page_or_fragment("approvals/replays.html", "approvals/_replays.html", **context)
