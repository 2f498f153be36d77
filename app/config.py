"""Environment-driven settings (SPEC 9.1)."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path


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


@dataclass
class Settings:
    instance_path: Path
    database_url: str
    redis_url: str | None
    secret_key: str
    lease_seconds: float = 90.0
    queue_name: str = "recon"

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
        )
