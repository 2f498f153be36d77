"""Queues: filtered, SLA-ordered, keyset-paginated work lists, and bulk actions on a fixed id list."""

from __future__ import annotations

from dataclasses import dataclass

from flask import abort, render_template, request
from flask_wtf import FlaskForm
from wtforms import HiddenField, IntegerField, SelectField, SelectMultipleField, StringField, TextAreaField
from wtforms.validators import AnyOf, Length, NumberRange, Optional, ValidationError
from wtforms.widgets import HiddenInput

from app.domain.errors import DomainError, Invalid, NotFound
from app.domain.roles import Permission
from app.domain.states import Action, DiscardReason
from app.services import exceptions, queries

from ..access import current_actor, requires
from ..console import first_error, labelled, options, page_or_fragment
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
    state = SelectField("State", choices=labelled(queries.ALL_STATES), validators=[Optional()])
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
    with unit_of_work(read_only=True) as s:
        form = _filter_form(s)
        users = queries.assignable_users(s)
        counts = queries.queue_counts(s)
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
        bulk_form=BulkForm(formdata=None),
        bulk_actions=BULK_ACTIONS,
        discard_reasons=list(DiscardReason),
    )


# --- bulk actions ---------------------------------------------------------------------------------


def _parse_ref(value: str) -> tuple[int, int | None]:
    """'123:4' -> (123, 4): the id and the version the list showed; '123' -> (123, None)."""
    ident, _, version = value.partition(":")
    return int(ident), int(version) if version else None


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
        if not field.data:
            raise ValidationError("select at least one exception")
        if len(field.data) > MAX_BULK:
            raise ValidationError(f"select at most {MAX_BULK} exceptions at a time")
        try:
            refs = [_parse_ref(v) for v in field.data]
        except ValueError:
            raise ValidationError("malformed selection") from None
        if len({i for i, _ in refs}) != len(refs):
            raise ValidationError("an exception is selected twice")

    def refs(self) -> list[tuple[int, int | None]]:
        return [_parse_ref(v) for v in self.ids.data]

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
