"""Tables of hostile inputs, shared by the tests that try them at each entry point."""

from __future__ import annotations

_DIGITS = "9" * 5000

# Hosts no delivery could ever reach: refused at create and PATCH, never stored to fail later.
UNDELIVERABLE_URLS = {
    "label-over-63": "https://" + "a" * 64 + ".example.com/hooks",  # the resolver's UnicodeError
    "name-over-253": "https://" + "a." * 127 + "com/hooks",
    "empty-label": "https://a..example.com/hooks",
    "leading-dot": "https://.example.com/hooks",
    "only-dots": "https://../hooks",
    "percent-encoded": "https://ex%61mple.com/hooks",
    "percent-dot": "https://example%2ecom/hooks",
    "soft-hyphen": "https://exam\u00adple.com/hooks",
    "zero-width-space": "https://exam\u200bple.com/hooks",
    "zero-width-non-joiner": "https://exam\u200cple.com/hooks",
    "zero-width-joiner": "https://exam\u200dple.com/hooks",
    "word-joiner": "https://exam\u2060ple.com/hooks",
    "byte-order-mark": "https://\ufeffexample.com/hooks",
    "right-to-left-override": "https://exam\u202eple.com/hooks",
    "left-to-right-mark": "https://exam\u200eple.com/hooks",
    "bidi-isolate": "https://exam\u2066ple.com/hooks",
    "arabic-number-sign": "https://exam\u0600ple.com/hooks",
    "backslash-in-host": "https://example.com\\evil.example/hooks",
    "backslash-in-path": "https://example.com/a\\b",
    "ipvfuture": "https://[v1.x]/hooks",
    "ipvfuture-upper": "https://[V7.example]/hooks",
    "bad-punycode": "https://xn--zz.example.com/hooks",
    "dotted-digit-one": "https://\u2488.example.com/hooks",  # IDNA: "1..example.com"
    "symbol-in-host": "https://exa!mple.com/hooks",
    "full-width-stop-run": "https://a\uff0e\uff0eexample.com/hooks",
}


# JSON numbers no finite float (or sane integer) holds, and the literals JSON does not allow:
# 400 invalid_json wherever they are in a body (tests/test_hostile.py tries every field).
NOT_FINITE_NUMBERS = {
    "NaN": "NaN",
    "Infinity": "Infinity",
    "-Infinity": "-Infinity",
    "digits": _DIGITS,
    "negative-digits": "-" + _DIGITS,
    "1e400": "1e400",
    "-1e400": "-1e400",
    "1E309": "1E309",
    "float-digits": _DIGITS + ".5",
    "tiny-exponent-huge-mantissa": _DIGITS + "e-1",
}
