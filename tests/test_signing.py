"""Webhook signatures, checked the way a receiver checks them: with the reference
`standardwebhooks` package (`Webhook(secret).verify(body, headers)`), at the current time, over
a few hundred seeded random JSON bodies (non-ASCII, astral, control and Latin-1 "binary"
characters, escaped lone surrogates), for every configured secret, and with tampering."""

from __future__ import annotations

import base64
import json
import random
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from timerd.errors import ConfigError
from timerd.signing import Signer

SEED = 4_2024
ROUNDS = 300
ID_CHARS = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != ".")


def make_secret(rng: random.Random, size: int = 32) -> str:
    return "whsec_" + base64.b64encode(rng.randbytes(size)).decode()


def signer_for(*secrets: str) -> Signer:
    signer = Signer.from_setting(" ".join(secrets))
    assert signer is not None
    return signer


def headers(msg_id: str, timestamp_s: int, signature: str) -> dict[str, str]:
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp_s),
        "webhook-signature": signature,
    }


# -- random material ---------------------------------------------------------------------------

_POOLS: tuple[tuple[int, int], ...] = (
    (0x20, 0x7E),  # printable ASCII, quotes and backslashes included
    (0x00, 0x1F),  # control characters (escaped by json)
    (0x80, 0xFF),  # Latin-1: bytes read as characters, the "binary" in JSON text
    (0x0590, 0x06FF),  # Hebrew and Arabic (right to left)
    (0x0300, 0x036F),  # combining marks
    (0x4E00, 0x9FFF),  # CJK
    (0x2000, 0x206F),  # punctuation incl. U+2028/2029 and zero-width characters
    (0xFEFF, 0xFEFF),  # byte order mark
    (0x1F300, 0x1FAFF),  # emoji (astral, 4 UTF-8 bytes)
)
_SURROGATES = (0xD800, 0xDFFF)


def random_text(rng: random.Random, *, surrogates: bool) -> str:
    pools = _POOLS + ((_SURROGATES,) if surrogates else ())
    chars = []
    for _ in range(rng.randrange(0, 24)):
        low, high = rng.choice(pools)
        chars.append(chr(rng.randint(low, high)))
    return "".join(chars)


def random_json(rng: random.Random, depth: int, *, surrogates: bool) -> Any:
    kind = rng.randrange(7 if depth > 0 else 5)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.randint(-(2**70), 2**70)
    if kind == 2:
        return rng.uniform(-1e12, 1e12)
    if kind in (3, 4):
        return random_text(rng, surrogates=surrogates)
    if kind == 5:
        return [random_json(rng, depth - 1, surrogates=surrogates) for _ in range(rng.randrange(5))]
    return {
        random_text(rng, surrogates=surrogates): random_json(rng, depth - 1, surrogates=surrogates)
        for _ in range(rng.randrange(5))
    }


def random_body(rng: random.Random) -> bytes:
    """Random JSON text: ASCII with escapes (lone surrogates allowed) or raw UTF-8."""
    ascii_only = rng.random() < 0.5
    value = random_json(rng, 3, surrogates=ascii_only)
    indent = rng.choice([None, 2])
    text = json.dumps(value, ensure_ascii=ascii_only, indent=indent)
    return text.encode()


