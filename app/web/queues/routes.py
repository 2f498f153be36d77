"""Queues: filtered, SLA-ordered, keyset-paginated work lists, and bulk actions on a fixed id list."""

from __future__ import annotations

import json
from dataclasses import dataclass

from flask import (
    abort,
    current_app,
    flash,
    make_response,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask_wtf import FlaskForm
from wtforms import (
    BooleanField,
    HiddenField,
    IntegerField,
    SelectField,
    SelectMultipleField,
    StringField,
    TextAreaField,
)
from wtforms.validators import AnyOf, Length, NumberRange, Optional
from wtforms.widgets import HiddenInput

from app.domain.errors import DomainError, Invalid, NotFound
from app.domain.roles import Permission
from app.domain.states import Action, DiscardReason
from app.services import exceptions, queries, queue_export, saved_views

from ..access import current_actor, requires
from ..console import check_selection, first_error, labelled, options, page_or_fragment, parse_selection_ref
from ..extensions import unit_of_work
from . import bp

MAX_BULK = 200
BULK_ACTIONS = (Action.ESCALATE, Action.DISCARD, Action.ASSIGN, Action.CLAIM, Action.RESUBMIT)


class QueueFilterForm(FlaskForm):
    """The GET filter bar. No CSRF: it changes nothing."""

    class Meta:
        csrf = False

    q = StringField("Search", validators=[Optional(), Length(max=200)])
    customer = SelectField("Customer", validators=[Optional()])
    connection = SelectField("Connection", validators=[Optional()])
    message_type = StringField("Message type", validators=[Optional(), Length(max=40)])
    state = SelectField("State", choices=labelled(queries.STATE_FILTERS), validators=[Optional()])
    category = SelectField("Category", choices=labelled(queries.CATEGORIES), validators=[Optional()])
    sla_status = SelectField("SLA", choices=labelled(queries.SLA_STATUSES), validators=[Optional()])
    assignee = SelectField("Assignee", validators=[Optional()])
    cursor = HiddenField(validators=[Optional(), Length(max=200)])
    limit = IntegerField(widget=HiddenInput(), validators=[Optional(), NumberRange(1, queries.MAX_PAGE)])

    def filters(self) -> dict:
        names = ("q", "customer", "connection", "message_type", "state", "category", "sla_status", "assignee")
        return {n: (getattr(self, n).data or "").strip() or None for n in names}


def _filter_form(session) -> QueueFilterForm:
    form = QueueFilterForm(formdata=request.args)
    form.customer.choices = labelled(queries.customer_names(session))
    form.connection.choices = labelled(queries.connection_names(session))
    form.assignee.choices = options(
        [("", "anyone"), (queries.UNASSIGNED, "unassigned")]
        + [(u.username, u.username) for u in queries.assignable_users(session)]
    )
    return form


@bp.route("/queues")
@requires(Permission.VIEW_QUEUES)
def index():
    """All active exceptions (the default queue)."""
    return _queue("all")


@bp.route("/queues/<queue>")
@requires(Permission.VIEW_QUEUES)
def show(queue: str):
    """One queue: a category, 'escalated', 'awaiting_approval' or 'all'. htmx gets only the rows."""
    if queue not in queries.QUEUES:
        abort(404, f"no queue named {queue!r}")
    return _queue(queue)


def _queue(queue: str):
    status, error = 200, None
    actor = current_actor()
    if request.headers.get(LIVE_HEADER) == "1":
        keep_idle_clock()
    with unit_of_work(read_only=True) as s:
        form = _filter_form(s)
        users = queries.assignable_users(s)
        counts = queries.queue_counts(s)
        token = queries.change_token(s)
        views = saved_views.visible_views(s, actor)
        view = queries.QueueView(queue, [], None, 0)
        if form.validate():
            try:
                view = queries.queue_page(
                    s,
                    queue,
                    filters=form.filters(),
                    cursor=form.cursor.data or None,
                    limit=form.limit.data or queries.DEFAULT_PAGE,
                )
                view.reasons = queries.failure_reasons(s, view.items, actor.role)
            except Invalid as exc:
                status, error = 422, exc.message
        else:
            status, error = 422, first_error(form)
    return page_or_fragment(
        "queues/index.html",
        "queues/_rows.html",
        status,
        queue=queue,
        queues=queries.QUEUES,
        counts=counts,
        form=form,
        view=view,
        error=error,
        users=users,
        token=token,
        saved=views,
        filter_query=saved_views.filter_query(request.args),
        bulk_form=BulkForm(formdata=None),
        bulk_actions=BULK_ACTIONS,
        discard_reasons=list(DiscardReason),
    )


LIVE_HEADER = "X-Recon-Live"  # sent by console's live refreshes (app/static/live.js)


def keep_idle_clock() -> None:
    """A page polling by itself is not a person at work: put back the session's last-activity
    time the access check just moved, so the idle timeout (docs/SECURITY.md) still ends a session
    left open on a live page. The cookie as the browser sent it holds that time."""
    sent = current_app.session_interface.open_session(current_app, request)
    seen_at = sent.get("seen_at") if sent is not None else None
    if isinstance(seen_at, int | float) and session.get("seen_at") != seen_at:
        session["seen_at"] = seen_at


@bp.route("/queues/changes")
@requires(Permission.VIEW_QUEUES)
def changes():
    """The live pages' poll: 204 while nothing changed since `since`; else 200 with the new token
    in an HX-Trigger event (console.js then refreshes what it shows) and, with `counts=1`, the
    sidebar's counts swapped in out of band."""
    keep_idle_clock()
    since = request.args.get("since", "")[:40]
    with unit_of_work(read_only=True) as s:
        token = queries.change_token(s)
        if token == since:
            return "", 204
        counts = queries.queue_counts(s) if request.args.get("counts") == "1" else None
        source = queries.count_source(s)
    rows_changed = token.split(".")[0] != since.split(".")[0]
    body = ""
    if counts is not None:
        queue = request.args.get("queue", "")
        body = render_template(
            "queues/_counts.html", queues=queries.QUEUES, counts=counts, queue=queue, source=source, oob=True
        )
    response = make_response(body, 200)
    response.headers["HX-Trigger"] = json.dumps({"recon:changed": {"token": token, "rows": rows_changed}})
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.route("/queues/<queue>/export.csv")
@requires(Permission.VIEW_QUEUES)
def export(queue: str):
    """The current view as CSV: masked per role, every cell neutralised, bounded, audited."""
    if queue not in queries.QUEUES:
        abort(404, f"no queue named {queue!r}")
    actor = current_actor()
    with unit_of_work() as s:
        form = _filter_form(s)
        if not form.validate():
            abort(422, first_error(form))
        try:
            text, _rows, truncated = queue_export.export_csv(s, actor, queue, form.filters())
        except Invalid as exc:
            abort(422, exc.message)
    response = make_response(text)
    response.headers["Content-Type"] = "text/csv; charset=utf-8"
    response.headers["Content-Disposition"] = f'attachment; filename="queue-{queue}.csv"'
    response.headers["Cache-Control"] = "no-store"
    if truncated:
        response.headers["X-Recon-Truncated"] = str(queue_export.MAX_EXPORT_ROWS)
    return response


# --- saved views ----------------------------------------------------------------------------------


class SavedViewForm(FlaskForm):
    name = StringField("View name", validators=[Length(min=1, max=saved_views.MAX_NAME)])
    queue = HiddenField(validators=[AnyOf(list(queries.QUEUES))])
    query = HiddenField(validators=[Optional(), Length(max=saved_views.MAX_QUERY)])
    shared = BooleanField("Share with everyone")


@bp.route("/queues/views", methods=["POST"])
@requires(Permission.VIEW_QUEUES)
def save_view():
    """Save the current filters under a name (personal, or shared)."""
    form = SavedViewForm()
    queue = form.queue.data if form.queue.data in queries.QUEUES else "all"
    query = saved_views.filter_query(form.query.data or "")
    back = url_for(".show", queue=queue) + (f"?{query}" if query else "")
    if not form.validate():
        flash(f"View not saved. {first_error(form)}", "error")
        return redirect(back, code=303)
    try:
        with unit_of_work() as s:
            view = saved_views.save_view(
                s, current_actor(), form.name.data, queue, form.query.data or "", form.shared.data
            )
            name = view.name
    except DomainError as exc:
        flash(f"View not saved: {exc.message}", "error")
        return redirect(back, code=303)
    flash(f"Saved view “{name}”{' (shared)' if form.shared.data else ''}.", "success")
    return redirect(back, code=303)


@bp.route("/queues/views/<int:view_id>/delete", methods=["POST"])
@requires(Permission.VIEW_QUEUES)
def delete_view(view_id: int):
    """Its owner deletes a saved view."""
    try:
        with unit_of_work() as s:
            saved_views.delete_view(s, current_actor(), view_id)
    except DomainError as exc:
        flash(f"View not deleted: {exc.message}", "error")
        return redirect(url_for(".index"), code=303)
    flash("Saved view deleted.", "success")
    return redirect(url_for(".index"), code=303)


# --- bulk actions ---------------------------------------------------------------------------------


class BulkForm(FlaskForm):
    ids = SelectMultipleField("Selected exceptions", validate_choice=False)
    action = SelectField("Action", choices=labelled([a.value for a in BULK_ACTIONS], None))
    reason = TextAreaField("Reason", validators=[Optional(), Length(max=2000)])
    reason_code = SelectField(
        "Discard reason code",
        choices=labelled([r.value for r in DiscardReason], "—"),
        validators=[Optional()],
    )
    assignee = StringField("Assignee", validators=[Optional(), Length(max=80)])
    confirm = HiddenField(validators=[Optional(), AnyOf(["", "1"])])
    back = HiddenField(validators=[Optional(), Length(max=2000)])

    def validate_ids(self, field):
        check_selection(field.data, MAX_BULK, f"select at most {MAX_BULK} exceptions at a time")

    def refs(self) -> list[tuple[int, int | None]]:
        return [parse_selection_ref(v) for v in self.ids.data]

    def back_url(self) -> str:
        back = self.back.data or ""
        # Only ever link back into the queues (no open redirect through a form field).
        return back if back.startswith("/queues") else "/queues"


@dataclass
class BulkResult:
    exception_id: int
    ok: bool
    status: int  # 200 applied, else the DomainError's HTTP status
    message: str
    state: str | None = None


@bp.route("/queues/bulk", methods=["POST"])
@requires(Permission.DECIDE)
def bulk():
    """Bulk action on a fixed list of ids: first a confirmation page with the exact count, then
    each item goes through `decide` in its own unit of work (one conflict does not undo the rest)."""
    form = BulkForm()
    if not form.validate():
        return render_template("queues/bulk.html", form=form, stage="invalid", error=first_error(form)), 422
    refs = form.refs()
    if form.confirm.data != "1":
        with unit_of_work(read_only=True) as s:
            found = {i.id: i for i in queries.items_by_ids(s, [i for i, _ in refs])}
        return render_template("queues/bulk.html", form=form, stage="confirm", refs=refs, found=found)
    actor = current_actor()
    results = []
    for exception_id, version in refs:
        data = exceptions.DecisionInput(
            action=form.action.data,
            reason=form.reason.data or "",
            reason_code=(form.reason_code.data or None) if form.action.data == Action.DISCARD else None,
            assignee=form.assignee.data or None,
            expected_version=version,
        )
        try:
            with unit_of_work() as s:
                decision = exceptions.decide(s, exception_id, actor, data)
            results.append(BulkResult(exception_id, True, 200, "applied", decision.to_state))
        except NotFound as exc:
            results.append(BulkResult(exception_id, False, 404, exc.message))
        except DomainError as exc:
            results.append(BulkResult(exception_id, False, exc.http_status, exc.message))
    return render_template("queues/bulk.html", form=form, stage="done", refs=refs, results=results)
