"""Whether delivery can ever send to a webhook URL's host.

The API refuses a URL whose host delivery could never reach, rather than store a timer bound to
fail, and delivery fails such a timer at once (one stored before this check existed). The host
is read as delivery reads it: yarl (aiohttp's URL type) maps it through IDNA, and the resolver
hands the result to `getaddrinfo`, which encodes it with Python's `idna` codec. What either
refuses, or what cannot be a DNS name once encoded, is refused here. Address literals are left to
the SSRF guard (`timerd.ssrf`), which judges every textual form of them.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import unicodedata
import urllib.parse

from yarl import URL

from timerd.ssrf import AddressPolicy, Denial, parse_ip_literal

INVALID_URL = "invalid_url"  # the error of an attempt at a URL no attempt can reach
MAX_LABEL_CHARS = 63  # ASCII once IDNA-encoded, so characters are bytes
MAX_NAME_CHARS = 253
CANNOT_ENCODE = "has a host that cannot be encoded for delivery"
LONG_LABEL = f"has a host label longer than {MAX_LABEL_CHARS} characters"
# Letters, digits and hyphens (RFC 1123), and the underscore some real names carry.
_LABEL = re.compile(r"[A-Za-z0-9_-]+", re.ASCII)
# Format, control, separator, private-use, surrogate and unassigned characters: invisible or
# ambiguous in a host (U+00AD soft hyphen, U+200B..U+200D, U+2060, U+FEFF, bidi controls).
_INVISIBLE_CATEGORIES = frozenset({"Cf", "Cc", "Zs", "Zl", "Zp", "Co", "Cs", "Cn"})


# An http(s) URL up to the end of its authority, as every parser reads it once the URL holds none
# of the characters that WHATWG parsers read as "/" or drop (backslash, tab, CR, LF).
_ORIGIN = re.compile(r"https?://([^/?#\\\t\r\n]+)", re.ASCII)
_REREAD = re.compile(r"[\\\t\r\n]")


def origin_match(url: str) -> re.Match[str] | None:
    """`url`'s scheme and authority (group 1: the authority, as `urlsplit` reads its netloc)
    when every parser reads them alike; None for a URL a parser could read otherwise (see
    `_REREAD`, an upper-case scheme, an empty authority), which callers judge whole."""
    if _REREAD.search(url) is not None:
        return None
    return _ORIGIN.match(url)


def origin_of(url: str) -> str:
    """`url` cut after its authority (`https://user@host:port`): all that decides where it can
    be delivered, so checks of its host may be cached by it when timers have a URL each. A URL
    a parser could read otherwise is its own origin."""
    match = origin_match(url)
    return url if match is None else match.group()


@functools.lru_cache(maxsize=4096)
def origin_checks(origin: str, policy: AddressPolicy) -> tuple[Denial | None, str | None]:
    """The policy's denial and `url_problem` of a URL's origin (`origin_of`: both judge its host
    alone), kept for the origins seen last: judging a host costs more than sending a webhook,
    and timers with a URL each share few origins. The API and delivery both ask here."""
    return policy.url_denial(origin), url_problem(origin)


def url_problem(url: str) -> str | None:
    """Why no delivery to `url` can ever be sent, or None when its host can be encoded and
    looked up. `url` is assumed to be an absolute http(s) URL with a host."""
    if "\\" in url:  # WHATWG parsers read it as "/", RFC 3986 ones as data: never ours to guess
        return "must not contain a backslash"
    try:
        split = urllib.parse.urlsplit(url)
        problem = _text_problem(split.netloc, split.hostname or "")
        if problem is not None:
            return problem
        parsed = URL(url)
        raw_host, _ = parsed.raw_host, parsed.host  # `host` decodes: bad punycode raises
    except (ValueError, UnicodeError, IndexError):  # yarl: IndexError for `[::1]:80@`
        return CANNOT_ENCODE
    if raw_host is None:
        return "has no host"
    if parse_ip_literal(raw_host) is not None:
        return None
    return _name_problem(raw_host)


def _text_problem(netloc: str, host: str) -> str | None:
    """What is wrong with the host as written: percent-encoding, invisible characters, or
    brackets around something other than an IPv6 address (`[v1.x]`, an IPvFuture literal)."""
    if "%" in host:
        return "has a percent-encoded host"
    if any(unicodedata.category(c) in _INVISIBLE_CATEGORIES for c in host):
        return "has an invisible or control character in its host"
    if "[" in netloc:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return "has a bracketed host that is not an IPv6 address"
    return None


def _name_problem(raw_host: str) -> str | None:
    """What is wrong with the host name as delivery encodes it: not a DNS name of LDH labels
    of 1 to 63 bytes and at most 253 bytes in all (one trailing dot allowed), or refused by the
    `idna` codec that `getaddrinfo` encodes it with."""
    if not raw_host.isascii():  # yarl has IDNA-encoded every other character
        return CANNOT_ENCODE
    name = raw_host.removesuffix(".")
    labels = name.split(".")
    checks = (
        (all(labels), "has an empty label in its host"),
        (max(map(len, labels)) <= MAX_LABEL_CHARS, LONG_LABEL),
        (len(name) <= MAX_NAME_CHARS, f"has a host longer than {MAX_NAME_CHARS} characters"),
        (all(_LABEL.fullmatch(label) for label in labels), "has a character no host name has"),
        (_idna_encodes(raw_host), CANNOT_ENCODE),
    )
    return next((problem for ok, problem in checks if not ok), None)


def _idna_encodes(name: str) -> bool:
    try:
        name.encode("idna")
    except UnicodeError:
        return False
    return True
