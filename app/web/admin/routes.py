"""Admin: users and roles, API tokens, customers and connections, SLA policy. Every change is audited
by the service it goes through, in the same unit of work."""

from __future__ import annotations

from collections.abc import Callable

from flask import flash, make_response, redirect, render_template, url_for
from flask_wtf import FlaskForm
from wtforms import (
    BooleanField,
    FloatField,
    HiddenField,
    IntegerField,
    SelectField,
    StringField,
)
from wtforms.validators import (
    AnyOf,
    DataRequired,
    InputRequired,
    Length,
    NumberRange,
    Optional,
    Regexp,
    ValidationError,
)

from app.domain.delivery import Category, Protocol
from app.domain.errors import DomainError
from app.domain.roles import Permission, Role
from app.domain.sla import DEFAULT_HIGH_RISK, DEFAULT_OTHER, DEFAULT_UNKNOWN_OUTCOME
from app.services import admin, connections, users

from ..access import current_actor, requires
from ..console import first_error, labelled, options
from ..extensions import unit_of_work
from . import bp

# --- forms ----------------------------------------------------------------------------------------


def _strip(value):
    return value.strip() if isinstance(value, str) else value


class ConfirmForm(FlaskForm):
    """A button that changes something: CSRF and nothing else."""


REASON_REQUIRED = "say why (it is kept in the audit log)"


class DestructiveForm(FlaskForm):
    """Deactivate, disable, revoke, delete, reset: confirmed in a second step with a reason,
    which is audited with the change."""

    reason = StringField(
        "Reason", validators=[DataRequired(message=REASON_REQUIRED), Length(max=500)], filters=[_strip]
    )


class UserForm(FlaskForm):
    """No password field: an admin never sets another person's password (issue 7). A console
    user gets a one-time enrollment link; a service user gets API tokens."""

    username = StringField(
        "Username",
        validators=[
            DataRequired(),
            Length(max=80),
            Regexp(r"^[A-Za-z0-9_.@-]+$", message="letters, digits, _ . @ - only"),
        ],
    )
    role = SelectField("Role", choices=labelled([r.value for r in Role], None))


class RoleForm(FlaskForm):
    role = SelectField("Role", choices=labelled([r.value for r in Role], None))


class ActiveForm(FlaskForm):
    """Turn something on ("1") or off ("0"); turning it off needs a reason (DestructiveForm)."""

    active = HiddenField(validators=[DataRequired(), AnyOf(["0", "1"])])
    reason = StringField("Reason", validators=[Length(max=500)], filters=[_strip])

    def validate_reason(self, field):  # not Optional(): that would stop the chain before this
        if self.active.data == "0" and not field.data:
            raise ValidationError(REASON_REQUIRED)


class TokenForm(FlaskForm):
    user_id = SelectField("Service account", validators=[DataRequired()])
    days = IntegerField(
        "Expires after (days)",
        default=users.DEFAULT_TOKEN_DAYS,
        validators=[Optional(), NumberRange(1, users.MAX_TOKEN_DAYS)],
    )


class CustomerForm(FlaskForm):
    name = StringField("Customer name", validators=[DataRequired(), Length(max=120)])


class ConnectionForm(FlaskForm):
    name = StringField("Name", validators=[DataRequired(), Length(max=120), Regexp(r"^[A-Za-z0-9_.:-]+$")])
    customer = SelectField("Customer", validators=[DataRequired()])
    protocol = SelectField("Protocol", choices=options((p.value, p.value) for p in Protocol))
    endpoint = StringField("Endpoint (URL or host:port)", validators=[DataRequired(), Length(max=500)])
    environment = SelectField("Environment", choices=options((e, e) for e in connections.ENVIRONMENTS))
    vendor = StringField("Vendor", default="generic", validators=[Optional(), Length(max=60)])
    fhir_version = StringField("FHIR version", default="4.0.1", validators=[Optional(), Length(max=10)])
    conditional_create = BooleanField("Supports conditional create", default=True)
    identifier_search = BooleanField("Supports identifier search", default=True)
    diagnosis_codes = SelectField(
        "Diagnosis codes expected",
        choices=options((c, c) for c in connections.DIAGNOSIS_CODE_SYSTEMS),
        default="icd-10",
    )
    message_types = StringField(
        "Enabled message types (comma-separated; empty = all)", validators=[Optional(), Length(max=1000)]
    )


