"""Approvals as a work queue (four-eyes replay approval for clinical leads) and replay progress.

The list reads no payload and records no PHI view; an item's review panel is loaded on demand
(htmx GET of a fragment, or the full page at the same link without JavaScript) and records the
PHI view of the proposed payload then. A decision answers in the panel: the next item's review
after success, the same item with the message (and the typed text) after a refusal.
"""

from __future__ import annotations

from flask import flash, redirect, render_template, request, url_for
from flask_wtf import FlaskForm
from wtforms import HiddenField, IntegerField, PasswordField, TextAreaField
from wtforms.validators import AnyOf, DataRequired, Length, Optional
from wtforms.widgets import HiddenInput

from app.domain.errors import Conflict, DomainError
from app.domain.payload_diff import review as diff_review
from app.domain.roles import Permission
from app.services import approvals, exceptions, queries
from app.services.approvals import ApprovalFilters

from ..access import can, current_actor, requires
from ..console import first_error, page_or_fragment, stop_polling
from ..extensions import htmx, unit_of_work
from . import bp


class ApprovalForm(FlaskForm):
    action = HiddenField(validators=[DataRequired(), AnyOf(["approve", "reject"])])
    expected_version = IntegerField(widget=HiddenInput(), validators=[Optional()])
    password = PasswordField("Re-enter your password", validators=[Optional(), Length(max=200)])
    reason = TextAreaField("Reason", validators=[Optional(), Length(max=2000)])


@bp.app_template_filter("decided")
def decided(decision) -> str:
    """'approved by leo at 10:42 UTC': who made a decision and when (a 409 names them)."""
    return approvals.decided_by(decision) or ""


def _panel(s, exception_id: int | None) -> dict:
    """Template variables of one review panel. Showing a corrected payload's values records the
    PHI view (once per panel load; de-duplicated by the PHI service)."""
    if exception_id is None:
        return {"review": None}
    actor = current_actor()
    r = approvals.review(s, exception_id, actor)
    # Values are payload content; a role without payload access sees the changed paths only.
    show_values = can(Permission.VIEW_PAYLOAD)
    changes = None
    if r.replay is not None and r.replay.corrected and r.original is not None:
        if show_values:
            exceptions.view_payload(
                s, r.item, actor, channel="console-approvals", payload_version_id=r.proposed.id
            )
        changes = diff_review(r.item.message.content_type, r.original.text or "", r.proposed.text or "")
    return {
        "review": r,
        "changes": changes,
        "show_values": show_values,
        "decided": approvals.decided_by(r.last_decision),
    }


def _render(
    template: str,
    filters: ApprovalFilters,
    exception_id: int | None,
    *,
    status: int = 200,
    with_list: bool = True,
    **extra,
):
    with unit_of_work() as s:
        queue = approvals.approval_queue(s, filters) if with_list else None
        panel = _panel(s, exception_id)
    return (
        render_template(template, queue=queue, filters=filters, current=exception_id, **panel, **extra),
        status,
    )


@bp.route("/approvals")
@requires(Permission.APPROVE)
def index():
    """The queue of replays waiting for a clinical lead: filter and sort in the query string."""
    filters = ApprovalFilters.from_args(request.args)
    if htmx and not htmx.boosted and not htmx.history_restore_request:
        return _render("approvals/_list.html", filters, None)
    return _render("approvals/index.html", filters, None)


@bp.route("/approvals/<int:exception_id>")
@requires(Permission.APPROVE)
def review(exception_id: int):
    """One item's review panel (htmx), or the queue page with it open (a link, no JavaScript)."""
    filters = ApprovalFilters.from_args(request.args)
    if htmx and not htmx.boosted and not htmx.history_restore_request:
        return _render("approvals/_panel.html", filters, exception_id, with_list=False)
    return _render("approvals/index.html", filters, exception_id)


def _refusal(exc: DomainError, form: ApprovalForm) -> str:
    if exc.code == "password_required":
        if form.password.data:
            return "Wrong password. Re-enter your own login password to approve."
        return "Approval needs your password: re-enter it to approve."
    return exc.message


@bp.route("/approvals/<int:exception_id>", methods=["POST"])
@requires(Permission.APPROVE)
def decide(exception_id: int):
    """Approve (password re-entry; never your own request) or reject (reason) through `decide`;
    then the next item of the same view."""
    filters = ApprovalFilters.from_args(request.args)
    form = ApprovalForm()
    template = "approvals/_panel.html" if htmx else "approvals/index.html"
    if not form.validate():
        return _render(template, filters, exception_id, status=422, error=first_error(form))
    with unit_of_work(read_only=True) as s:
        before = approvals.approval_queue(s, filters).ids
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
        message, conflict = _refusal(exc, form), isinstance(exc, Conflict)
        return _render(
            template, filters, exception_id, status=exc.http_status, error=message, conflict=conflict
        )
    if form.action.data == "approve":
        done = f"Replay of exception #{exception_id} approved; a worker will deliver it."
    else:
        done = f"Replay of exception #{exception_id} rejected; it is back in its queue."
    with unit_of_work(read_only=True) as s:
        after = approvals.approval_queue(s, filters).ids
    following = approvals.next_item(before, after, exception_id)
    if htmx:
        # The next item's panel, and the list without the decided item (out of band).
        return _render("approvals/_decided.html", filters, following, done=done, decided_id=exception_id)
    flash(done, "success")
    if following is None:
        return redirect(url_for(".index", **filters.as_args()), code=303)
    return redirect(url_for(".review", exception_id=following, **filters.as_args()), code=303)


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
