"""Bulk replays: parse the form, call one service, render (app/services/bulk_replay.py)."""

from __future__ import annotations

from flask import flash, redirect, render_template, url_for
from flask_wtf import FlaskForm
from wtforms import DecimalField, HiddenField, IntegerField, PasswordField, SelectMultipleField, TextAreaField
from wtforms.validators import Length, NumberRange, Optional
from wtforms.widgets import HiddenInput

from app.domain.bulk_replay import DEFAULT_PACE, MAX_ITEMS, Pace, available_batch_actions
from app.domain.errors import DomainError
from app.domain.roles import Permission
from app.services import bulk_replay, queries

from ..access import current_actor, requires
from ..console import check_selection, first_error, page_or_fragment, parse_selection_ref, stop_polling
from ..extensions import htmx, unit_of_work
from . import bp


class RequestForm(FlaskForm):
    """The fixed list (from a queue's selection), a reason and the pace."""

    ids = SelectMultipleField("Selected exceptions", validate_choice=False)
    reason = TextAreaField("Reason", validators=[Optional(), Length(max=2000)])
    pace_count = IntegerField(
        "Items per interval, per connection",
        default=DEFAULT_PACE.count,
        validators=[Optional(), NumberRange(1, Pace.MAX_COUNT)],
    )
    pace_seconds = DecimalField(
        "Interval (seconds)",
        default=DEFAULT_PACE.per_seconds,
        places=None,
        validators=[Optional(), NumberRange(Pace.MIN_SECONDS, Pace.MAX_SECONDS)],
    )
    back = HiddenField(validators=[Optional(), Length(max=2000)])

    def validate_ids(self, field):
        check_selection(field.data, MAX_ITEMS, f"a bulk replay holds at most {MAX_ITEMS} exceptions")

    def refs(self) -> list[tuple[int, int | None]]:
        return [parse_selection_ref(v) for v in self.ids.data]

    def pace(self) -> Pace:
        return Pace(
            count=self.pace_count.data or DEFAULT_PACE.count,
            per_seconds=float(self.pace_seconds.data or DEFAULT_PACE.per_seconds),
        )

    def back_url(self) -> str:
        back = self.back.data or ""
        return back if back.startswith("/queues") else url_for("queues.index")


class DecisionForm(FlaskForm):
    reason = TextAreaField("Reason", validators=[Optional(), Length(max=2000)])
    password = PasswordField("Re-enter your password", validators=[Optional(), Length(max=200)])
    expected_version = IntegerField(widget=HiddenInput(), validators=[Optional()])


ACTIONS = ("approve", "reject", "pause", "resume", "cancel")
DONE = {
    "approve": "approved: its items are released at the batch's pace",
    "reject": "rejected: its exceptions are back in their queues",
    "pause": "paused: nothing more is released until it is resumed",
    "resume": "resumed",
    "cancel": "cancelled: every item not yet released is back in its queue",
}


@bp.route("/bulk-replays")
@requires(Permission.VIEW_QUEUES)
def index():
    """Every bulk replay, newest first, with its progress."""
    with unit_of_work(read_only=True) as s:
        batches = bulk_replay.list_batches(s)
        progress = bulk_replay.progress_many(s, [b.id for b in batches])
    return render_template("bulk_replays/index.html", batches=batches, progress=progress)


@bp.route("/bulk-replays/new", methods=["POST"])
@requires(Permission.DECIDE)
def new():
    """From a queue's selection: the exact list, each item's state, a reason and the pace."""
    form = RequestForm()
    if not form.validate():
        return _render_new(form, [], first_error(form), 422)
    refs = form.refs()
    return _render_new(form, refs)


def _render_new(form: RequestForm, refs, error: str | None = None, status: int = 200):
    found, refused = {}, {}
    if refs:
        with unit_of_work(read_only=True) as s:
            found = {i.id: i for i in queries.items_by_ids(s, [i for i, _ in refs])}
            refused = bulk_replay.why_not_replayable(current_actor(), refs, found)
    return (
        render_template(
            "bulk_replays/new.html", form=form, error=error, refs=refs, found=found, refused=refused
        ),
        status,
    )


