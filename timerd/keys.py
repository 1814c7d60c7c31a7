"""API keys: `tmr_<key id>_<secret>`, of which the store keeps only a SHA-256 of the secret.

The secret is 32 random bytes, so a plain hash is as strong as a slow one would be, and a
lookup costs one primary-key read: revocation applies to the very next request.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from timerd.models import ApiKey

PREFIX = "tmr_"
_KEY_ID_BYTES = 8


def hash_secret(secret: str) -> str:
    """The stored form of a key's secret."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_key(name: str, tenant: str, now_ms: int) -> tuple[str, ApiKey]:
    """A fresh key: the token to hand out once, and the record to store."""
    key_id = secrets.token_hex(_KEY_ID_BYTES)
    secret = secrets.token_urlsafe(32)
    record = ApiKey(key_id, name, tenant, hash_secret(secret), now_ms)
    return f"{PREFIX}{key_id}_{secret}", record


def split_token(token: str) -> tuple[str, str] | None:
    """`(key id, secret)` of a well-formed token, else None."""
    if not token.startswith(PREFIX):
        return None
    key_id, sep, secret = token[len(PREFIX) :].partition("_")
    if not sep or len(key_id) != 2 * _KEY_ID_BYTES or not secret:
        return None
    return key_id, secret


def matches(key: ApiKey | None, secret: str) -> bool:
    """Whether `secret` is the live key's secret (compared in constant time)."""
    if key is None or key.revoked_at_ms is not None:
        return False
    return hmac.compare_digest(key.secret_hash, hash_secret(secret))
