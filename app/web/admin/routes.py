"""Admin: users and roles, API tokens, customers and connections, SLA policy. Every change is audited
by the service it goes through, in the same unit of work."""

from __future__ import annotations

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
)

from app.db.models import Connection, User
from app.domain.delivery import Category, Protocol
from app.domain.errors import DomainError, NotFound
from app.domain.roles import Permission, Role
from app.domain.sla import DEFAULT_HIGH_RISK, DEFAULT_OTHER, DEFAULT_UNKNOWN_OUTCOME
from app.services import admin, connections, queries, users

from ..access import current_actor, requires
from ..console import first_error, labelled, options
from ..extensions import unit_of_work
from . import bp

# --- forms ----------------------------------------------------------------------------------------


class ConfirmForm(FlaskForm):
    """A button that changes something: CSRF and nothing else."""


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
    active = HiddenField(validators=[DataRequired(), AnyOf(["0", "1"])])


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


# --- overview -------------------------------------------------------------------------------------


@bp.route("/admin")
@requires(Permission.ADMIN)
def index():
    """Admin landing page with the state of each area."""
    with unit_of_work(read_only=True) as s:
        user_list = queries.all_users(s)
        conns = queries.connections_overview(s)
        rules = queries.sla_rules(s)
        tokens = queries.api_tokens(s)
        circuits = {c.id: connections.circuit_state(c) for c in conns}
    return render_template(
        "admin/index.html",
        users=user_list,
        connections=conns,
        circuits=circuits,
        rules=rules,
        active_tokens=[t for t in tokens if t.revoked_at is None],
    )


# --- users ----------------------------------------------------------------------------------------


def _users_page(*, form: UserForm | None = None, status: int = 200, error: str | None = None, new_link=None):
    with unit_of_work(read_only=True) as s:
        user_list = queries.all_users(s)
        grants = users.clinical_lead_grants(s)
        creators = {u.id: u.username for u in user_list}
    response = make_response(
        render_template(
            "admin/users.html",
            users=user_list,
            creators=creators,
            grants=grants,
            form=form or UserForm(formdata=None),
            person_roles=[r.value for r in Role if r is not Role.SERVICE],
            toggle=ActiveForm(formdata=None),
            confirm=ConfirmForm(formdata=None),
            error=error,
            new_link=new_link,
        ),
        status,
    )
    if new_link:
        response.headers["Cache-Control"] = "no-store"  # the link is shown once
    return response


def _link_for(secret: str) -> str:
    return url_for("account.enroll", secret=secret, _external=True)


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
    if not form.validate():
        return _users_page(form=form, status=422, error=first_error(form))
    try:
        with unit_of_work() as s:
            me = s.get(User, current_actor().id)
            user = users.create_user(
                s, form.username.data, form.role.data, None, actor=me.username, created_by=me
            )
            secret = None if user.role == Role.SERVICE else users.issue_enrollment_link(s, user, actor=me)
            name = user.username
    except DomainError as exc:
        return _users_page(form=form, status=exc.http_status, error=exc.message)
    if secret is None:
        flash(f"Service user {name} created; give it an API token.", "success")
        return redirect(url_for(".users_page"), code=303)
    return _users_page(
        new_link={"username": name, "url": _link_for(secret), "hours": users.DEFAULT_ENROLLMENT_HOURS}
    )


@bp.route("/admin/users/<int:user_id>/reset", methods=["POST"])
@requires(Permission.ADMIN)
def reset_password(user_id: int):
    """Reset a person's password: the old one stops working, every session ends, and a new
    one-time link (not a password) is shown once for the user."""
    form = ConfirmForm()
    if not form.validate():
        return _users_page(status=422, error=first_error(form))
    try:
        with unit_of_work() as s:
            user = s.get(User, user_id)
            if user is None:
                raise NotFound(f"user {user_id} not found")
            secret = users.issue_enrollment_link(s, user, actor=s.get(User, current_actor().id))
            name = user.username
    except DomainError as exc:
        return _users_page(status=exc.http_status, error=exc.message)
    return _users_page(
        new_link={"username": name, "url": _link_for(secret), "hours": users.DEFAULT_ENROLLMENT_HOURS}
    )


