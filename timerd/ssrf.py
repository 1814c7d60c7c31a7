"""Outbound safety (the SSRF guard): which addresses a webhook may reach.

By default a webhook may reach only public unicast addresses. Denied, unless inside a network of
`TIMERD_ALLOWED_NETWORKS`:

| range | why |
|---|---|
| 0.0.0.0/8, ::/128 | unspecified ("this network") |
| 127.0.0.0/8, ::1/128; the names `localhost`, `*.localhost` | loopback |
| 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, fc00::/7 | private (RFC 1918, unique local) |
| 169.254.0.0/16 (169.254.169.254 among them), fe80::/10, fec0::/10 | link-local, site-local |
| 100.64.0.0/10 | shared address space (CGNAT) |
| 192.0.0.0/24, 2001::/23 | IETF protocol assignments |
| 192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32, 3fff::/20 | documentation |
| 198.18.0.0/15 | benchmarking |
| 192.88.99.0/24 | 6to4 relay anycast (deprecated) |
| 224.0.0.0/4, ff00::/8 | multicast |
| 240.0.0.0/4, 255.255.255.255 | reserved, broadcast |
| 100::/64 | discard-only |
| ::/96, ::ffff:0:0:0/96 | IPv4-compatible, IPv4-translated (SIIT) |
| 64:ff9b::/96, 64:ff9b:1::/48 | NAT64 |
| 2002::/16, 2001::/32 | 6to4, Teredo |

Beyond the table, an IPv4 address must be `is_global` and neither multicast nor reserved, and an
IPv6 address must be `is_global` and inside 2000::/3, the only global unicast space allocated.

Embedded IPv4. An IPv4-mapped address (`::ffff:a.b.c.d`) *is* the IPv4 address on a dual-stack
socket, so it is judged exactly as `a.b.c.d`. Every other form that carries an IPv4 address is a
transition mechanism a webhook has no business using, and a gateway on the path may hand it to the
embedded address: these ranges are denied wholesale. An operator may allow one of them; even then
an address whose embedded IPv4 address is denied stays denied unless that IPv4 address is itself
inside an allowed network. (64:ff9b:1::/48 may embed the IPv4 address at any RFC 6052 position of
a prefix of /48 or longer, so every candidate position is checked.)

Host names are judged by the addresses they resolve to at delivery time: `GuardedResolver` refuses
an answer in which any address is denied, and aiohttp connects only to the addresses it returned,
so a name that resolves differently a moment later (DNS rebinding) cannot slip past. Hosts that
never reach a resolver (address literals) are judged by `AddressPolicy.host_denial`, which reads
every textual form `getaddrinfo` would (`127.1`, `0x7f000001`, `2130706433`, `0177.0.0.1`, `0`).
"""

from __future__ import annotations

import ipaddress
import re
import socket
import urllib.parse
from dataclasses import dataclass
from typing import TypeAlias

from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from timerd.errors import ConfigError, TimerdError

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

ADDRESS_DENIED = "address_denied"  # the error of an attempt whose target may not be reached
SETTING = "TIMERD_ALLOWED_NETWORKS"


def _table(*rows: tuple[str, str]) -> tuple[tuple[IPNetwork, str], ...]:
    return tuple((ipaddress.ip_network(cidr), reason) for cidr, reason in rows)