class RetryPolicyForm(FlaskForm):
    max_auto_retries = IntegerField(
        "Max auto retries", validators=[InputRequired(message="required"), NumberRange(0, 20)]
    )
    retry_backoff_seconds = FloatField(
        "Backoff (s)", validators=[InputRequired(message="required"), NumberRange(0, 3600)]
    )
    circuit_failure_threshold = IntegerField(
        "Circuit threshold", validators=[InputRequired(message="required"), NumberRange(1, 1000)]
    )
    circuit_cooldown_seconds = FloatField(
        "Cooldown (s)", validators=[InputRequired(message="required"), NumberRange(1, 86400)]
    )


class SlaRuleForm(FlaskForm):
    category = SelectField("Category", choices=labelled([c.value for c in Category]))
    risk = SelectField("Clinical risk", choices=labelled(admin.RISKS))
    customer_id = SelectField("Customer", choices=options([("", "every customer")]))
    minutes = IntegerField("Minutes", validators=[InputRequired(), NumberRange(1, admin.MAX_SLA_MINUTES)])


class SlaEditForm(FlaskForm):
    minutes = IntegerField("Minutes", validators=[InputRequired(), NumberRange(1, admin.MAX_SLA_MINUTES)])


def _actor_name() -> str:
    return current_actor().username


def _actor_id() -> int:
    return current_actor().id


def _submit(submitted: FlaskForm, page: Callable, work: Callable, done: Callable, /, **page_args):
    """The one shape of every admin change: validate the form (422 and the page with the message),
    run `work(session)` in one unit of work (a refusal: the page with its status and message),
    then `done(result)` — a flash message and a redirect, or a page of its own."""
    if not submitted.validate():
        return page(status=422, error=first_error(submitted), **page_args)
    try:
        with unit_of_work() as s:
            result = work(s)
    except DomainError as exc:
        return page(status=exc.http_status, error=exc.message, **page_args)
    return done(result)


def _back(endpoint: str, message: str, category: str = "success"):
    flash(message, category)
    return redirect(url_for(endpoint), code=303)


# --- overview -------------------------------------------------------------------------------------


@bp.route("/admin")
@requires(Permission.ADMIN)
def index():
    """Admin landing page with the state of each area."""
    with unit_of_work(read_only=True) as s:
        context = admin.overview(s)
    return render_template("admin/index.html", **context)


# --- users ----------------------------------------------------------------------------------------


def _users_page(*, form: UserForm | None = None, status: int = 200, error: str | None = None, new_link=None):
    with unit_of_work(read_only=True) as s:
        context = admin.users_overview(s)
    response = make_response(
        render_template(
            "admin/users.html",
            **context,
            form=form or UserForm(formdata=None),
            person_roles=[r.value for r in Role if r is not Role.SERVICE],
            error=error,
            new_link=new_link,
        ),
        status,
    )
    if new_link:
        response.headers["Cache-Control"] = "no-store"  # the link is shown once
    return response


def _link_page(result: tuple[str, str]):
    name, secret = result
    url = url_for("account.enroll", secret=secret, _external=True)
    return _users_page(new_link={"username": name, "url": url, "hours": users.DEFAULT_ENROLLMENT_HOURS})


@bp.route("/admin/users")
@requires(Permission.ADMIN)
def users_page():
    """Users and their roles, clinical-lead grants, approval locks."""
    return _users_page()


@bp.route("/admin/users", methods=["POST"])
@requires(Permission.ADMIN)
def create_user():
    """Create a user (audited by users.create_user). A console user gets a one-time enrollment
    link, shown once, to set their own password: the admin never learns it."""
    form = UserForm()

    def done(result):
        name, secret = result
        if secret is None:
            return _back(".users_page", f"Service user {name} created; give it an API token.")
        return _link_page(result)

    return _submit(
        form,
        _users_page,
        lambda s: admin.create_console_user(s, form.username.data, form.role.data, actor_id=_actor_id()),
        done,
        form=form,
    )


@bp.route("/admin/users/<int:user_id>/reset", methods=["POST"])
@requires(Permission.ADMIN)
def reset_password(user_id: int):
    """Reset a person's password (confirmed, with a reason): the old one stops working, every
    session ends, and a new one-time link (not a password) is shown once for the user."""
    form = DestructiveForm()
    return _submit(
        form,
        _users_page,
        lambda s: admin.reset_password(s, user_id, actor_id=_actor_id(), reason=form.reason.data),
        _link_page,
    )


