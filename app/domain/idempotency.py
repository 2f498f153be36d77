"""Idempotency rules for intake: what makes two requests 'the same body'."""

from __future__ import annotations

import hashlib
import json
from typing import Any

MAX_KEY_LENGTH = 200


def request_fingerprint(body: Any) -> str:
    """SHA-256 of the canonical JSON body: key order and whitespace do not matter. A lone surrogate
    (JSON allows "\\ud800") is hashed as it came, not refused: the body is still stored and judged."""
    return hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
            "utf-8", "surrogatepass"
        )
    ).hexdigest()


def valid_key(key: str | None) -> bool:
    return bool(key) and len(key) <= MAX_KEY_LENGTH and key.isprintable() and key.strip() == key
