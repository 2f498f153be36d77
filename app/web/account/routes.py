"""My tokens (a person creates and revokes their own API tokens) and enrollment (a new or reset
user sets their own password through a one-time link). Issue 7: an admin never holds a usable
credential of another person."""

from __future__ import annotations

from flask import flash, make_response, redirect, render_template, url_for
from flask_wtf import FlaskForm
from wtforms import IntegerField, PasswordField
from wtforms.validators import DataRequired, EqualTo, Length, NumberRange, Optional

from app.domain.errors import DomainError
from app.domain.roles import Permission
from app.services import users

from ..access import current_actor, public, requires
from ..console import first_error
from ..extensions import unit_of_work
from . import bp


class PersonalTokenForm(FlaskForm):
    days = IntegerField(
        "Expires after (days)",
        default=users.DEFAULT_TOKEN_DAYS,
        validators=[Optional(), NumberRange(1, users.MAX_TOKEN_DAYS)],
    )


class ConfirmForm(FlaskForm):
    """A button that changes something: CSRF and nothing else."""


class EnrollForm(FlaskForm):
    password = PasswordField("New password", validators=[DataRequired(), Length(min=8, max=200)])
    confirm = PasswordField(
        "Repeat it", validators=[DataRequired(), EqualTo("password", message="the passwords differ")]
    )


def _tokens_page(*, form=None, status: int = 200, error: str | None = None, new_token: str | None = None):
    with unit_of_work(read_only=True) as s:
        tokens = users.personal_tokens(s, users.get(s, current_actor().id))
    response = make_response(
        render_template(
            "account/tokens.html",
            tokens=tokens,
            form=form or PersonalTokenForm(formdata=None),
            confirm=ConfirmForm(formdata=None),
            error=error,
            new_token=new_token,
        ),
        status,
    )
    if new_token:
        response.headers["Cache-Control"] = "no-store"  # shown once
    return response


@bp.route("/account/tokens")
@requires(Permission.CONSOLE_LOGIN)
def tokens_page():
    """My tokens: create (shown once, with an expiry), see last use, revoke."""
    return _tokens_page()


@bp.route("/account/tokens", methods=["POST"])
@requires(Permission.CONSOLE_LOGIN)
def create_token():
    form = PersonalTokenForm()
    if not form.validate():
        return _tokens_page(form=form, status=422, error=first_error(form))
    try:
        with unit_of_work() as s:
            token = users.create_personal_token(
                s, users.get(s, current_actor().id), days=form.days.data or users.DEFAULT_TOKEN_DAYS
            )
    except DomainError as exc:
        return _tokens_page(form=form, status=exc.http_status, error=exc.message)
    return _tokens_page(new_token=token)


@bp.route("/account/tokens/<int:token_id>/revoke", methods=["POST"])
@requires(Permission.CONSOLE_LOGIN)
def revoke_token(token_id: int):
    form = ConfirmForm()
    if not form.validate():
        return _tokens_page(status=422, error=first_error(form))
    try:
        with unit_of_work() as s:
            users.revoke_own_token(s, users.get(s, current_actor().id), token_id)
    except DomainError as exc:
        return _tokens_page(status=exc.http_status, error=exc.message)
    flash(f"Token {token_id} revoked.", "success")
    return redirect(url_for(".tokens_page"), code=303)


def _enroll_page(secret: str, *, form=None, status: int = 200, error: str | None = None):
    with unit_of_work(read_only=True) as s:
        link = users.enrollment_for(s, secret)
        username = users.get(s, link.user_id).username if link else None
    if link is None:
        status, error = (
            404,
            "This link is invalid, already used or expired. Ask an administrator for a new one.",
        )
    response = make_response(
        render_template(
            "account/enroll.html",
            secret=secret,
            username=username,
            form=form or EnrollForm(formdata=None),
            error=error,
        ),
        status,
    )
    response.headers["Cache-Control"] = "no-store"
    response.headers["Referrer-Policy"] = "no-referrer"  # the secret is in the URL
    return response


@bp.route("/enroll/<secret>")
@public
def enroll(secret: str):
    """The one-time enrollment (or reset) link: set your own password."""
    return _enroll_page(secret)


@bp.route("/enroll/<secret>", methods=["POST"])
@public
def complete_enrollment(secret: str):
    form = EnrollForm()
    if not form.validate():
        return _enroll_page(secret, form=form, status=422, error=first_error(form))
    try:
        with unit_of_work() as s:
            users.complete_enrollment(s, secret, form.password.data)
    except DomainError as exc:
        return _enroll_page(secret, form=form, status=exc.http_status, error=exc.message)
    flash("Password set. Log in with it.", "success")
    return redirect(url_for("auth.login"), code=303)