@bp.route("/admin/users/<int:user_id>/role", methods=["POST"])
@requires(Permission.ADMIN)
def set_role(user_id: int):
    """Change a user's role (a clinical-lead grant is audited and listed)."""
    form = RoleForm()
    return _submit(
        form,
        _users_page,
        lambda s: admin.change_role(s, user_id, form.role.data, actor_id=_actor_id()),
        lambda user: _back(".users_page", f"{user.username} is now {user.role.replace('_', ' ')}."),
    )


@bp.route("/admin/users/<int:user_id>/approval-lock", methods=["POST"])
@requires(Permission.ADMIN)
def clear_approval_lock(user_id: int):
    """Clear approval lock: after 5 wrong approval passwords in 15 minutes (audited)."""
    return _submit(
        ConfirmForm(),
        _users_page,
        lambda s: admin.clear_approval_lock(s, user_id, actor_id=_actor_id()),
        lambda user: _back(".users_page", f"Approval lock of {user.username} cleared."),
    )


@bp.route("/admin/users/<int:user_id>/active", methods=["POST"])
@requires(Permission.ADMIN)
def set_user_active(user_id: int):
    """Deactivate (confirmed, with a reason) or reactivate a user."""
    form = ActiveForm()
    return _submit(
        form,
        _users_page,
        lambda s: admin.set_user_active(
            s, user_id, form.active.data == "1", actor=current_actor(), reason=form.reason.data
        ),
        lambda user: _back(
            ".users_page", f"User {user.username} {'reactivated' if user.active else 'deactivated'}."
        ),
    )


# --- API tokens -----------------------------------------------------------------------------------


def _tokens_page(
    *, form: TokenForm | None = None, status: int = 200, error: str | None = None, new_token=None
):
    with unit_of_work(read_only=True) as s:
        tokens = admin.tokens_overview(s)
        candidates = admin.active_accounts(s, service_only=True)
    form = form or TokenForm(formdata=None)
    form.user_id.choices = options((u.id, u.username) for u in candidates)
    response = make_response(
        render_template("admin/tokens.html", tokens=tokens, form=form, error=error, new_token=new_token),
        status,
    )
    if new_token:
        response.headers["Cache-Control"] = "no-store"  # the token is shown once; never cache the page
    return response


@bp.route("/admin/tokens")
@requires(Permission.ADMIN)
def tokens_page():
    """API tokens of every account (only a prefix is stored in clear); new ones for service accounts."""
    return _tokens_page()


@bp.route("/admin/tokens", methods=["POST"])
@requires(Permission.ADMIN)
def create_token():
    """Create a token for a service account and show it once (rendered, not flashed: the session
    cookie is not secret). A person's account is refused: people create their own tokens."""
    form = TokenForm()
    with unit_of_work(read_only=True) as s:
        # every active account is a valid choice for the form, so that a person's account is
        # refused by the rule (403) and not by the select list
        form.user_id.choices = options((u.id, u.username) for u in admin.active_accounts(s))

    def done(result):
        owner, token = result
        return _tokens_page(new_token={"token": token, "username": owner})

    return _submit(
        form,
        _tokens_page,
        lambda s: admin.create_service_token(
            s, int(form.user_id.data), actor_id=_actor_id(), days=form.days.data or users.DEFAULT_TOKEN_DAYS
        ),
        done,
        form=form,
    )


@bp.route("/admin/tokens/<int:token_id>/revoke", methods=["POST"])
@requires(Permission.ADMIN)
def revoke_token(token_id: int):
    """Revoke a token (confirmed, with a reason); requests with it fail from now on."""
    form = DestructiveForm()
    return _submit(
        form,
        _tokens_page,
        lambda s: admin.revoke_token(s, token_id, actor=_actor_name(), reason=form.reason.data),
        lambda _token: _back(".tokens_page", f"Token {token_id} revoked."),
    )


# --- customers and connections --------------------------------------------------------------------


def _connections_page(
    *,
    customer_form: CustomerForm | None = None,
    connection_form: ConnectionForm | None = None,
    status: int = 200,
    error: str | None = None,
    error_for: int | None = None,
):
    with unit_of_work(read_only=True) as s:
        context = admin.connections_overview(s)
    connection_form = connection_form or ConnectionForm(formdata=None)
    connection_form.customer.choices = options((c.name, c.name) for c in context["customers"])
    return (
        render_template(
            "admin/connections.html",
            **context,
            customer_form=customer_form or CustomerForm(formdata=None),
            connection_form=connection_form,
            error=error,
            error_for=error_for,
            paused={c.id: connections.pause_state(c) for c in context["connections"]},
        ),
        status,
    )


