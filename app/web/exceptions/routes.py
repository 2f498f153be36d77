"""Exception detail: payload viewer (audited), timeline, decisions, actions and the correction editor."""

from __future__ import annotations

from flask import abort, flash, redirect, render_template, request, url_for
from flask_wtf import FlaskForm
from wtforms import (
    HiddenField,
    IntegerField,
    PasswordField,
    SelectField,
    StringField,
    SubmitField,
    TextAreaField,
)
from wtforms.validators import AnyOf, DataRequired, Length, Optional
from wtforms.widgets import HiddenInput

from app.domain.errors import DomainError
from app.domain.hl7_view import hl7_view
from app.domain.payload_diff import excerpts, issue_targets, normalise, review
from app.domain.payloads import FHIR_JSON, HL7_ER7
from app.domain.roles import Permission
from app.domain.states import Action, DiscardReason
from app.services import exceptions, queries

from ..access import can, current_actor, requires
from ..console import first_error, labelled
from ..extensions import htmx, unit_of_work
from . import bp
from .payload_view import fhir_lines, normalise_edited

ACTION_LABELS = {
    Action.RESUBMIT: "Resubmit (request replay)",
    Action.RESUBMIT_CORRECTED: "Resubmit with correction",
    Action.APPROVE: "Approve replay",
    Action.REJECT: "Reject replay",
    Action.ESCALATE: "Escalate to a clinical lead",
    Action.DISCARD: "Discard",
    Action.CONFIRM_NOT_APPLIED: "Confirm not applied",
    Action.COMMENT: "Comment",
    Action.ASSIGN: "Assign",
    Action.CLAIM: "Claim",
}


class DecisionForm(FlaskForm):
    """One human decision. Which fields matter depends on the action; the state machine decides."""

    action = HiddenField(validators=[DataRequired(), AnyOf([a.value for a in Action])])
    expected_version = IntegerField(widget=HiddenInput(), validators=[Optional()])
    reason = TextAreaField("Reason", validators=[Optional(), Length(max=2000)])
    reason_code = SelectField(
        "Reason code",
        choices=labelled([r.value for r in DiscardReason], "—"),
        validators=[Optional()],
    )
    assignee = StringField("Assignee", validators=[Optional(), Length(max=80)])
    password = PasswordField("Your password", validators=[Optional(), Length(max=200)])


class CorrectionForm(FlaskForm):
    payload = TextAreaField("Corrected payload", validators=[DataRequired(), Length(max=5_000_000)])
    reason = TextAreaField("Why this correction", validators=[Optional(), Length(max=2000)])
    expected_version = IntegerField(widget=HiddenInput(), validators=[Optional()])
    preview = SubmitField("Preview diff")
    submit = SubmitField("Request replay with this correction")


def payload_context(item, payload, issues: list[dict]) -> dict:
    """Template variables for the full payload viewer; `payload` was shown through the audited
    exceptions.view_payload (or is None: not shown)."""
    text = payload.text if payload is not None else None
    if text is None:
        return {"payload_text": None, "purged": purged_payload(item)}
    if item.message.content_type == FHIR_JSON:
        return {"payload_text": text, "json_lines": fhir_lines(text, issues)}
    view = hl7_view(text, issues=issues, detail=item.detail, raw=payload.raw)
    return {"payload_text": text, "hl7": view}


def purged_payload(item):
    """The current payload version when retention purged it (its hash, size and time remain)."""
    current = item.message.current_payload
    return current if current is not None and current.purged_at is not None else None


def masked_payload_context(item, issues: list[dict]) -> dict:
    """An HL7 message's field table with every patient value masked: the structure and the flagged
    field, for anyone who may see the exception. It shows no PHI, so it records no PHI view.
    Call inside the session: the current payload version is loaded here."""
    current = item.message.current_payload if item.message.content_type == HL7_ER7 else None
    if current is None or current.text is None:
        return {}
    return {"hl7": hl7_view(current.text, issues=issues, detail=item.detail, raw=current.raw, masked=True)}


