"""Environment-driven settings (SPEC 9.1)."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from app.domain.liveness import HandoffPolicy


def _instance_dir() -> Path:
    return Path(os.environ.get("RECON_INSTANCE", "./instance")).resolve()


def _secret_key(instance: Path) -> str:
    """SECRET_KEY from the environment, else generated once into the instance folder."""
    if os.environ.get("SECRET_KEY"):
        return os.environ["SECRET_KEY"]
    instance.mkdir(parents=True, exist_ok=True)
    path = instance / "secret_key"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
    return path.read_text().strip()


def audit_checkpoint_from_env() -> tuple[Path, float]:
    """RECON_AUDIT_CHECKPOINT_FILE (default <instance>/audit-checkpoints.jsonl) and
    RECON_AUDIT_CHECKPOINT_SECONDS (default 300): where and how often checkpoints are written."""
    path = os.environ.get("RECON_AUDIT_CHECKPOINT_FILE")
    seconds = float(os.environ.get("RECON_AUDIT_CHECKPOINT_SECONDS", "300"))
    return (Path(path) if path else _instance_dir() / "audit-checkpoints.jsonl"), seconds


def _seal_mode(value: str) -> str:
    if value not in ("background", "inline"):
        raise ValueError(f"RECON_SEAL_MODE must be background or inline, not {value!r}")
    return value


def _secure_cookies(value: str) -> str:
    value = value.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return "always"
    if value in ("0", "false", "no", "off"):
        return "never"
    if value == "auto":
        return "auto"
    raise ValueError(f"RECON_SECURE_COOKIES must be auto, true or false, not {value!r}")


@dataclass
class Settings:
    instance_path: Path
    database_url: str
    redis_url: str | None
    secret_key: str
    lease_seconds: float = 90.0
    queue_name: str = "recon"
    housekeeping_seconds: float = 2.0
    handoff_margin_seconds: float = 10.0
    reconcile_grace_seconds: float = 15.0
    # Console sessions (docs/SECURITY.md): idle timeout, absolute lifetime, the Secure flag
    # ("auto": set unless the request is for localhost).
    session_idle_minutes: float = 15.0
    session_lifetime_hours: float = 12.0
    secure_cookies: str = "auto"
    hsts_seconds: int = 0
    # Login throttles (limits notation), counted on failed attempts only.
    login_limit_account: str = "10 per 15 minutes"
    login_limit_address: str = "30 per 15 minutes"
    # /metrics: with a token, scrapers send `Authorization: Bearer <token>`; without one, only
    # loopback clients may read it.
    metrics_token: str | None = None
    trusted_proxies: int = 0
    # Anchored audit checkpoints (docs/SECURITY.md): the append-only file and how often the
    # worker's housekeeping writes one (None: <instance>/audit-checkpoints.jsonl).
    audit_checkpoint_file: Path | None = None
    audit_checkpoint_seconds: float = 300.0
    # The intake API's audit events: sealed by a background thread per process ("background",
    # off the request path) or before the response ("inline"). docs/ARCHITECTURE.md "Audit log".
    seal_mode: str = "background"
    # API tokens: a checked token is trusted for this many seconds per process (0: every request
    # reads the database). Revocation in the same process takes effect at once.
    token_cache_seconds: float = 5.0

    def checkpoint_file(self) -> Path:
        return self.audit_checkpoint_file or self.instance_path / "audit-checkpoints.jsonl"

    def handoff_policy(self) -> HandoffPolicy:
        """The hand-off timing every worker and monitor shares (docs/ARCHITECTURE.md, 'Liveness')."""
        return HandoffPolicy(
            lease_seconds=self.lease_seconds,
            housekeeping_seconds=self.housekeeping_seconds,
            margin_seconds=self.handoff_margin_seconds,
        )

    @classmethod
    def from_env(cls) -> Settings:
        instance = _instance_dir()
        default_db = f"sqlite:///{instance / 'recon.db'}"
        return cls(
            instance_path=instance,
            database_url=os.environ.get("DATABASE_URL", default_db),
            redis_url=os.environ.get("REDIS_URL") or None,
            secret_key=_secret_key(instance),
            lease_seconds=float(os.environ.get("RECON_LEASE_SECONDS", "90")),
            queue_name=os.environ.get("RECON_QUEUE", "recon"),
            housekeeping_seconds=float(os.environ.get("RECON_HOUSEKEEPING_SECONDS", "2")),
            handoff_margin_seconds=float(os.environ.get("RECON_HANDOFF_MARGIN_SECONDS", "10")),
            reconcile_grace_seconds=float(os.environ.get("RECON_RECONCILE_GRACE_SECONDS", "15")),
            session_idle_minutes=float(os.environ.get("RECON_SESSION_IDLE_MINUTES", "15")),
            session_lifetime_hours=float(os.environ.get("RECON_SESSION_LIFETIME_HOURS", "12")),
            secure_cookies=_secure_cookies(os.environ.get("RECON_SECURE_COOKIES", "auto")),
            hsts_seconds=int(os.environ.get("RECON_HSTS_SECONDS", "0")),
            login_limit_account=os.environ.get("RECON_LOGIN_LIMIT_ACCOUNT", "10 per 15 minutes"),
            login_limit_address=os.environ.get("RECON_LOGIN_LIMIT_ADDRESS", "30 per 15 minutes"),
            metrics_token=os.environ.get("RECON_METRICS_TOKEN") or None,
            trusted_proxies=int(os.environ.get("RECON_TRUSTED_PROXIES", "0")),
            seal_mode=_seal_mode(os.environ.get("RECON_SEAL_MODE", "background")),
            token_cache_seconds=float(os.environ.get("RECON_TOKEN_CACHE_SECONDS", "5")),
            audit_checkpoint_file=audit_checkpoint_from_env()[0],
            audit_checkpoint_seconds=audit_checkpoint_from_env()[1],
        )