@bp.route("/admin/connections")
@requires(Permission.ADMIN)
def connections_page():
    """Customers and their EHR connections, circuit state, retry policy, enable/disable and test."""
    return _connections_page()


@bp.route("/admin/customers", methods=["POST"])
@requires(Permission.ADMIN)
def add_customer():
    """Add a customer (audited by connections.add_customer)."""
    form = CustomerForm()
    return _submit(
        form,
        _connections_page,
        lambda s: connections.add_customer(s, form.name.data, actor=_actor_name()),
        lambda _c: _back(".connections_page", f"Customer {form.name.data} added."),
        customer_form=form,
    )


@bp.route("/admin/connections", methods=["POST"])
@requires(Permission.ADMIN)
def add_connection():
    """Add a connection (audited by connections.add_connection)."""
    form = ConnectionForm()
    with unit_of_work(read_only=True) as s:
        form.customer.choices = options((c.name, c.name) for c in admin.connections_overview(s)["customers"])
    message_types = [t.strip() for t in (form.message_types.data or "").split(",") if t.strip()]
    return _submit(
        form,
        _connections_page,
        lambda s: connections.add_connection(
            s,
            form.name.data,
            customer=form.customer.data,
            protocol=form.protocol.data,
            endpoint=form.endpoint.data.strip(),
            environment=form.environment.data,
            conditional_create=form.conditional_create.data,
            identifier_search=form.identifier_search.data,
            vendor=form.vendor.data or "generic",
            fhir_version=form.fhir_version.data or "4.0.1",
            enabled_message_types=message_types,
            diagnosis_code_system=form.diagnosis_codes.data or "icd-10",
            actor=_actor_name(),
        ),
        lambda _c: _back(".connections_page", f"Connection {form.name.data} added."),
        connection_form=form,
    )


@bp.route("/admin/connections/<int:connection_id>/enabled", methods=["POST"])
@requires(Permission.ADMIN)
def set_connection_enabled(connection_id: int):
    """Enable, or disable (confirmed, with a reason), a connection."""
    form = ActiveForm()
    return _submit(
        form,
        _connections_page,
        lambda s: admin.set_connection_enabled(
            s, connection_id, form.active.data == "1", actor=_actor_name(), reason=form.reason.data
        ),
        lambda conn: _back(
            ".connections_page", f"Connection {conn.name} {'enabled' if conn.enabled else 'disabled'}."
        ),
        error_for=connection_id,
    )


@bp.route("/admin/connections/<int:connection_id>/pause", methods=["POST"])
@requires(Permission.ADMIN)
def pause_connection(connection_id: int):
    """Start a maintenance window (confirmed, with a reason): nothing is sent to this EHR; what
    waits is held, not failed, until it is resumed."""
    form = DestructiveForm()
    return _submit(
        form,
        _connections_page,
        lambda s: connections.pause_connection(
            s, connection_id, reason=form.reason.data, actor=_actor_name()
        ),
        lambda conn: _back(
            ".connections_page", f"Connection {conn.name} paused: nothing is sent until it is resumed."
        ),
        error_for=connection_id,
    )


@bp.route("/admin/connections/<int:connection_id>/resume", methods=["POST"])
@requires(Permission.ADMIN)
def resume_connection(connection_id: int):
    """End the maintenance window (with a reason); what it held drains in order."""
    form = DestructiveForm()
    return _submit(
        form,
        _connections_page,
        lambda s: connections.resume_connection(
            s, connection_id, actor=_actor_name(), reason=form.reason.data
        ),
        lambda released: _back(
            ".connections_page",
            f"Connection resumed; {released} held item{'' if released == 1 else 's'} released in order.",
        ),
        error_for=connection_id,
    )


@bp.route("/admin/connections/<int:connection_id>/test", methods=["POST"])
@requires(Permission.ADMIN)
def test_connection(connection_id: int):
    """Probe the EHR through its adapter (no message is delivered); show and audit the result."""
    form = ConfirmForm()
    if not form.validate():
        return _connections_page(status=422, error=first_error(form), error_for=connection_id)
    with unit_of_work(read_only=True) as s:
        settings, name = admin.connection_probe(s, connection_id)
    # The network call happens outside any transaction: never hold the database while waiting on an EHR.
    result = admin.probe(settings)
    with unit_of_work() as s:
        admin.record_connection_test(s, connection_id, result, actor=_actor_name())
    detail = str(result.get("detail") or "")[:300]
    if result.get("ok"):
        return _back(".connections_page", f"{name}: connection OK. {detail}".strip())
    return _back(".connections_page", f"{name}: connection test failed. {detail}".strip(), "error")