def _render_detail(
    exception_id: int,
    *,
    status: int = 200,
    show_payload: bool = False,
    error: str | None = None,
    error_action: str | None = None,
):
    actor = current_actor()
    # Showing the payload records a PHI view (a write); otherwise this only reads.
    with unit_of_work(read_only=not show_payload) as s:
        detail = queries.exception_detail(s, exception_id)
        payload = exceptions.view_payload(s, detail.item, actor, channel="console") if show_payload else None
        # Built while the session is open: the version list deferred the text column.
        if payload is not None:
            context = payload_context(detail.item, payload, detail.latest_issues)
        else:
            context = {
                "payload_text": None,
                "purged": purged_payload(detail.item),
                **masked_payload_context(detail.item, detail.latest_issues),
            }
        users = queries.assignable_users(s) if can(Permission.DECIDE) else []
    return (
        render_template(
            "exceptions/detail.html",
            d=detail,
            item=detail.item,
            users=users,
            error=error,
            error_action=error_action,
            conflict=status == 409,  # the form then says who decided and when
            labels=ACTION_LABELS,
            discard_reasons=list(DiscardReason),
            payload_version=payload.version if payload else None,
            **context,
        ),
        status,
    )


@bp.route("/exceptions/<int:exception_id>")
@requires(Permission.VIEW_QUEUES)
def detail(exception_id: int):
    """The exception page. `?payload=1` reveals the full payload (an audited PHI view)."""
    show_payload = request.args.get("payload") == "1"
    if show_payload and not can(Permission.VIEW_PAYLOAD):
        abort(403, "your role may not view payloads")
    return _render_detail(exception_id, show_payload=show_payload)


@bp.route("/exceptions/<int:exception_id>/payload")
@requires(Permission.VIEW_QUEUES, Permission.VIEW_PAYLOAD)
def payload(exception_id: int):
    """The payload viewer alone (htmx); without htmx, the detail page with the payload shown."""
    if not htmx:
        return redirect(url_for(".detail", exception_id=exception_id, payload=1, _anchor="payload"))
    with unit_of_work() as s:
        detail = queries.exception_detail(s, exception_id)
        shown = exceptions.view_payload(s, detail.item, current_actor(), channel="console")
        context = payload_context(detail.item, shown, detail.latest_issues)
    return render_template(
        "exceptions/_payload.html", d=detail, item=detail.item, payload_version=shown.version, **context
    )


@bp.route("/exceptions/<int:exception_id>/decide", methods=["POST"])
@requires(Permission.DECIDE)
def decide(exception_id: int):
    """Apply one decision through the service; errors re-render the page with the message and status."""
    form = DecisionForm()
    action = form.action.data
    if not form.validate():
        return _render_detail(exception_id, status=422, error=first_error(form), error_action=action)
    data = exceptions.DecisionInput(
        action=action,
        reason=form.reason.data or "",
        reason_code=form.reason_code.data or None,
        password=form.password.data or None,
        assignee=form.assignee.data or None,
        expected_version=form.expected_version.data,
    )
    try:
        with unit_of_work() as s:
            decision = exceptions.decide(s, exception_id, current_actor(), data)
            to_state = decision.to_state
    except DomainError as exc:
        return _render_detail(exception_id, status=exc.http_status, error=exc.message, error_action=action)
    flash(
        f"{ACTION_LABELS[Action(action)]}: done. Exception #{exception_id} is {to_state.replace('_', ' ')}.",
        "success",
    )
    return redirect(url_for(".detail", exception_id=exception_id), code=303)


# --- correction editor ----------------------------------------------------------------------------