@bp.route("/bulk-replays", methods=["POST"])
@requires(Permission.DECIDE)
def create():
    """Request the replay of exactly this list; a clinical lead approves it once."""
    form = RequestForm()
    status, error, refs = 422, None, []
    if form.validate():
        refs = form.refs()
        try:
            with unit_of_work() as s:
                batch = bulk_replay.request_batch(
                    s, current_actor(), refs, form.reason.data or "", form.pace()
                )
                batch_id, total = batch.id, batch.total
            flash(
                f"Bulk replay #{batch_id} of {total} exceptions requested; a clinical lead approves it.",
                "success",
            )
            return redirect(url_for(".detail", bulk_replay_id=batch_id), code=303)
        except DomainError as exc:
            status, error = exc.http_status, exc.message
    else:
        error = first_error(form)
    return _render_new(form, refs, error, status)


def _detail_context(s, bulk_replay_id: int) -> dict:
    batch = bulk_replay.get(s, bulk_replay_id)
    actor = current_actor()
    return dict(
        batch=batch,
        progress=bulk_replay.progress(s, batch.id),
        rows=bulk_replay.item_rows(s, batch.id),
        pace=bulk_replay.pace_of(batch),
        actions=[a.value for a in available_batch_actions(batch.state, actor.role)],
    )


@bp.route("/bulk-replays/<int:bulk_replay_id>")
@requires(Permission.VIEW_QUEUES)
def detail(bulk_replay_id: int):
    """The fixed list, live progress, and the decisions the viewer may take."""
    with unit_of_work(read_only=True) as s:
        context = _detail_context(s, bulk_replay_id)
    return render_template(
        "bulk_replays/detail.html", form=DecisionForm(formdata=None), error=None, **context
    )


@bp.route("/bulk-replays/<int:bulk_replay_id>/progress")
@requires(Permission.VIEW_QUEUES)
def progress(bulk_replay_id: int):
    """The self-replacing progress fragment (htmx polls it every 2 s; 286 stops it once settled)."""
    with unit_of_work(read_only=True) as s:
        batch = bulk_replay.get(s, bulk_replay_id)
        context = dict(
            batch=batch, progress=bulk_replay.progress(s, batch.id), pace=bulk_replay.pace_of(batch)
        )
    polling = bulk_replay.still_moving(batch, context["progress"])
    if htmx and not polling:
        return stop_polling(render_template("bulk_replays/_progress.html", **context))
    return page_or_fragment("bulk_replays/progress.html", "bulk_replays/_progress.html", **context)


@bp.route("/bulk-replays/<int:bulk_replay_id>/<action>", methods=["POST"])
@requires(Permission.DECIDE)
def decide(bulk_replay_id: int, action: str):
    """approve (a clinical lead, not the requester, password re-entered) | reject | pause |
    resume | cancel."""
    if action not in ACTIONS:
        return render_template("error.html", status=404, code="not_found", message="no such action"), 404
    form = DecisionForm()
    status, error = 422, None
    if form.validate():
        try:
            with unit_of_work() as s:
                bulk_replay.decide_batch(
                    s,
                    bulk_replay_id,
                    current_actor(),
                    action,
                    reason=form.reason.data or "",
                    password=form.password.data or None,
                    expected_version=form.expected_version.data,
                )
            flash(f"Bulk replay #{bulk_replay_id} {DONE[action]}.", "success")
            return redirect(url_for(".detail", bulk_replay_id=bulk_replay_id), code=303)
        except bulk_replay.BulkApprovalPasswordFailed as exc:
            with unit_of_work() as s:  # after the refused approval rolled back: audited, counted
                bulk_replay.record_password_failure(s, exc.user_id, exc.bulk_replay_id)
            status, error = exc.http_status, exc.message
        except DomainError as exc:
            status, error = exc.http_status, exc.message
    else:
        error = first_error(form)
    with unit_of_work(read_only=True) as s:
        context = _detail_context(s, bulk_replay_id)
    return render_template("bulk_replays/detail.html", form=form, error=error, **context), status