@bp.route("/admin/users/<int:user_id>/role", methods=["POST"])
@requires(Permission.ADMIN)
def set_role(user_id: int):
    """Change a user's role (a clinical-lead grant is audited and listed)."""
    form = RoleForm()
    if not form.validate():
        return _users_page(status=422, error=first_error(form))
    try:
        with unit_of_work() as s:
            user = s.get(User, user_id)
            if user is None:
                raise NotFound(f"user {user_id} not found")
            users.set_role(s, user, form.role.data, actor=s.get(User, current_actor().id))
            name, role = user.username, user.role
    except DomainError as exc:
        return _users_page(status=exc.http_status, error=exc.message)
    flash(f"{name} is now {role.replace('_', ' ')}.", "success")
    return redirect(url_for(".users_page"), code=303)


@bp.route("/admin/users/<int:user_id>/approval-lock", methods=["POST"])
@requires(Permission.ADMIN)
def clear_approval_lock(user_id: int):
    """Clear approval lock: after 5 wrong approval passwords in 15 minutes (audited)."""
    form = ConfirmForm()
    if not form.validate():
        return _users_page(status=422, error=first_error(form))
    try:
        with unit_of_work() as s:
            name = users.clear_approval_lock(s, user_id, actor=s.get(User, current_actor().id)).username
    except DomainError as exc:
        return _users_page(status=exc.http_status, error=exc.message)
    flash(f"Approval lock of {name} cleared.", "success")
    return redirect(url_for(".users_page"), code=303)


@bp.route("/admin/users/<int:user_id>/active", methods=["POST"])
@requires(Permission.ADMIN)
def set_user_active(user_id: int):
    """Deactivate or reactivate a user."""
    form = ActiveForm()
    if not form.validate():
        return _users_page(status=422, error=first_error(form))
    try:
        with unit_of_work() as s:
            user = admin.set_user_active(s, user_id, form.active.data == "1", actor=current_actor())
            name, active = user.username, user.active
    except DomainError as exc:
        return _users_page(status=exc.http_status, error=exc.message)
    flash(f"User {name} {'reactivated' if active else 'deactivated'}.", "success")
    return redirect(url_for(".users_page"), code=303)


# --- API tokens -----------------------------------------------------------------------------------


def _service_accounts(s) -> list[User]:
    return [u for u in queries.all_users(s) if u.active and u.role == Role.SERVICE]


