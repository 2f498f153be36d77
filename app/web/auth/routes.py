"""Login and logout. Logins (and failed ones) are audited; service users cannot log in.

A failed login is recorded with the actor `anonymous` and the name that was tried, escaped, as a
detail: whatever someone types into the form never becomes an actor in the audit log. Failed
logins are throttled per account and per client address (app/web/security.py)."""

from urllib.parse import urlsplit

from flask import flash, make_response, redirect, render_template, request, session, url_for
from flask_login import login_user, logout_user
from flask_wtf import FlaskForm
from wtforms import PasswordField, StringField
from wtforms.validators import DataRequired, Length

from app.domain.roles import Permission
from app.services import audit
from app.services.users import authenticate, log_out

from ..access import begin_session, current_actor, public, requires
from ..extensions import unit_of_work
from . import bp

ANONYMOUS = "anonymous"
LOGIN_REFUSED = "Unknown user or wrong password (service accounts use API tokens)."


class LoginForm(FlaskForm):
    username = StringField("Username", validators=[DataRequired(), Length(max=80)])
    password = PasswordField("Password", validators=[DataRequired(), Length(max=200)])


def _safe_next(target: str | None) -> str:
    # Only same-site paths: no scheme, no host, and no "//" or "/\" that browsers treat as one.
    if target and target.startswith("/") and not target.startswith(("//", "/\\")) and "\\" not in target:
        parts = urlsplit(target)
        if not parts.scheme and not parts.netloc:
            return target
    return url_for("dashboard.index")


def escaped_name(name: str) -> str:
    """What someone typed as a username, as printable ASCII (control and non-ASCII characters
    backslash-escaped) and bounded: safe to show and log, never mistaken for a real actor."""
    return name[:80].encode("unicode_escape").decode("ascii")


def login_throttled(_limit=None):
    """The login page again, 429: too many failed attempts for this account or address."""
    form = LoginForm()
    form.password.errors = ("Too many failed logins. Wait a few minutes and try again.",)
    return make_response(render_template("auth/login.html", form=form), 429)


def _fresh_session() -> None:
    """Empty the session but for its CSRF secret: a form already open in another tab still posts."""
    csrf_secret = session.get("csrf_token")
    session.clear()
    if csrf_secret:
        session["csrf_token"] = csrf_secret


@bp.route("/login", methods=["GET", "POST"])
@public
def login():
    form = LoginForm()
    if form.validate_on_submit():
        with unit_of_work() as s:
            user, account = authenticate(s, form.username.data, form.password.data)
            if user is not None:
                audit.record(
                    s,
                    actor=user.username,
                    action="auth.login",
                    subject_type="user",
                    subject_id=user.id,
                    details={"remote_addr": request.remote_addr},
                )
            else:
                audit.record(
                    s,
                    actor=ANONYMOUS,
                    action="auth.login_failed",
                    subject_type="user",
                    subject_id=account.id if account is not None else "-",
                    details={
                        "attempted_username": escaped_name(form.username.data),
                        "remote_addr": request.remote_addr,
                    },
                )
        if user is not None:
            _fresh_session()  # nothing of a previous user's session survives the login
            login_user(user)
            begin_session(user)
            return redirect(_safe_next(request.args.get("next")))
        form.password.errors.append(LOGIN_REFUSED)
        return render_template("auth/login.html", form=form), 401
    return render_template("auth/login.html", form=form)


@bp.route("/logout", methods=["POST"])
@requires(Permission.CONSOLE_LOGIN)
def logout():
    """Log out everywhere: every session of this user ends, including a copied cookie."""
    with unit_of_work() as s:
        log_out(s, current_actor().id)
    logout_user()
    _fresh_session()
    flash("Logged out.")
    return redirect(url_for("auth.login"))