# First match names the reason, so narrower ranges come before the ranges that contain them.
DENIED = _table(
    ("0.0.0.0/8", "unspecified"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "shared address space (CGNAT)"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "6to4 relay anycast"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("255.255.255.255/32", "broadcast"),
    ("240.0.0.0/4", "reserved"),
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("::/96", "IPv4-compatible IPv6"),
    ("::ffff:0:0:0/96", "IPv4-translated IPv6 (SIIT)"),
    ("64:ff9b::/96", "NAT64"),
    ("64:ff9b:1::/48", "NAT64 (local use)"),
    ("100::/64", "discard-only"),
    ("2001::/32", "Teredo"),
    ("2001::/23", "IETF protocol assignments"),
    ("2001:db8::/32", "documentation"),
    ("2002::/16", "6to4"),
    ("3fff::/20", "documentation"),
    ("fc00::/7", "private (unique local)"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local"),
    ("ff00::/8", "multicast"),
)
IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
NOT_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/127")  # :: and ::1 embed nothing (RFC 4291)
# Transition ranges whose last 32 bits are the IPv4 address: IPv4-compatible, SIIT, NAT64.
LAST_32_BITS_IPV4 = tuple(
    ipaddress.IPv6Network(cidr) for cidr in ("::/96", "::ffff:0:0:0/96", "64:ff9b::/96")
)
GLOBAL_UNICAST_V6 = ipaddress.IPv6Network("2000::/3")
LOOPBACK_ADDRESSES = (ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv6Address("::1"))

# The parts of an IPv4 address as inet_aton (hence getaddrinfo) reads them: hex, octal, decimal.
_INET_ATON_PART = re.compile(r"0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*", re.ASCII)


@dataclass(frozen=True, slots=True)
class Denial:
    """Why a webhook may not reach `host`."""

    host: str
    reason: str

    def __str__(self) -> str:
        return f"{self.host} is not a public address ({self.reason})"


class AddressDenied(TimerdError):
    """A webhook target resolved to, or is, an address the policy denies; nothing was sent."""

    def __init__(self, denial: Denial) -> None:
        super().__init__(str(denial))
        self.denial = denial


# -- reading hosts -------------------------------------------------------------------------------


def normalize_host(host: str) -> str:
    """Lower case, without IPv6 brackets and without trailing dots (`LOCALHOST.` → `localhost`)."""
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host.rstrip(".")


def is_loopback_name(host: str) -> bool:
    """`localhost` and every name under `.localhost` (RFC 6761), whatever they resolve to."""
    name = normalize_host(host)
    return name == "localhost" or name.endswith(".localhost")


def looks_like_address(host: str) -> bool:
    """What aiohttp treats as an address and connects to without asking a resolver: anything
    with a colon, or only digits and dots."""
    return ":" in host or host.replace(".", "").isdigit()


def parse_inet_aton(text: str) -> ipaddress.IPv4Address | None:
    """An IPv4 address in any form `inet_aton` accepts (`127.1`, `0x7f000001`, `2130706433`,
    `0177.0.0.1`, `0`), or None. The last of 1 to 4 parts fills the remaining bytes."""
    parts = text.split(".")
    if not 1 <= len(parts) <= 4 or not all(_INET_ATON_PART.fullmatch(p) for p in parts):
        return None
    values = [_inet_aton_value(p) for p in parts]
    *leading, last = values
    if any(v > 0xFF for v in leading) or last >= 1 << (8 * (5 - len(values))):
        return None
    number = last
    for index, value in enumerate(leading):
        number |= value << (8 * (3 - index))
    return ipaddress.IPv4Address(number)


def _inet_aton_value(part: str) -> int:
    if part[:2].lower() == "0x":
        return int(part[2:], 16)
    if len(part) > 1 and part.startswith("0"):
        return int(part, 8)
    return int(part)


def parse_ip_literal(host: str) -> IPAddress | None:
    """`host` read as an address literal (bracketed or not, with or without an IPv6 zone, or in
    an inet_aton form), or None when it is a host name."""
    name = normalize_host(host)
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return parse_inet_aton(name)


def url_hosts(url: str) -> set[str]:
    """The host of `url` as the standard library reads it and as aiohttp (yarl: IDNA-mapped, so
    full-width digits become ASCII) will connect to it; empty for a URL neither can read."""
    hosts: set[str] = set()
    try:
        if (host := urllib.parse.urlsplit(url).hostname) is not None:
            hosts.add(host)
    except ValueError:
        pass
    try:
        if (raw := URL(url).raw_host) is not None:
            hosts.add(raw)
    except (ValueError, UnicodeError, IndexError):  # yarl: IndexError for `[::1]:80@`
        pass
    return hosts


# -- the policy ----------------------------------------------------------------------------------


def public_denial(ip: IPAddress) -> str | None:
    """Why `ip` is not a public unicast address, or None when it is one."""
    for network, reason in DENIED:
        if ip in network:
            return reason
    if isinstance(ip, ipaddress.IPv6Address) and ip not in GLOBAL_UNICAST_V6:
        return "not global unicast"
    if not ip.is_global or ip.is_multicast or ip.is_reserved:
        return "not global unicast"
    return None


def embedded_ipv4(ip: IPAddress) -> tuple[ipaddress.IPv4Address, ...]:
    """The IPv4 addresses an IPv6 transition address carries (IPv4-compatible, SIIT, NAT64,
    6to4, Teredo server and client); empty for every other address."""
    if isinstance(ip, ipaddress.IPv4Address):
        return ()
    packed = ip.packed
    if ip.sixtofour is not None:
        return (ip.sixtofour,)
    if ip.teredo is not None:
        return ip.teredo
    if ip in NAT64_LOCAL:
        return tuple(_rfc6052_ipv4(packed, length) for length in (48, 56, 64, 96))
    if ip not in NOT_IPV4_COMPATIBLE and any(ip in network for network in LAST_32_BITS_IPV4):
        return (ipaddress.IPv4Address(packed[12:]),)
    return ()


def _rfc6052_ipv4(packed: bytes, prefix_length: int) -> ipaddress.IPv4Address:
    """The IPv4 address RFC 6052 embeds after a prefix of `prefix_length` bits (byte 8, the
    "u" octet, is skipped)."""
    positions = [i for i in range(prefix_length // 8, 16) if i != 8][:4]
    return ipaddress.IPv4Address(bytes(packed[i] for i in positions))


def canonical(ip: IPAddress) -> IPAddress:
    """`ip` without an IPv6 zone, and an IPv4-mapped address as the IPv4 address it is."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.scope_id is not None:
            return ipaddress.IPv6Address(ip.packed)
    return ip


def parse_allowed_networks(text: str) -> tuple[IPNetwork, ...]:
    """`TIMERD_ALLOWED_NETWORKS`: comma-separated CIDRs (a bare address is one host). Raises
    `ConfigError` naming the variable for anything else, for host bits set (`10.0.0.1/8`), and
    for IPv4-mapped ranges (allow the IPv4 range itself)."""
    networks: list[IPNetwork] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            network = ipaddress.ip_network(part)
        except ValueError as exc:
            raise ConfigError(
                f"{SETTING}: {part!r} is not a network such as 127.0.0.0/8 or fd00::/8 ({exc})"
            ) from exc
        if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(IPV4_MAPPED):
            raise ConfigError(
                f"{SETTING}: {part!r} is IPv4-mapped; IPv4-mapped addresses are judged as IPv4, "
                "so allow the IPv4 network itself"
            )
        networks.append(network)
    return tuple(networks)


@dataclass(frozen=True, slots=True)
class AddressPolicy:
    """Which addresses webhooks may reach: public unicast ones, and those in `allowed`."""

    allowed: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_setting(cls, text: str) -> AddressPolicy:
        """Build from `TIMERD_ALLOWED_NETWORKS`; raises `ConfigError` naming it."""
        return cls(parse_allowed_networks(text))

    def is_allowed(self, ip: IPAddress) -> bool:
        """May a webhook connect to `ip`?"""
        return self.denial(ip) is None

    def denial(self, ip: IPAddress) -> str | None:
        """Why a webhook may not connect to `ip`, or None when it may. An allowed network lets
        a non-public address through, but never one whose embedded IPv4 address is denied."""
        ip = canonical(ip)
        if not any(ip in network for network in self.allowed):
            reason = public_denial(ip)
            if reason is not None:
                return reason
        for inner in embedded_ipv4(ip):
            if (reason := self.denial(inner)) is not None:
                return f"embeds {inner}, {reason}"
        return None

    def host_denial(self, host: str) -> Denial | None:
        """What can be said of a URL host without resolving it: a loopback name (allowed only
        when both 127.0.0.1 and ::1 are), an address literal in any textual form, or text that
        aiohttp would take for an address but is none (denied). None for a host name, which is
        judged by what it resolves to."""
        name = normalize_host(host)
        if is_loopback_name(name):
            if all(self.is_allowed(ip) for ip in LOOPBACK_ADDRESSES):
                return None
            return Denial(name, "a loopback name")
        ip = parse_ip_literal(name)
        if ip is None:
            return Denial(name, "not a valid address") if looks_like_address(name) else None
        reason = self.denial(ip)
        shown = name if name == str(canonical(ip)) else f"{name} ({canonical(ip)})"
        return None if reason is None else Denial(shown, reason)

    def url_denial(self, url: str) -> Denial | None:
        """`host_denial` of the URL's host, however it is read (see `url_hosts`)."""
        for host in sorted(url_hosts(url)):
            if (denial := self.host_denial(host)) is not None:
                return denial
        return None


PUBLIC_ONLY = AddressPolicy()  # the default: nothing allowed beyond public unicast addresses


# -- resolution ----------------------------------------------------------------------------------


class GuardedResolver(AbstractResolver):
    """Resolves through `inner` (aiohttp's `ThreadedResolver` in production, a fake in tests) and
    raises `AddressDenied` when the host or any address of the answer is denied. aiohttp connects
    only to the addresses a resolver returns, so the addresses checked are the ones connected to."""

    def __init__(self, inner: AbstractResolver, policy: AddressPolicy) -> None:
        self.inner = inner
        self.policy = policy

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """The inner resolver's answer, every address of it allowed."""
        if (denial := self.policy.host_denial(host)) is not None:
            raise AddressDenied(denial)
        answer = await self.inner.resolve(host, port, family)
        for result in answer:
            reason = self._address_denial(result["host"])
            if reason is not None:
                raise AddressDenied(Denial(host, f"resolves to {result['host']}, {reason}"))
        return answer

    def _address_denial(self, address: str) -> str | None:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return "not an address"  # a resolver must answer addresses; refuse anything else
        return self.policy.denial(ip)

    async def close(self) -> None:
        """Close the inner resolver."""
        await self.inner.close()
