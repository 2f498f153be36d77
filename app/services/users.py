"""Users, passwords (argon2id) and personal API tokens (stored hashed)."""

from __future__ import annotations

import hashlib
import secrets

import sqlalchemy as sa
import sqlalchemy.orm as so
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from app.db.models import ApiToken, User
from app.domain.errors import Conflict, Invalid
from app.domain.roles import Permission, Role, has_permission

from . import audit
from .clock import utcnow

_hasher = PasswordHasher()  # argon2id with the library's current recommended parameters
TOKEN_PREFIX = "rcn_"


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
    session: so.Session, username: str, role: str, password: str | None, *, actor: str = "system:cli"
) -> User:
    """Create a user; `service` users have no password (API tokens only)."""
    try:
        role = Role(role)
    except ValueError:
        raise Invalid(f"unknown role {role!r}") from None
    if not username or len(username) > 80:
        raise Invalid("username must be 1-80 characters")
    if session.scalar(sa.select(User).where(User.username == username)):
        raise Conflict(f"user {username!r} exists")
    if role is not Role.SERVICE and not password:
        raise Invalid("console users need a password")
    if password is not None and len(password) < 8 and role is not Role.SERVICE:
        raise Invalid("password must be at least 8 characters")
    user = User(
        username=username,
        role=role.value,
        password_hash=hash_password(password) if password else None,
        active=True,
        created_at=utcnow(),
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
    return user


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_token(session: so.Session, user: User, *, actor: str = "system:cli") -> str:
    """Return a new bearer token; only its SHA-256 is stored."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(user_id=user.id, token_hash=_token_hash(token), prefix=token[:10], created_at=utcnow())
    session.add(row)
    session.flush()
    audit.record(
        session,
        actor=actor,
        action="token.create",
        subject_type="user",
        subject_id=user.id,
        details={"token_id": row.id, "prefix": row.prefix},
    )
    return token


def user_for_token(session: so.Session, token: str) -> User | None:
    return session.scalar(
        sa.select(User)
        .join(ApiToken, ApiToken.user_id == User.id)
        .where(
            ApiToken.token_hash == _token_hash(token), ApiToken.revoked_at.is_(None), User.active.is_(True)
        )
    )


def by_username(session: so.Session, username: str) -> User | None:
    return session.scalar(sa.select(User).where(User.username == username))
