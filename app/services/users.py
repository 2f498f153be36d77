"""Users, passwords (argon2id) and personal API tokens (stored hashed)."""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta

import sqlalchemy as sa
import sqlalchemy.orm as so
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from app.db.models import ApiToken, ApprovalFailure, EnrollmentLink, User
from app.domain.errors import Conflict, Forbidden, Invalid, NotFound
from app.domain.roles import Permission, Role, has_permission

from . import audit
from .clock import utcnow

_hasher = PasswordHasher()  # argon2id with the library's current recommended parameters
TOKEN_PREFIX = "rcn_"
DEFAULT_TOKEN_DAYS = 90
MAX_TOKEN_DAYS = 365
DEFAULT_ENROLLMENT_HOURS = 72
APPROVAL_FAILURE_LIMIT = 5
APPROVAL_FAILURE_WINDOW = timedelta(minutes=15)
TOUCH_EVERY = timedelta(minutes=1)  # a token's last-used time is written at most this often

# Bumped after any commit that changes who a token speaks for (revocation, deactivation, role):
# the web app's token cache (app/web/access.py) drops everything it holds when it changes.
_token_generation = [0]


def token_generation() -> int:
    return _token_generation[0]


def tokens_changed(session: so.Session) -> None:
    """After this transaction commits, every cached token check in this process is dropped."""
    from app.db.session import after_commit

    def bump(_factory) -> None:
        _token_generation[0] += 1

    after_commit(session, "users.tokens_changed", bump)


def hash_password(password: str) -> str:
    return _hasher.hash(password)


_dummy_hash: str | None = None


def _hash_for_missing_user() -> str:
    """A real argon2id hash of a random password, made once per process: unknown users are
    verified against it, so a login costs the same whether the name exists or not."""
    global _dummy_hash
    if _dummy_hash is None:
        _dummy_hash = _hasher.hash(secrets.token_urlsafe(24))
    return _dummy_hash


def authenticate(session: so.Session, username: str, password: str) -> tuple[User | None, User | None]:
    """(the user who may log in, or None; the account the name belongs to, or None).

    Exactly one argon2 verification runs on every path — unknown name, service or inactive
    account, no password, wrong password — so the time taken does not tell which it was."""
    stored_for_missing = _hash_for_missing_user()  # made before the lookup: the first call costs the same
    account = by_username(session, username)
    usable = (
        account is not None
        and account.active
        and bool(account.password_hash)
        and has_permission(account.role, Permission.CONSOLE_LOGIN)
    )
    try:
        verified = _hasher.verify(account.password_hash if usable else stored_for_missing, password or "-")
    except (VerificationError, InvalidHashError):
        verified = False
    return (account if usable and verified else None), account


def end_sessions(user: User) -> None:
    """End every console session of this user (logout, password change, deactivation): sessions
    carry the epoch they were opened under, and one that no longer matches is refused."""
    user.session_epoch = (user.session_epoch or 0) + 1


def set_password(session: so.Session, user: User, password: str, *, actor: str) -> None:
    """Change a console user's password; every session they have open ends."""
    if user.role == Role.SERVICE.value:
        raise Invalid("service accounts have no password (API tokens only)")
    if not password or len(password) < 8:
        raise Invalid("password must be at least 8 characters")
    user.password_hash = hash_password(password)
    if actor == user.username:
        user.enrolled_by_id = None  # the password is now known to its owner only
    end_sessions(user)
    audit.record(
        session,
        actor=actor,
        action="user.password_change",
        subject_type="user",
        subject_id=user.id,
        details={"username": user.username, "sessions_ended": True},
    )


