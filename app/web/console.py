"""Helpers the console blueprints share: template filters, SLA display, htmx responses.

Each console blueprint calls `install(bp)`; the template helpers are registered on the app
once, whichever blueprint comes first.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from flask import Blueprint, Flask, make_response, render_template, request, url_for
from wtforms import SelectChoice
from wtforms.validators import ValidationError

from app.domain.audit_chain import format_timestamp
from app.domain.roles import Role, mask_identifier, masks_patient_identifiers
from app.domain.sla import format_remaining, sla_status
from app.domain.states import RULES, Action, ExceptionState
from app.services.clock import utcnow

from .access import current_actor
from .extensions import htmx

HTMX_STOP_POLLING = 286


@dataclass(frozen=True)
class SlaView:
    """What the server renders for a live countdown; console.js keeps it ticking."""

    status: str
    remaining: str
    due_iso: str
    start_iso: str
    due_text: str
    due_short: str  # 'MM-DD HH:MM' for dense tables; due_text in the tooltip


def sla_view(item, now: datetime | None = None) -> SlaView:
    """SLA status, remaining-time text and ISO timestamps for one exception."""
    now = now or utcnow()
    return SlaView(
        status=sla_status(now, item.sla_started_at, item.sla_due_at).value,
        remaining=format_remaining(now, item.sla_due_at),
        due_iso=iso(item.sla_due_at),
        start_iso=iso(item.sla_started_at),
        due_text=timestamp(item.sla_due_at),
        due_short=item.sla_due_at.strftime("%m-%d %H:%M"),
    )


def iso(value: datetime | None) -> str:
    """Naive-UTC datetime as ISO 8601 with a Z (for <time datetime> and data-due)."""
    return format_timestamp(value) if value else ""


def timestamp(value: datetime | None) -> str:
    """Human form of a naive-UTC datetime."""
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value else "—"


def duration(value: timedelta | datetime | None) -> str:
    """'3h 05m', '2d 4h', '45s'; a datetime means 'time since then'."""
    if value is None:
        return "—"
    if isinstance(value, datetime):
        value = utcnow() - value
    seconds = max(0, int(value.total_seconds()))
    days, rem = divmod(seconds, 86400)
    hours, rem = divmod(rem, 3600)
    minutes, secs = divmod(rem, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def patient_ref(value: str | None) -> str:
    """The patient reference as the current actor may see it in lists (SPEC 3.4)."""
    actor = current_actor()
    if not value:
        return "—"
    if actor is None or masks_patient_identifiers(actor.role):
        return mask_identifier(value)
    return value


def available_actions(item, role: str) -> list[Action]:
    """Actions the state machine lets `role` take on `item` now (RULES + the confirmation flag)."""
    try:
        state, role = ExceptionState(item.state), Role(role)
    except ValueError:
        return []
    actions = [a for a, rule in RULES.items() if role in rule.roles and state in rule.from_states]
    if item.needs_not_applied_confirmation:
        actions = [a for a in actions if a not in (Action.RESUBMIT, Action.RESUBMIT_CORRECTED)]
    else:
        actions = [a for a in actions if a is not Action.CONFIRM_NOT_APPLIED]
    return actions


def url_with(**overrides) -> str:
    """The current URL with some query arguments replaced (None/'' removes them)."""
    args = {k: v for k, v in request.args.items()}
    args.update(overrides)
    args = {k: v for k, v in args.items() if v not in (None, "")}
    return url_for(request.endpoint, **(request.view_args or {}), **args)


def page_or_fragment(page: str, fragment: str, status: int = 200, **context):
    """One endpoint, two renderings: the fragment for an htmx request, else the full page."""
    template = fragment if htmx and not htmx.boosted else page
    return render_template(template, **context), status


def stop_polling(body: str):
    """Respond so that htmx swaps this last update in and stops polling (HTTP 286)."""
    response = make_response(body, HTMX_STOP_POLLING)
    return response


def options(pairs: Iterable[tuple[str, str]]) -> list[SelectChoice]:
    """(value, label) pairs as WTForms select choices."""
    return [SelectChoice(str(value), label) for value, label in pairs]


def labelled(values: Iterable[str], any_label: str | None = "any") -> list[SelectChoice]:
    """Select choices for enum-like values ('ehr_rejected' shown as 'ehr rejected'), with an
    empty 'any' option first unless any_label is None."""
    head = [SelectChoice("", any_label)] if any_label is not None else []
    return head + [SelectChoice(v, v.replace("_", " ")) for v in values]


def first_error(form) -> str:
    """The first validation message of a WTForms form, prefixed with its field label."""
    for name, errors in form.errors.items():
        if errors:
            field = getattr(form, name, None)
            label = field.label.text if field is not None and field.label.text else name
            return f"{label}: {errors[0]}"
    return "invalid input"


def _install(app: Flask) -> None:
    if app.extensions.get("recon_console_helpers"):
        return
    app.extensions["recon_console_helpers"] = True
    app.add_template_filter(iso, "iso")
    app.add_template_filter(timestamp, "ts")
    app.add_template_filter(duration, "age")
    app.add_template_filter(patient_ref, "patient")
    app.add_template_global(sla_view, "sla")
    app.add_template_global(url_with, "url_with")
    app.add_template_global(available_actions, "available_actions")


def install(bp: Blueprint) -> None:
    """Register the shared template helpers when `bp` is registered on an app."""
    bp.record_once(lambda state: _install(state.app))


def parse_selection_ref(value: str) -> tuple[int, int | None]:
    """'123:4' -> (123, 4): the id and the version the list showed; '123' -> (123, None)."""
    ident, _, version = value.partition(":")
    return int(ident), int(version) if version else None


def check_selection(values: list[str], limit: int, too_many: str) -> None:
    """A bulk form's fixed selection (queue bulk actions, bulk replay): at least one, at most
    `limit`, each a well-formed reference, none twice. Raises WTForms' ValidationError."""
    if not values:
        raise ValidationError("select at least one exception")
    if len(values) > limit:
        raise ValidationError(too_many)
    try:
        refs = [parse_selection_ref(v) for v in values]
    except ValueError:
        raise ValidationError("malformed selection") from None
    if len({i for i, _ in refs}) != len(refs):
        raise ValidationError("an exception is selected twice")