def _render_correct(
    exception_id: int,
    form: CorrectionForm,
    *,
    status: int = 200,
    error: str | None = None,
    first_view: bool = False,
):
    actor = current_actor()
    # Every answer of the editor carries full payload content (the editor's text, or the preview's
    # diff against the original): each records a PHI view, de-duplicated on the server.
    with unit_of_work() as s:
        detail = queries.exception_detail(s, exception_id, audit_limit=0)
        original = queries.original_payload(s, detail.item.message_id)
        content_type = detail.item.message.content_type
        proposal = None
        if not first_view:
            exceptions.view_payload(
                s, detail.item, actor, channel="console-correct", payload_version_id=original and original.id
            )
        else:
            # Filling the editor shows the full payload: an audited PHI view.
            current = exceptions.view_payload(s, detail.item, actor, channel="console-correct")
            proposal = queries.proposed_repair(s, detail.item.message)
            # A repair proposed at intake (mojibake) opens in the editor: applied only if this
            # reviewer requests the corrected replay and a clinical lead approves it. The editor
            # opens pretty-printed; what is saved is exactly what the reviewer submits.
            form.payload.data = normalise(content_type, (proposal or current).text or "")
            form.expected_version.data = detail.item.version
    original_text = original.text if original and original.text is not None else ""
    changes = None
    if form.payload.data is not None and (proposal is not None or not first_view):
        changes = review(content_type, original_text, form.payload.data)
    targets = issue_targets(content_type, form.payload.data, detail.latest_issues, detail.item.detail)
    return (
        render_template(
            "exceptions/correct.html",
            d=detail,
            item=detail.item,
            form=form,
            review=changes,
            show_values=True,
            error=error,
            issues=detail.latest_issues,
            issue_excerpts=excerpts(form.payload.data, targets),
            proposal=proposal,
        ),
        status,
    )


@bp.route("/exceptions/<int:exception_id>/correct", methods=["GET", "POST"])
@requires(Permission.DECIDE, Permission.VIEW_PAYLOAD)
def correct(exception_id: int):
    """Edit the payload, preview the diff against version 1, then request a corrected replay."""
    form = CorrectionForm()
    if request.method == "GET":
        return _render_correct(exception_id, form, first_view=True)
    if not form.validate():
        return _render_correct(exception_id, form, status=422, error=first_error(form))
    if form.preview.data or not form.submit.data:
        return _render_correct(exception_id, form)
    if not (form.reason.data or "").strip():
        form.reason.errors = [*form.reason.errors, "a reason is required"]
        return _render_correct(
            exception_id, form, status=422, error="Why this correction: a reason is required"
        )
    try:
        with unit_of_work() as s:
            item = exceptions.get(s, exception_id)
            text = normalise_edited(form.payload.data, item.message.content_type)
            exceptions.decide(
                s,
                exception_id,
                current_actor(),
                exceptions.DecisionInput(
                    action=Action.RESUBMIT_CORRECTED.value,
                    reason=form.reason.data,
                    payload=text,
                    expected_version=form.expected_version.data,
                ),
            )
    except DomainError as exc:
        return _render_correct(exception_id, form, status=exc.http_status, error=exc.message)
    flash(
        f"Corrected replay requested for exception #{exception_id}; it now waits for a clinical lead.",
        "success",
    )
    return redirect(url_for(".detail", exception_id=exception_id), code=303)


@bp.route("/exceptions/<int:exception_id>/diff", methods=["POST"])
@requires(Permission.DECIDE, Permission.VIEW_PAYLOAD)
def diff(exception_id: int):
    """The diff fragment for the editor (htmx live preview)."""
    edited = request.form.get("payload", "")
    with unit_of_work() as s:
        item = exceptions.get(s, exception_id)
        original = queries.original_payload(s, item.message_id)
        # The diff shows the original payload: an audited PHI view (de-duplicated on the server).
        exceptions.view_payload(
            s, item, current_actor(), channel="console-diff", payload_version_id=original and original.id
        )
        content_type = item.message.content_type
    changes = review(content_type, original.text if original and original.text else "", edited)
    return render_template("exceptions/_diff.html", review=changes, show_values=True)
