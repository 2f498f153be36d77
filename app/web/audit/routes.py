"""Audit: search with keyset paging, chain verification on demand, streamed exports."""

from __future__ import annotations

from datetime import datetime

from flask import Response, render_template, request, stream_with_context
from flask_wtf import FlaskForm
from wtforms import IntegerField, SelectField, StringField
from wtforms.validators import Length, Optional, ValidationError
from wtforms.widgets import HiddenInput

from app.domain.errors import Invalid
from app.domain.roles import Permission
from app.domain.timeparse import parse_utc
from app.services import audit, queries
from app.services.audit_export import FORMATS, stream_export
from app.services.clock import utcnow

from ..access import current_actor, requires
from ..console import first_error, labelled, page_or_fragment
from ..extensions import htmx, sessions, unit_of_work
from . import bp

EXTENSIONS = {"csv": "csv", "jsonl": "jsonl", "fhir-ndjson": "ndjson"}
SUBJECT_TYPES = ("exception", "message", "replay", "user", "connection", "customer", "sla_rule", "audit")


def parse_when(value: str | None, *, end: bool = False) -> datetime | None:
    """'2024-05-01' or an ISO 8601 datetime, as naive UTC. A date-only `end` covers that whole day."""
    value = (value or "").strip()
    if not value:
        return None
    try:
        return parse_utc(value, end_of_day=end)
    except ValueError:
        raise Invalid(
            f"{value!r} is not a date (YYYY-MM-DD) or an ISO 8601 time", code="invalid_date"
        ) from None


def _date_check(end: bool):
    def check(form, field):
        try:
            parse_when(field.data, end=end)
        except Invalid as exc:
            raise ValidationError(exc.message) from None

    return check


class AuditSearchForm(FlaskForm):
    class Meta:
        csrf = False

    actor = StringField("Actor", validators=[Optional(), Length(max=80)])
    action = StringField("Action", validators=[Optional(), Length(max=60)])
    subject_type = SelectField("Subject type", choices=labelled(SUBJECT_TYPES), validators=[Optional()])
    subject_id = StringField("Subject id", validators=[Optional(), Length(max=64)])
    since = StringField("From", validators=[Optional(), _date_check(False)])
    until = StringField("To", validators=[Optional(), _date_check(True)])
    before = IntegerField(widget=HiddenInput(), validators=[Optional()])

    def filters(self) -> queries.AuditFilters:
        return queries.AuditFilters(
            actor=(self.actor.data or "").strip() or None,
            action=(self.action.data or "").strip() or None,
            subject_type=self.subject_type.data or None,
            subject_id=(self.subject_id.data or "").strip() or None,
            since=parse_when(self.since.data),
            until=parse_when(self.until.data, end=True),
        )


def _render(verify_result=None):
    form = AuditSearchForm(formdata=request.args)
    status, error, events, next_before, head = 200, None, [], None, None
    with unit_of_work(read_only=True) as s:
        if form.validate():
            events, next_before = queries.audit_page(s, form.filters(), before_id=form.before.data)
        else:
            status, error = 422, first_error(form)
        head = audit.head(s)
        pending = audit.pending_summary(s)
    return page_or_fragment(
        "audit/index.html",
        "audit/_rows.html",
        status,
        form=form,
        events=events,
        next_before=next_before,
        error=error,
        head=head,
        pending=pending,
        verify_result=verify_result,
        formats=list(FORMATS),
    )


@bp.route("/audit")
@requires(Permission.VIEW_AUDIT)
def index():
    """Search the audit log by actor, action, subject and date; newest first."""
    return _render()


@bp.route("/audit/verify")
@requires(Permission.VIEW_AUDIT)
def verify():
    """Recompute the hash chain now and show OK or the first broken event."""
    with unit_of_work(read_only=True) as s:
        result = audit.verify(s)
    if htmx:
        return render_template("audit/_verify.html", verify_result=result, checked_at=utcnow())
    return _render(verify_result=result)


@bp.route("/audit/export")
@requires(Permission.EXPORT_AUDIT)
def export():
    """Stream the log as CSV, JSON Lines or FHIR AuditEvent NDJSON (the export is itself audited)."""
    fmt = request.args.get("format", "csv")
    if fmt not in FORMATS:
        raise Invalid(f"format must be one of {', '.join(FORMATS)}", code="invalid_format")
    since = parse_when(request.args.get("since"))
    until = parse_when(request.args.get("until"), end=True)
    lines = stream_export(sessions(), fmt, actor=current_actor().username, since=since, until=until)
    filename = f"audit-{utcnow():%Y%m%dT%H%M%SZ}.{EXTENSIONS[fmt]}"
    return Response(
        stream_with_context(lines),
        mimetype=FORMATS[fmt],
        headers={"Content-Disposition": f'attachment; filename="{filename}"', "Cache-Control": "no-store"},
    )