@bp.route("/admin/connections/<int:connection_id>/circuit", methods=["POST"])
@requires(Permission.ADMIN)
def reset_circuit(connection_id: int):
    """Close a connection's circuit breaker."""
    return _submit(
        ConfirmForm(),
        _connections_page,
        lambda s: admin.reset_circuit(s, connection_id, actor=_actor_name()),
        lambda conn: _back(".connections_page", f"Circuit of {conn.name} reset (closed)."),
        error_for=connection_id,
    )


@bp.route("/admin/connections/<int:connection_id>/retry", methods=["POST"])
@requires(Permission.ADMIN)
def retry_policy(connection_id: int):
    """Edit a connection's retry and circuit-breaker policy."""
    form = RetryPolicyForm()
    return _submit(
        form,
        _connections_page,
        lambda s: admin.update_retry_policy(
            s,
            connection_id,
            actor=_actor_name(),
            max_auto_retries=form.max_auto_retries.data,
            retry_backoff_seconds=form.retry_backoff_seconds.data,
            circuit_failure_threshold=form.circuit_failure_threshold.data,
            circuit_cooldown_seconds=form.circuit_cooldown_seconds.data,
        ),
        lambda conn: _back(".connections_page", f"Retry policy of {conn.name} saved."),
        error_for=connection_id,
    )


# --- SLA policy -----------------------------------------------------------------------------------

DEFAULT_WINDOWS = (
    ("unknown_outcome", "any", int(DEFAULT_UNKNOWN_OUTCOME.total_seconds() // 60)),
    ("any other", "high", int(DEFAULT_HIGH_RISK.total_seconds() // 60)),
    ("any other", "normal", int(DEFAULT_OTHER.total_seconds() // 60)),
)


def _customer_choices(customer_list) -> list:
    return options([("", "every customer")] + [(c.id, c.name) for c in customer_list])


def _sla_page(
    *, form: SlaRuleForm | None = None, status: int = 200, error: str | None = None, error_for=None
):
    with unit_of_work(read_only=True) as s:
        context = admin.sla_overview(s)
    form = form or SlaRuleForm(formdata=None)
    form.customer_id.choices = _customer_choices(context["customers"])
    return (
        render_template(
            "admin/sla.html",
            rules=context["rules"],
            form=form,
            defaults=DEFAULT_WINDOWS,
            error=error,
            error_for=error_for,
        ),
        status,
    )


@bp.route("/admin/sla")
@requires(Permission.ADMIN)
def sla_page():
    """SLA policy rules (category × clinical risk × optional customer) and the built-in defaults."""
    return _sla_page()


@bp.route("/admin/sla", methods=["POST"])
@requires(Permission.ADMIN)
def add_sla_rule():
    """Add an SLA rule."""
    form = SlaRuleForm()
    with unit_of_work(read_only=True) as s:
        form.customer_id.choices = _customer_choices(admin.sla_overview(s)["customers"])
    return _submit(
        form,
        _sla_page,
        lambda s: admin.add_sla_rule(
            s,
            minutes=form.minutes.data,
            category=form.category.data or None,
            risk=form.risk.data or None,
            customer_id=int(form.customer_id.data) if form.customer_id.data else None,
            actor=_actor_name(),
        ),
        lambda _rule: _back(".sla_page", "SLA rule added; it applies to exceptions opened from now on."),
        form=form,
    )


@bp.route("/admin/sla/<int:rule_id>", methods=["POST"])
@requires(Permission.ADMIN)
def update_sla_rule(rule_id: int):
    """Change one rule's minutes."""
    form = SlaEditForm()
    return _submit(
        form,
        _sla_page,
        lambda s: admin.update_sla_rule(s, rule_id, form.minutes.data, actor=_actor_name()),
        lambda _rule: _back(".sla_page", f"SLA rule {rule_id} saved."),
        error_for=rule_id,
    )


@bp.route("/admin/sla/<int:rule_id>/delete", methods=["POST"])
@requires(Permission.ADMIN)
def delete_sla_rule(rule_id: int):
    """Delete one rule (confirmed, with a reason)."""
    form = DestructiveForm()
    return _submit(
        form,
        _sla_page,
        lambda s: admin.delete_sla_rule(s, rule_id, actor=_actor_name(), reason=form.reason.data),
        lambda _none: _back(".sla_page", f"SLA rule {rule_id} deleted."),
        error_for=rule_id,
    )