def _tokens_page(
    *, form: TokenForm | None = None, status: int = 200, error: str | None = None, new_token=None
):
    with unit_of_work(read_only=True) as s:
        tokens = queries.api_tokens(s)
        candidates = _service_accounts(s)
    form = form or TokenForm(formdata=None)
    form.user_id.choices = options((u.id, u.username) for u in candidates)
    response = make_response(
        render_template(
            "admin/tokens.html",
            tokens=tokens,
            form=form,
            confirm=ConfirmForm(formdata=None),
            error=error,
            new_token=new_token,
        ),
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
        form.user_id.choices = options((u.id, u.username) for u in queries.all_users(s) if u.active)
    if not form.validate():
        return _tokens_page(form=form, status=422, error=first_error(form))
    try:
        with unit_of_work() as s:
            user = s.get(User, int(form.user_id.data))
            if user is None:
                raise NotFound("user not found")
            token = users.create_service_token(
                s,
                user,
                actor=s.get(User, current_actor().id),
                days=form.days.data or users.DEFAULT_TOKEN_DAYS,
            )
            owner = user.username
    except DomainError as exc:
        return _tokens_page(status=exc.http_status, error=exc.message)
    return _tokens_page(new_token={"token": token, "username": owner})


@bp.route("/admin/tokens/<int:token_id>/revoke", methods=["POST"])
@requires(Permission.ADMIN)
def revoke_token(token_id: int):
    """Revoke a token; requests with it fail from now on."""
    form = ConfirmForm()
    if not form.validate():
        return _tokens_page(status=422, error=first_error(form))
    try:
        with unit_of_work() as s:
            admin.revoke_token(s, token_id, actor=_actor_name())
    except DomainError as exc:
        return _tokens_page(status=exc.http_status, error=exc.message)
    flash(f"Token {token_id} revoked.", "success")
    return redirect(url_for(".tokens_page"), code=303)


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
        conns = queries.connections_overview(s)
        customer_list = queries.customers(s)
        circuits = {c.id: connections.circuit_state(c) for c in conns}
    connection_form = connection_form or ConnectionForm(formdata=None)
    connection_form.customer.choices = options((c.name, c.name) for c in customer_list)
    return (
        render_template(
            "admin/connections.html",
            connections=conns,
            customers=customer_list,
            circuits=circuits,
            customer_form=customer_form or CustomerForm(formdata=None),
            connection_form=connection_form,
            confirm=ConfirmForm(formdata=None),
            error=error,
            error_for=error_for,
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
    if not form.validate():
        return _connections_page(customer_form=form, status=422, error=first_error(form))
    try:
        with unit_of_work() as s:
            connections.add_customer(s, form.name.data, actor=_actor_name())
    except DomainError as exc:
        return _connections_page(customer_form=form, status=exc.http_status, error=exc.message)
    flash(f"Customer {form.name.data} added.", "success")
    return redirect(url_for(".connections_page"), code=303)


@bp.route("/admin/connections", methods=["POST"])
@requires(Permission.ADMIN)
def add_connection():
    """Add a connection (audited by connections.add_connection)."""
    form = ConnectionForm()
    with unit_of_work(read_only=True) as s:
        form.customer.choices = options((c.name, c.name) for c in queries.customers(s))
    if not form.validate():
        return _connections_page(connection_form=form, status=422, error=first_error(form))
    message_types = [t.strip() for t in (form.message_types.data or "").split(",") if t.strip()]
    try:
        with unit_of_work() as s:
            connections.add_connection(
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
            )
    except DomainError as exc:
        return _connections_page(connection_form=form, status=exc.http_status, error=exc.message)
    flash(f"Connection {form.name.data} added.", "success")
    return redirect(url_for(".connections_page"), code=303)


@bp.route("/admin/connections/<int:connection_id>/enabled", methods=["POST"])
@requires(Permission.ADMIN)
def set_connection_enabled(connection_id: int):
    """Enable or disable a connection."""
    form = ActiveForm()
    if not form.validate():
        return _connections_page(status=422, error=first_error(form), error_for=connection_id)
    try:
        with unit_of_work() as s:
            conn = admin.set_connection_enabled(
                s, connection_id, form.active.data == "1", actor=_actor_name()
            )
            name, enabled = conn.name, conn.enabled
    except DomainError as exc:
        return _connections_page(status=exc.http_status, error=exc.message, error_for=connection_id)
    flash(f"Connection {name} {'enabled' if enabled else 'disabled'}.", "success")
    return redirect(url_for(".connections_page"), code=303)


@bp.route("/admin/connections/<int:connection_id>/test", methods=["POST"])
@requires(Permission.ADMIN)
def test_connection(connection_id: int):
    """Probe the EHR through its adapter (no message is delivered); show and audit the result."""
    form = ConfirmForm()
    if not form.validate():
        return _connections_page(status=422, error=first_error(form), error_for=connection_id)
    with unit_of_work(read_only=True) as s:
        conn = s.get(Connection, connection_id)
        if conn is None:
            raise NotFound(f"connection {connection_id} not found")
        settings, name = connections.settings_for(conn), conn.name
    # The network call happens outside any transaction: never hold the database while waiting on an EHR.
    try:
        from app.adapters.ehr.base import adapter_for

        # Only the connection's own endpoint, and only one that is valid for its protocol (a row
        # stored before endpoints were validated is refused, not probed).
        connections.validated_endpoint(settings.protocol, settings.endpoint)
        with adapter_for(settings) as adapter:
            result = dict(adapter.check_connection())
    except DomainError as exc:
        result = {"ok": False, "detail": f"not probed: {exc.message}"}
    except Exception as exc:  # a failed probe is a result to show, not a 500
        result = {"ok": False, "detail": f"{type(exc).__name__}: {exc}"}
    with unit_of_work() as s:
        admin.record_connection_test(s, connection_id, result, actor=_actor_name())
    detail = str(result.get("detail") or "")[:300]
    if result.get("ok"):
        flash(f"{name}: connection OK. {detail}".strip(), "success")
    else:
        flash(f"{name}: connection test failed. {detail}".strip(), "error")
    return redirect(url_for(".connections_page"), code=303)


@bp.route("/admin/connections/<int:connection_id>/circuit", methods=["POST"])
@requires(Permission.ADMIN)
def reset_circuit(connection_id: int):
    """Close a connection's circuit breaker."""
    form = ConfirmForm()
    if not form.validate():
        return _connections_page(status=422, error=first_error(form), error_for=connection_id)
    try:
        with unit_of_work() as s:
            name = admin.reset_circuit(s, connection_id, actor=_actor_name()).name
    except DomainError as exc:
        return _connections_page(status=exc.http_status, error=exc.message, error_for=connection_id)
    flash(f"Circuit of {name} reset (closed).", "success")
    return redirect(url_for(".connections_page"), code=303)


@bp.route("/admin/connections/<int:connection_id>/retry", methods=["POST"])
@requires(Permission.ADMIN)
def retry_policy(connection_id: int):
    """Edit a connection's retry and circuit-breaker policy."""
    form = RetryPolicyForm()
    if not form.validate():
        return _connections_page(status=422, error=first_error(form), error_for=connection_id)
    try:
        with unit_of_work() as s:
            name = admin.update_retry_policy(
                s,
                connection_id,
                actor=_actor_name(),
                max_auto_retries=form.max_auto_retries.data,
                retry_backoff_seconds=form.retry_backoff_seconds.data,
                circuit_failure_threshold=form.circuit_failure_threshold.data,
                circuit_cooldown_seconds=form.circuit_cooldown_seconds.data,
            ).name
    except DomainError as exc:
        return _connections_page(status=exc.http_status, error=exc.message, error_for=connection_id)
    flash(f"Retry policy of {name} saved.", "success")
    return redirect(url_for(".connections_page"), code=303)


# --- SLA policy -----------------------------------------------------------------------------------

DEFAULT_WINDOWS = (
    ("unknown_outcome", "any", int(DEFAULT_UNKNOWN_OUTCOME.total_seconds() // 60)),
    ("any other", "high", int(DEFAULT_HIGH_RISK.total_seconds() // 60)),
    ("any other", "normal", int(DEFAULT_OTHER.total_seconds() // 60)),
)


def _sla_page(
    *, form: SlaRuleForm | None = None, status: int = 200, error: str | None = None, error_for=None
):
    with unit_of_work(read_only=True) as s:
        rules = queries.sla_rules(s)
        customer_list = queries.customers(s)
    form = form or SlaRuleForm(formdata=None)
    form.customer_id.choices = options([("", "every customer")] + [(c.id, c.name) for c in customer_list])
    return (
        render_template(
            "admin/sla.html",
            rules=rules,
            form=form,
            edit=SlaEditForm(formdata=None),
            confirm=ConfirmForm(formdata=None),
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
        form.customer_id.choices = options(
            [("", "every customer")] + [(c.id, c.name) for c in queries.customers(s)]
        )
    if not form.validate():
        return _sla_page(form=form, status=422, error=first_error(form))
    try:
        with unit_of_work() as s:
            admin.add_sla_rule(
                s,
                minutes=form.minutes.data,
                category=form.category.data or None,
                risk=form.risk.data or None,
                customer_id=int(form.customer_id.data) if form.customer_id.data else None,
                actor=_actor_name(),
            )
    except DomainError as exc:
        return _sla_page(form=form, status=exc.http_status, error=exc.message)
    flash("SLA rule added; it applies to exceptions opened from now on.", "success")
    return redirect(url_for(".sla_page"), code=303)


@bp.route("/admin/sla/<int:rule_id>", methods=["POST"])
@requires(Permission.ADMIN)
def update_sla_rule(rule_id: int):
    """Change one rule's minutes."""
    form = SlaEditForm()
    if not form.validate():
        return _sla_page(status=422, error=first_error(form), error_for=rule_id)
    try:
        with unit_of_work() as s:
            admin.update_sla_rule(s, rule_id, form.minutes.data, actor=_actor_name())
    except DomainError as exc:
        return _sla_page(status=exc.http_status, error=exc.message, error_for=rule_id)
    flash(f"SLA rule {rule_id} saved.", "success")
    return redirect(url_for(".sla_page"), code=303)


@bp.route("/admin/sla/<int:rule_id>/delete", methods=["POST"])
@requires(Permission.ADMIN)
def delete_sla_rule(rule_id: int):
    """Delete one rule."""
    form = ConfirmForm()
    if not form.validate():
        return _sla_page(status=422, error=first_error(form), error_for=rule_id)
    try:
        with unit_of_work() as s:
            admin.delete_sla_rule(s, rule_id, actor=_actor_name())
    except DomainError as exc:
        return _sla_page(status=exc.http_status, error=exc.message, error_for=rule_id)
    flash(f"SLA rule {rule_id} deleted.", "success")
    return redirect(url_for(".sla_page"), code=303)