def random_id(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return rng.randbytes(12).hex()  # what timerd sends: an ObjectId
    return "".join(rng.choice(ID_CHARS) for _ in range(rng.randint(1, 40)))


def tamper_text(rng: random.Random, text: str, alphabet: str) -> str:
    """`text` with one character replaced, inserted or removed (never the same text)."""
    while True:
        i = rng.randrange(len(text) + 1)
        edit = rng.randrange(3)
        if edit == 0 and i < len(text):
            tampered = text[:i] + rng.choice(alphabet) + text[i + 1 :]
        elif edit == 1:
            tampered = text[:i] + rng.choice(alphabet) + text[i:]
        else:
            tampered = text[:i] + text[i + 1 :]
        if tampered and tampered != text:
            return tampered


# -- the reference receiver verifies -----------------------------------------------------------


def test_every_configured_secret_verifies_random_bodies_with_the_reference_library() -> None:
    rng = random.Random(SEED)
    for _ in range(ROUNDS):
        secrets = [make_secret(rng, rng.randint(24, 64)) for _ in range(rng.randint(1, 3))]
        body = random_body(rng)
        msg_id, now = random_id(rng), int(time.time())
        signature = signer_for(*secrets).signature(msg_id, now, body)
        for secret in secrets:
            verified = Webhook(secret).verify(body, headers(msg_id, now, signature))
            assert verified == json.loads(body), (msg_id, body)


def test_with_two_secrets_a_receiver_that_knows_either_one_verifies() -> None:
    rng = random.Random(SEED + 1)
    new, old, unknown = make_secret(rng), make_secret(rng), make_secret(rng)
    body, msg_id, now = (
        b'{"id":"x","type":"timer.fired"}',
        rng.randbytes(12).hex(),
        int(time.time()),
    )
    signature = signer_for(new, old).signature(msg_id, now, body)
    sent = headers(msg_id, now, signature)

    assert Webhook(old).verify(body, sent) == json.loads(body)
    assert Webhook(new).verify(body, sent) == json.loads(body)
    with pytest.raises(WebhookVerificationError):
        Webhook(unknown).verify(body, sent)


def test_the_header_holds_one_v1_signature_per_secret_in_the_configured_order() -> None:
    rng = random.Random(SEED + 2)
    secrets = [make_secret(rng, size) for size in (24, 33, 64)]
    msg_id, timestamp, body = "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W", 1674087231, '{"é":"ü€😀"}'
    at = datetime.fromtimestamp(timestamp, tz=UTC)

    signature = signer_for(*secrets).signature(msg_id, timestamp, body.encode())

    assert signature.split(" ") == [Webhook(s).sign(msg_id, at, body) for s in secrets]


def test_a_secret_without_the_prefix_signs_as_with_it_like_the_reference_library() -> None:
    secret = make_secret(random.Random(SEED + 3))
    bare = secret.removeprefix("whsec_")
    now, body = int(time.time()), b"[]"
    signature = signer_for(bare).signature("id1", now, body)
    assert signature == signer_for(secret).signature("id1", now, body)
    assert Webhook(secret).verify(body, headers("id1", now, signature)) == []


def test_an_empty_body_is_signed_too() -> None:
    secret = make_secret(random.Random(SEED + 4))
    now = int(time.time())
    signature = signer_for(secret).signature("id1", now, b"")
    Webhook(secret).verify(b"", headers("id1", now, signature), json_parse=False)


# -- tampering fails ---------------------------------------------------------------------------


def test_a_tampered_id_timestamp_or_body_fails_verification() -> None:
    rng = random.Random(SEED + 5)
    for _ in range(ROUNDS):
        secret = make_secret(rng)
        body = random_body(rng)
        msg_id, now = random_id(rng), int(time.time())
        signature = signer_for(secret).signature(msg_id, now, body)
        receiver = Webhook(secret)

        forged_id = tamper_text(rng, msg_id, ID_CHARS)
        # within the five-minute tolerance, so only the signature can reject it
        forged_timestamp = now + rng.choice([-1, 1]) * rng.randint(1, 240)
        forged_body = tamper_text(rng, body.decode(), 'x é€😀{}"\\\n').encode()
        for forged in (
            (body, headers(forged_id, now, signature)),
            (body, headers(msg_id, forged_timestamp, signature)),
            (forged_body, headers(msg_id, now, signature)),
        ):
            with pytest.raises(WebhookVerificationError):
                receiver.verify(*forged)


def test_a_signature_made_with_another_secret_fails() -> None:
    rng = random.Random(SEED + 6)
    now = int(time.time())
    signature = signer_for(make_secret(rng)).signature("id1", now, b"{}")
    with pytest.raises(WebhookVerificationError):
        Webhook(make_secret(rng)).verify(b"{}", headers("id1", now, signature))


@pytest.mark.parametrize(
    ("msg_id", "timestamp_s", "body"),
    [
        ("", 1, b"{}"),
        ("a.b", 1, b"{}"),  # the spec: no "." in the id, it separates the signed fields
        ("a b", 1, b"{}"),
        ("a\r\nx-evil: 1", 1, b"{}"),
        ("caf\u00e9", 1, b"{}"),
        ("id1", -1, b"{}"),
        ("id1", True, b"{}"),
        ("id1", 1.5, b"{}"),
        ("id1", 1, b"\xff{}"),  # not UTF-8: the reference verifiers cannot check it
    ],
)
def test_signature_refuses_what_a_receiver_could_not_verify(
    msg_id: str, timestamp_s: Any, body: bytes
) -> None:
    signer = signer_for(make_secret(random.Random(SEED + 7)))
    with pytest.raises(ValueError, match="webhook"):
        signer.signature(msg_id, timestamp_s, body)


# -- the setting -------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", " ", "\n", " \t \n "])
def test_an_empty_setting_means_no_signer(text: str) -> None:
    assert Signer.from_setting(text) is None


@pytest.mark.parametrize("size", [24, 32, 64])
def test_keys_of_24_to_64_bytes_are_accepted(size: int) -> None:
    assert Signer.from_setting(make_secret(random.Random(size), size)) is not None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


_KEY = bytes(range(200, 232))  # 32 bytes whose base64 holds "+" and "/" and ends in "="
_GOOD = "whsec_" + _b64(bytes(range(32)))
BAD_SETTINGS = {
    "empty after the prefix": "whsec_",
    "not base64": "whsec_n0t*base64$$$$!!!!????####",
    "unpadded": "whsec_" + _b64(_KEY).rstrip("="),
    "non-ASCII": "whsec_" + "\u00fc" * 32,
    "url-safe alphabet": "whsec_" + _b64(_KEY).replace("+", "-").replace("/", "_"),
    "asymmetric key": "whsk_" + _b64(_KEY),
    "23 bytes": "whsec_" + _b64(_KEY[:23]),
    "65 bytes": "whsec_" + _b64((_KEY * 3)[:65]),
    "a good then a bad secret": _GOOD + " whsec_" + _b64(_KEY[:8]),
    "the same secret twice": f"{_GOOD} {_GOOD}",
}


@pytest.mark.parametrize("text", BAD_SETTINGS.values(), ids=BAD_SETTINGS.keys())
def test_a_bad_setting_is_refused_naming_the_variable_but_not_the_secret(text: str) -> None:
    with pytest.raises(ConfigError, match="TIMERD_SIGNING_SECRET") as caught:
        Signer.from_setting(text)
    shown = f"{caught.value} {caught.value!r}"
    for secret in text.split():
        encoded = secret.split("_", 1)[-1]
        if encoded:  # a bare "whsec_" holds nothing secret
            assert encoded not in shown
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__ or caught.value.__context__ is None


def test_the_bad_secrets_of_the_table_are_what_their_names_say() -> None:
    assert len(_KEY) == 32
    assert "+" in _b64(_KEY)
    assert "/" in _b64(_KEY)
    assert _b64(_KEY).endswith("=")


@pytest.mark.parametrize("keys", [(), (bytes(23),), (bytes(24), bytes(65))])
def test_the_constructor_refuses_missing_or_badly_sized_keys(keys: tuple[bytes, ...]) -> None:
    with pytest.raises(ValueError, match="key"):
        Signer(keys)


def test_repr_and_str_hide_the_secrets() -> None:
    rng = random.Random(SEED + 8)
    secrets = [make_secret(rng), make_secret(rng)]
    signer = signer_for(*secrets)
    for shown in (repr(signer), str(signer), f"{signer}", f"{signer!r}"):
        assert "2 secrets" in shown
        for secret in secrets:
            key = base64.b64decode(secret.removeprefix("whsec_"))
            assert secret.removeprefix("whsec_") not in shown
            assert repr(key) not in shown
            assert key.hex() not in shown
