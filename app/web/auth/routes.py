"""Login and logout. Logins (and failed ones) are audited; service users cannot log in."""

from urllib.parse import urlsplit

from flask import flash, redirect, render_template, request, url_for
from flask_login import login_user, logout_user
from flask_wtf import FlaskForm
from wtforms import PasswordField, StringField
from wtforms.validators import DataRequired, Length

from app.domain.roles import Permission, has_permission
from app.services import audit
from app.services.users import by_username, check_password

from ..access import current_actor, public, requires
from ..extensions import unit_of_work
from . import bp


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


@bp.route("/login", methods=["GET", "POST"])
@public
def login():
    form = LoginForm()
    if form.validate_on_submit():
        with unit_of_work() as s:
            user = by_username(s, form.username.data)
            ok = (
                user is not None
                and user.active
                and has_permission(user.role, Permission.CONSOLE_LOGIN)
                and check_password(user, form.password.data)
            )
            audit.record(
                s,
                actor=form.username.data[:80] if not ok else user.username,
                action="auth.login" if ok else "auth.login_failed",
                subject_type="user",
                subject_id=user.id if user else "-",
                details={"remote_addr": request.remote_addr},
            )
        if ok:
            login_user(user)
            return redirect(_safe_next(request.args.get("next")))
        form.password.errors.append("Unknown user or wrong password (service accounts use API tokens).")
        return render_template("auth/login.html", form=form), 401
    return render_template("auth/login.html", form=form)


@bp.route("/logout", methods=["POST"])
@requires(Permission.CONSOLE_LOGIN)
def logout():
    actor = current_actor()
    with unit_of_work() as s:
        audit.record(s, actor=actor.username, action="auth.logout", subject_type="user", subject_id=actor.id)
    logout_user()
    flash("Logged out.")
    return redirect(url_for("auth.login"))