def check_password(user: User, password: str) -> bool:
    if not user.password_hash or not password:
        return False
    try:
        return _hasher.verify(user.password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def create_user(
    session: so.Session,
    username: str,
    role: str,
    password: str | None,
    *,
    actor: str = "system:cli",
    created_by: User | None = None,
) -> User:
    """Create a user; `service` users have no password (API tokens only).

    `created_by` is the console admin who created the account (None: the CLI operator). An admin
    never sets a human's password: the account is made without one and `issue_enrollment_link`
    gives the new user a one-time link to set it themselves. The CLI may pass a password
    (bootstrapping). Every grant of the clinical-lead role is audited as such."""
    try:
        role = Role(role)
    except ValueError:
        raise Invalid(f"unknown role {role!r}") from None
    if not username or len(username) > 80:
        raise Invalid("username must be 1-80 characters")
    if session.scalar(sa.select(User).where(User.username == username)):
        raise Conflict(f"user {username!r} exists")
    if created_by is not None and password:
        raise Invalid("an admin does not set another person's password; they enroll with a link")
    if role is not Role.SERVICE and not password and created_by is None:
        raise Invalid("console users need a password")
    if password is not None and len(password) < 8 and role is not Role.SERVICE:
        raise Invalid("password must be at least 8 characters")
    user = User(
        username=username,
        role=role.value,
        password_hash=hash_password(password) if password else None,
        active=True,
        created_at=utcnow(),
        created_by_id=created_by.id if created_by is not None else None,
    )
    session.add(user)
    session.flush()
    audit.record(
        session,
        actor=actor,
        action="user.create",
        subject_type="user",
        subject_id=user.id,
        details={"username": username, "role": role.value},
    )
    if role is Role.CLINICAL_LEAD:
        _audit_lead_grant(session, user, actor=actor, previous_role=None)
    return user


LEAD_GRANT_ACTION = "user.clinical_lead_grant"


def _audit_lead_grant(session: so.Session, user: User, *, actor: str, previous_role: str | None) -> None:
    audit.record(
        session,
        actor=actor,
        action=LEAD_GRANT_ACTION,
        subject_type="user",
        subject_id=user.id,
        from_state=previous_role,
        to_state=Role.CLINICAL_LEAD.value,
        details={"username": user.username, "previous_role": previous_role},
    )


def clinical_lead_grants(session: so.Session, limit: int = 200) -> list:
    """Audited grants of the clinical-lead role, newest first (admin users page)."""
    from app.db.models import AuditEvent

    return list(
        session.scalars(
            sa.select(AuditEvent)
            .where(AuditEvent.action == LEAD_GRANT_ACTION)
            .order_by(AuditEvent.id.desc())
            .limit(limit)
        )
    )


def set_role(session: so.Session, user: User, role: str, *, actor: User) -> User:
    """Change a user's role (audited; a grant of clinical_lead is audited as a grant too)."""
    try:
        new = Role(role)
    except ValueError:
        raise Invalid(f"unknown role {role!r}") from None
    if user.id == actor.id:
        raise Conflict("you cannot change your own role")
    if (user.role == Role.SERVICE.value) != (new is Role.SERVICE):
        raise Invalid("a service account and a person's account cannot be turned into each other")
    before = user.role
    if before == new.value:
        return user
    user.role = new.value
    end_sessions(user)  # the new role applies from the next login
    tokens_changed(session)
    session.flush()
    audit.record(
        session,
        actor=actor.username,
        action="user.role_change",
        subject_type="user",
        subject_id=user.id,
        from_state=before,
        to_state=new.value,
        details={"username": user.username},
    )
    if new is Role.CLINICAL_LEAD:
        _audit_lead_grant(session, user, actor=actor.username, previous_role=before)
    return user


def issue_enrollment_link(
    session: so.Session,
    user: User,
    *,
    actor: User,
    hours: int = DEFAULT_ENROLLMENT_HOURS,
    reason: str | None = None,
) -> str:
    """A one-time secret (stored hashed, expiring) with which `user` sets their own password.

    Used for a new account and for a reset: a reset also clears the current password and ends
    every session, so the admin never holds a usable password of another person. Earlier
    unused links of the user stop working."""
    if user.role == Role.SERVICE.value:
        raise Invalid("service accounts have no password (API tokens only)")
    if user.id == actor.id:
        raise Conflict("change your own password while logged in, not through a reset link")
    now = utcnow()
    for old in session.scalars(
        sa.select(EnrollmentLink).where(EnrollmentLink.user_id == user.id, EnrollmentLink.used_at.is_(None))
    ):
        old.used_at = now  # superseded
    reset = user.password_hash is not None
    if reset:
        user.password_hash = None
        end_sessions(user)
    secret = secrets.token_urlsafe(32)
    link = EnrollmentLink(
        user_id=user.id,
        token_hash=token_hash(secret),
        created_by_id=actor.id,
        created_at=now,
        expires_at=now + timedelta(hours=hours),
    )
    session.add(link)
    session.flush()
    audit.record(
        session,
        actor=actor.username,
        action="user.password_reset" if reset else "user.enrollment_link",
        subject_type="user",
        subject_id=user.id,
        reason=reason or None,
        details={
            "username": user.username,
            "link_id": link.id,
            "expires_at": link.expires_at.isoformat() + "Z",
        },
    )
    return secret


def enrollment_for(session: so.Session, secret: str) -> EnrollmentLink | None:
    """The unused, unexpired link for this secret, or None."""
    link = session.scalar(
        sa.select(EnrollmentLink).where(EnrollmentLink.token_hash == token_hash(secret or ""))
    )
    if link is None or link.used_at is not None or link.expires_at <= utcnow():
        return None
    user = session.get(User, link.user_id)
    return link if user is not None and user.active else None


def complete_enrollment(session: so.Session, secret: str, password: str) -> User:
    """Set the password through a one-time link; the link is spent."""
    link = enrollment_for(session, secret)
    if link is None:
        raise NotFound("this link is invalid, used or expired; ask an administrator for a new one")
    user = session.get(User, link.user_id)
    if not password or len(password) < 8:
        raise Invalid("password must be at least 8 characters")
    link.used_at = utcnow()
    user.enrolled_by_id = link.created_by_id  # whoever held this link could have set the password
    user.password_hash = hash_password(password)
    end_sessions(user)
    session.flush()
    audit.record(
        session,
        actor=user.username,
        action="user.enrolled",
        subject_type="user",
        subject_id=user.id,
        details={"username": user.username, "link_id": link.id},
    )
    return user


def token_hash(token: str) -> str:
    """What is stored of a token (and what the web app's token cache is keyed by)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_token(
    session: so.Session,
    user: User,
    *,
    actor: str = "system:cli",
    days: int = DEFAULT_TOKEN_DAYS,
    created_by: User | None = None,
) -> str:
    """Return a new bearer token that expires after `days`; only its SHA-256 is stored.

    Callers enforce who may mint for whom: the CLI (actor system:cli) for any user; a console
    admin for service accounts only (`create_service_token`); a person for themselves only
    (`create_personal_token`)."""
    if not isinstance(days, int) or not 1 <= days <= MAX_TOKEN_DAYS:
        raise Invalid(f"a token expires after 1 to {MAX_TOKEN_DAYS} days")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    now = utcnow()
    row = ApiToken(
        user_id=user.id,
        token_hash=token_hash(token),
        prefix=token[:10],
        created_at=now,
        expires_at=now + timedelta(days=days),
        created_by_id=created_by.id if created_by is not None else None,
    )
    session.add(row)
    session.flush()
    audit.record(
        session,
        actor=actor,
        action="token.create",
        subject_type="user",
        subject_id=user.id,
        details={
            "token_id": row.id,
            "prefix": row.prefix,
            "owner": user.username,
            "expires_at": row.expires_at.isoformat() + "Z",
        },
    )
    return token


def create_service_token(
    session: so.Session, user: User, *, actor: User, days: int = DEFAULT_TOKEN_DAYS
) -> str:
    """An admin mints a token for a `service` account only: a token for a person would let the
    admin act as them (issue 7)."""
    if user.role != Role.SERVICE.value:
        raise Forbidden(
            "admins create tokens for service accounts only; a person creates their own on My tokens",
            code="token_for_person",
        )
    if not user.active:
        raise Conflict("this account is deactivated")
    return create_token(session, user, actor=actor.username, days=days, created_by=actor)


def create_personal_token(session: so.Session, user: User, *, days: int = DEFAULT_TOKEN_DAYS) -> str:
    """A person's own token, made while logged in as themselves."""
    return create_token(session, user, actor=user.username, days=days, created_by=user)


def personal_tokens(session: so.Session, user: User) -> list[ApiToken]:
    return list(
        session.scalars(sa.select(ApiToken).where(ApiToken.user_id == user.id).order_by(ApiToken.id.desc()))
    )


def revoke_own_token(session: so.Session, user: User, token_id: int) -> ApiToken:
    token = session.get(ApiToken, token_id)
    if token is None or token.user_id != user.id:
        raise NotFound(f"token {token_id} not found")
    if token.revoked_at is not None:
        raise Conflict("this token is already revoked")
    token.revoked_at = utcnow()
    tokens_changed(session)
    session.flush()
    audit.record(
        session,
        actor=user.username,
        action="token.revoke",
        subject_type="user",
        subject_id=user.id,
        details={"token_id": token.id, "prefix": token.prefix},
    )
    return token


def token_status(session: so.Session, token: str) -> tuple[User | None, str, bool]:
    """(the user, "ok", whether its last-used time is stale) for a usable token,
    else (None, "invalid" | "expired", False)."""
    return token_check(session, token)[:3]


def token_check(session: so.Session, token: str) -> tuple[User | None, str, bool, datetime | None]:
    """token_status and the token's expiry. One statement: the token with its user."""
    found = session.execute(
        sa.select(ApiToken.expires_at, ApiToken.last_used_at, User)
        .join(User, User.id == ApiToken.user_id)
        .where(ApiToken.token_hash == token_hash(token), ApiToken.revoked_at.is_(None))
    ).first()
    if found is None:
        return None, "invalid", False, None
    expires_at, last_used_at, user = found
    if not user.active:
        return None, "invalid", False, None
    now = utcnow()
    if expires_at is not None and expires_at <= now:
        return None, "expired", False, expires_at
    return user, "ok", last_used_at is None or last_used_at < now - TOUCH_EVERY, expires_at


def user_for_token(session: so.Session, token: str) -> User | None:
    return token_status(session, token)[0]


def touch_token(session: so.Session, token: str) -> None:
    """Record the token's last use (at most once a minute, so reads do not all write)."""
    now = utcnow()
    session.execute(
        sa.update(ApiToken)
        .where(
            ApiToken.token_hash == token_hash(token),
            sa.or_(ApiToken.last_used_at.is_(None), ApiToken.last_used_at < now - TOUCH_EVERY),
        )
        .values(last_used_at=now)
    )


# --- approval password throttle ------------------------------------------------------------------


def approval_locked(user: User) -> bool:
    return user.approval_locked_at is not None


def record_approval_password_failure(
    session: so.Session,
    user_id: int,
    *,
    exception_id: int | None = None,
    subject_type: str = "exception",
    subject_id: int | None = None,
) -> bool:
    """Audit one wrong approval password and lock approvals after the fifth within 15 minutes.

    The subject is the exception approved, or another subject (a bulk replay batch). Runs in its
    own transaction after the refused decision rolled back. Returns True if the account is (now)
    locked."""
    user = session.get(User, user_id)
    if user is None:
        return False
    now = utcnow()
    session.add(ApprovalFailure(user_id=user.id, failed_at=now))
    session.flush()
    since = now - APPROVAL_FAILURE_WINDOW
    if user.approval_lock_cleared_at is not None and user.approval_lock_cleared_at > since:
        since = user.approval_lock_cleared_at
    count = session.scalar(
        sa.select(sa.func.count())
        .select_from(ApprovalFailure)
        .where(ApprovalFailure.user_id == user.id, ApprovalFailure.failed_at >= since)
    )
    audit.record(
        session,
        actor=user.username,
        action="approval.password_failed",
        subject_type=subject_type,
        subject_id=exception_id if subject_id is None else subject_id,
        details={"failures_in_window": count, "window_minutes": 15},
    )
    if count >= APPROVAL_FAILURE_LIMIT and user.approval_locked_at is None:
        user.approval_locked_at = now
        audit.record(
            session,
            actor="system:throttle",
            action="approval.locked",
            subject_type="user",
            subject_id=user.id,
            details={"username": user.username, "failures": count, "window_minutes": 15},
        )
    return user.approval_locked_at is not None


def clear_approval_lock(session: so.Session, user_id: int, *, actor: User) -> User:
    user = session.get(User, user_id)
    if user is None:
        raise NotFound(f"user {user_id} not found")
    if user.approval_locked_at is None:
        raise Conflict("this account's approvals are not locked")
    if user.id == actor.id:
        raise Conflict("another administrator must clear your own approval lock")
    locked_at = user.approval_locked_at
    now = utcnow()
    user.approval_locked_at = None
    user.approval_lock_cleared_at = now
    session.flush()
    audit.record(
        session,
        actor=actor.username,
        action="approval.lock_cleared",
        subject_type="user",
        subject_id=user.id,
        details={"username": user.username, "locked_at": locked_at.isoformat() + "Z"},
    )
    return user


def by_username(session: so.Session, username: str) -> User | None:
    return session.scalar(sa.select(User).where(User.username == username))


def get(session: so.Session, user_id: int) -> User:
    """One user by id, or NotFound."""
    user = session.get(User, user_id)
    if user is None:
        raise NotFound(f"user {user_id} not found")
    return user


def active_user(session: so.Session, user_id: int) -> User | None:
    """The user behind a console session, if the account still exists and is active."""
    user = session.get(User, user_id)
    return user if user is not None and user.active else None


def log_out(session: so.Session, user_id: int) -> User:
    """Log out everywhere: every session of this user ends, including a copied cookie (audited)."""
    user = get(session, user_id)
    end_sessions(user)
    audit.record(session, actor=user.username, action="auth.logout", subject_type="user", subject_id=user.id)
    return user
