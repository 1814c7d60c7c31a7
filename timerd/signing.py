"""Webhook signatures per the Standard Webhooks spec (symmetric `v1`, HMAC-SHA256).

The signed content is `<webhook-id>.<webhook-timestamp>.<body>`; the `webhook-signature` header
carries one `v1,<base64 digest>` per configured secret, space-separated, so a receiver keeps
verifying while secrets rotate. Secrets are `whsec_<base64>` (the prefix may be omitted, as the
reference libraries allow) and decode to 24 to 64 bytes.

Nothing here ever puts a secret, or any part of one, into a message or a repr.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

from timerd.errors import ConfigError

SETTING = "TIMERD_SIGNING_SECRET"
SECRET_PREFIX = "whsec_"  # noqa: S105  (the prefix of a secret, not a secret)
MIN_KEY_BYTES = 24
MAX_KEY_BYTES = 64
SIGNATURE_VERSION = "v1"

# A webhook-id travels as an HTTP header value and is a field of the signed content, whose
# fields are separated by "." (the spec forbids "." in the id): visible ASCII other than ".".
_ID_CHARS = frozenset(chr(c) for c in range(0x21, 0x7F)) - {"."}


class Signer:
    """Signs webhooks with one or more keys, in the order they were configured."""

    __slots__ = ("_keys",)

    def __init__(self, keys: tuple[bytes, ...]) -> None:
        """A signer for raw (already decoded) keys; `from_setting` is the usual way in."""
        if not keys:
            raise ValueError("a Signer needs at least one key")
        if not all(MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES for key in keys):
            raise ValueError(f"signing keys must be {MIN_KEY_BYTES} to {MAX_KEY_BYTES} bytes")
        self._keys = keys

    @classmethod
    def from_setting(cls, text: str) -> Signer | None:
        """The signer for a `TIMERD_SIGNING_SECRET` value, or None when it is empty or blank.

        Raises `ConfigError` naming the setting (never echoing a secret) when a secret is not
        `[whsec_]<padded standard base64>` of 24 to 64 bytes, or is listed twice."""
        secrets = text.split()
        if not secrets:
            return None
        keys = tuple(_decode_secret(s, i, len(secrets)) for i, s in enumerate(secrets, 1))
        if len(set(keys)) != len(keys):
            raise ConfigError(f"{SETTING}: the same secret is listed more than once")
        return cls(keys)

    def signature(self, msg_id: str, timestamp_s: int, body: bytes) -> str:
        """The `webhook-signature` header value: `v1,<base64 HMAC-SHA256>` per key, space-separated.

        `msg_id` and `timestamp_s` must be exactly what the `webhook-id` and `webhook-timestamp`
        headers carry, and `body` the exact bytes sent. Raises `ValueError` for an id that is
        empty or holds anything but visible ASCII other than ".", a negative or non-int
        timestamp, or a body that is not UTF-8 (the reference verifiers decode it as text)."""
        content = _signed_content(msg_id, timestamp_s, body)
        return " ".join(_sign(key, content) for key in self._keys)

    def __repr__(self) -> str:
        count = len(self._keys)
        return f"Signer(<{count} secret{'s' if count > 1 else ''} hidden>)"


def _decode_secret(secret: str, position: int, count: int) -> bytes:
    where = f"{SETTING}: secret {position} of {count}"
    encoded = secret.removeprefix(SECRET_PREFIX)
    if not encoded:
        raise ConfigError(f"{where} is empty after the {SECRET_PREFIX} prefix")
    try:
        key = binascii.a2b_base64(encoded, strict_mode=True)
    except ValueError:  # binascii.Error, or non-ASCII text
        raise ConfigError(
            f"{where} is not {SECRET_PREFIX} followed by padded standard base64"
        ) from None
    if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
        raise ConfigError(
            f"{where} decodes to {len(key)} bytes; it must be {MIN_KEY_BYTES} to {MAX_KEY_BYTES}"
        )
    return key


def _signed_content(msg_id: str, timestamp_s: int, body: bytes) -> bytes:
    if not msg_id or not _ID_CHARS.issuperset(msg_id):
        raise ValueError("webhook-id must be non-empty visible ASCII without '.'")
    if type(timestamp_s) is not int or timestamp_s < 0:
        raise ValueError("webhook-timestamp must be a non-negative int of seconds")
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("the webhook body must be UTF-8") from None
    return f"{msg_id}.{timestamp_s}.".encode("ascii") + body


def _sign(key: bytes, content: bytes) -> str:
    digest = hmac.digest(key, content, hashlib.sha256)
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode('ascii')}"
