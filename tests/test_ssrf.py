"""The SSRF guard: by default a webhook reaches only public unicast addresses.

No test sends a packet to a non-loopback address. Deliveries use a fake resolver, and every
connection aiohttp tries goes through `guard`, which records it and refuses, before any socket
exists, whatever is not loopback. Public addresses are tested against the policy alone; the
allow path end to end uses 127.0.0.1 under TIMERD_ALLOWED_NETWORKS=127.0.0.0/8.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohappyeyeballs
import httpx
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from tests.support.procs import TimerdProcesses
from tests.support.receiver import Receiver
from tests.support.waiting import wait_until
from timerd.delivery import Attempt, Deliverer
from timerd.errors import ConfigError
from timerd.models import State, Timer, new_timer_id
from timerd.retry import Verdict, classify
from timerd.settings import Settings, build_settings
from timerd.ssrf import (
    ADDRESS_DENIED,
    PUBLIC_ONLY,
    AddressPolicy,
    parse_inet_aton,
    parse_ip_literal,
)
from timerd.store import open_store

IPv4 = ipaddress.IPv4Address
LOOPBACK_ONLY = "127.0.0.0/8"


# -- IPv6 forms that embed an IPv4 address --------------------------------------------------------


def mapped(v4: str) -> str:
    return str(ipaddress.IPv6Address(f"::ffff:{v4}"))


def compatible(v4: str) -> str:
    return str(ipaddress.IPv6Address(b"\0" * 12 + IPv4(v4).packed))


def nat64(v4: str) -> str:
    return str(ipaddress.IPv6Address(b"\x00\x64\xff\x9b" + b"\0" * 8 + IPv4(v4).packed))


def sixtofour(v4: str) -> str:
    return str(ipaddress.IPv6Address(b"\x20\x02" + IPv4(v4).packed + b"\0" * 9 + b"\x01"))


def teredo(client: str, server: str = "65.54.227.120") -> str:
    """2001:0:<server>:<flags>:<port ^ ffff>:<client ^ ffffffff>, as RFC 4380 lays it out."""
    obfuscated = bytes(b ^ 0xFF for b in IPv4(client).packed)
    packed = b"\x20\x01\0\0" + IPv4(server).packed + b"\x80\x00" + b"\xc0\x40" + obfuscated
    return str(ipaddress.IPv6Address(packed))


def fullwidth(text: str) -> str:
    """`text` in full-width forms (U+FF01 to U+FF5E), which IDNA maps back to ASCII."""
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" and c != "." else c for c in text)


def test_the_embedding_helpers_embed_what_ipaddress_extracts() -> None:
    assert ipaddress.IPv6Address(mapped("10.0.0.1")).ipv4_mapped == IPv4("10.0.0.1")
    assert ipaddress.IPv6Address(sixtofour("10.0.0.1")).sixtofour == IPv4("10.0.0.1")
    assert ipaddress.IPv6Address(teredo("10.0.0.1")).teredo == (
        IPv4("65.54.227.120"),
        IPv4("10.0.0.1"),
    )
    assert nat64("10.0.0.1") == "64:ff9b::a00:1"
    assert compatible("10.0.0.1") == "::a00:1"


# -- the policy table ------------------------------------------------------------------------------

DENIED: dict[str, str] = {
    # loopback, unspecified
    "127.0.0.1": "loopback",
    "127.255.255.254": "loopback",
    "::1": "loopback",
    "0.0.0.0": "unspecified",
    "0.1.2.3": "unspecified",
    "::": "unspecified",
    # private, shared, link-local
    "10.0.0.1": "private",
    "172.16.0.1": "private",
    "172.31.255.255": "private",
    "192.168.1.1": "private",
    "fc00::1": "private (unique local)",
    "fd12:3456::1": "private (unique local)",
    "100.64.0.1": "shared address space (CGNAT)",
    "100.127.255.254": "shared address space (CGNAT)",
    "169.254.169.254": "link-local",
    "169.254.0.1": "link-local",
    "fe80::1": "link-local",
    "fe80::1%eth0": "link-local",
    "febf::1": "link-local",
    "fec0::1": "site-local",
    # broadcast, multicast, reserved
    "255.255.255.255": "broadcast",
    "224.0.0.1": "multicast",
    "239.255.255.250": "multicast",
    "ff02::1": "multicast",
    "ff0e::1": "multicast",
    "240.0.0.1": "reserved",
    "254.1.2.3": "reserved",
    # documentation, benchmarking, IETF
    "192.0.2.1": "documentation",
    "198.51.100.7": "documentation",
    "203.0.113.9": "documentation",
    "2001:db8::1": "documentation",
    "3fff::1": "documentation",
    "198.18.0.1": "benchmarking",
    "198.19.255.255": "benchmarking",
    "192.0.0.1": "IETF protocol assignments",
    "192.0.0.9": "IETF protocol assignments",
    "2001:2::1": "IETF protocol assignments",
    "192.88.99.1": "6to4 relay anycast",
    "100::1": "discard-only",
    # outside the global unicast space 2000::/3
    "4000::1": "not global unicast",
    "e000::1": "not global unicast",
    # IPv4-mapped: judged as the IPv4 address itself
    mapped("127.0.0.1"): "loopback",
    mapped("10.0.0.1"): "private",
    mapped("169.254.169.254"): "link-local",
    # IPv4 in transition forms: denied wholesale, whatever they carry
    compatible("127.0.0.1"): "IPv4-compatible IPv6",
    compatible("8.8.8.8"): "IPv4-compatible IPv6",
    "::ffff:0:a00:1": "IPv4-translated IPv6 (SIIT)",
    nat64("10.0.0.1"): "NAT64",
    nat64("169.254.169.254"): "NAT64",
    nat64("8.8.8.8"): "NAT64",
    "64:ff9b:1::a00:1": "NAT64 (local use)",
    sixtofour("10.0.0.1"): "6to4",
    sixtofour("169.254.169.254"): "6to4",
    sixtofour("8.8.8.8"): "6to4",
    teredo("10.0.0.1"): "Teredo",
    teredo("8.8.8.8"): "Teredo",
}

PUBLIC = [
    "8.8.8.8",
    "1.1.1.1",
    "93.184.215.14",
    "100.63.255.255",  # just below CGNAT
    "100.128.0.0",  # just above
    "172.32.0.1",  # just above 172.16.0.0/12
    "192.0.1.1",
    "198.17.255.255",
    "223.255.255.255",
    "2606:4700:4700::1111",
    "2a00:1450:4001:82b::200e",
    "2001:4860:4860::8888",
    mapped("8.8.8.8"),
]


@pytest.mark.parametrize(("address", "reason"), DENIED.items(), ids=list(DENIED))
def test_denied_by_default(address: str, reason: str) -> None:
    ip = ipaddress.ip_address(address)
    assert PUBLIC_ONLY.denial(ip) == reason
    assert not PUBLIC_ONLY.is_allowed(ip)


@pytest.mark.parametrize("address", PUBLIC)
def test_public_unicast_is_allowed(address: str) -> None:
    assert PUBLIC_ONLY.is_allowed(ipaddress.ip_address(address))


def policy(allowed: str) -> AddressPolicy:
    return AddressPolicy.from_setting(allowed)


@pytest.mark.parametrize(
    ("allowed", "address", "verdict"),
    [
        (LOOPBACK_ONLY, "127.0.0.1", True),
        (LOOPBACK_ONLY, "127.8.9.10", True),
        (LOOPBACK_ONLY, mapped("127.0.0.1"), True),  # the same address on a dual-stack socket
        (LOOPBACK_ONLY, "::1", False),
        (LOOPBACK_ONLY, "10.0.0.1", False),
        (LOOPBACK_ONLY, "169.254.169.254", False),
        (LOOPBACK_ONLY, "8.8.8.8", True),  # public stays allowed
        (LOOPBACK_ONLY, compatible("127.0.0.1"), False),  # transition forms stay denied
        (LOOPBACK_ONLY, nat64("127.0.0.1"), False),
        (LOOPBACK_ONLY, sixtofour("127.0.0.1"), False),
        ("10.0.0.0/8, fd00::/8", "10.1.2.3", True),
        ("10.0.0.0/8, fd00::/8", "fd00::1", True),
        ("10.0.0.0/8, fd00::/8", "fc00::1", False),
        ("10.0.0.0/8, fd00::/8", "192.168.0.1", False),
        ("192.168.1.7", "192.168.1.7", True),  # a bare address is one host
        ("192.168.1.7", "192.168.1.8", False),
        # allowing a transition range never re-allows a denied embedded IPv4 address ...
        ("2002::/16", sixtofour("10.0.0.1"), False),
        ("2002::/16", sixtofour("169.254.169.254"), False),
        ("2002::/16", sixtofour("8.8.8.8"), True),
        ("64:ff9b::/96", nat64("10.0.0.1"), False),
        ("64:ff9b::/96", nat64("8.8.8.8"), True),
        ("2001::/32", teredo("10.0.0.1"), False),
        ("2001::/32", teredo("8.8.8.8"), True),
        ("2001::/32", teredo("8.8.8.8", server="10.0.0.1"), False),
        ("::/96", compatible("127.0.0.1"), False),
        ("::/0", nat64("10.0.0.1"), False),
        ("::/0", sixtofour("127.0.0.1"), False),
        # ... unless that IPv4 address is itself allowed
        ("2002::/16, 10.0.0.0/8", sixtofour("10.0.0.1"), True),
        ("64:ff9b::/96, 127.0.0.0/8", nat64("127.0.0.1"), True),
        ("10.0.0.0/8", sixtofour("10.0.0.1"), False),  # the transition range itself is not
        ("64:ff9b:1::/48", "64:ff9b:1::a00:1", False),
    ],
)
def test_allowed_networks(allowed: str, address: str, verdict: bool) -> None:
    assert policy(allowed).is_allowed(ipaddress.ip_address(address)) is verdict


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("loopback", "not a network"),
        ("127.0.0.0/33", "not a network"),
        ("10.0.0.1/8", "host bits set"),
        ("127.0.0.0/8;10.0.0.0/8", "not a network"),
        ("::ffff:127.0.0.0/104", "IPv4-mapped"),
    ],
)
def test_bad_allowed_networks_name_the_variable(text: str, message: str) -> None:
    for build in (
        lambda: AddressPolicy.from_setting(text),
        lambda: Settings(allowed_networks=text),
        lambda: build_settings(None, {"TIMERD_ALLOWED_NETWORKS": text}),
    ):
        with pytest.raises(ConfigError, match=f"TIMERD_ALLOWED_NETWORKS.*{message}"):
            build()


def test_allowed_networks_may_be_empty_or_spaced() -> None:
    assert AddressPolicy.from_setting("").allowed == ()
    assert len(AddressPolicy.from_setting(" 127.0.0.0/8 , ::1 ,").allowed) == 2


def test_a_bad_allowed_networks_stops_timerd_at_start(tmp_path: Path) -> None:
    with TimerdProcesses(tmp_path) as procs:
        proc = procs.start(
            "api",
            f"sqlite:///{tmp_path / 't.db'}",
            env={"TIMERD_ALLOWED_NETWORKS": "nope"},
            ready=False,
        )
        assert proc.popen.wait(15) == 2
    assert "TIMERD_ALLOWED_NETWORKS" in proc.stderr()


# -- textual tricks ------------------------------------------------------------------------------

TRICKS = {
    "127.1": "127.0.0.1",
    "127.0.1": "127.0.0.1",
    "0x7f000001": "127.0.0.1",
    "0X7F000001": "127.0.0.1",
    "2130706433": "127.0.0.1",
    "0177.0.0.1": "127.0.0.1",
    "0177.1": "127.0.0.1",
    "0x7f.1": "127.0.0.1",
    "0x7f.0.0.0x1": "127.0.0.1",
    "017700000001": "127.0.0.1",
    "0": "0.0.0.0",
    "00": "0.0.0.0",
    "0x0": "0.0.0.0",
    "10.1": "10.0.0.1",
    "167772161": "10.0.0.1",
    "0xa9fea9fe": "169.254.169.254",
    "2852039166": "169.254.169.254",
    "0xffffffff": "255.255.255.255",
}


@pytest.mark.parametrize(("text", "address"), TRICKS.items(), ids=list(TRICKS))
def test_inet_aton_forms_read_as_getaddrinfo_reads_them(text: str, address: str) -> None:
    assert parse_inet_aton(text) == IPv4(address)
    assert socket.inet_aton(text) == IPv4(address).packed  # the platform agrees
    assert not PUBLIC_ONLY.is_allowed(IPv4(address))
    assert PUBLIC_ONLY.host_denial(text) is not None


@pytest.mark.parametrize(
    "text",
    [
        "",
        "0x",
        "1.",
        ".1",
        "1..2",
        "08",
        "09.1",
        "0x1g",
        "256.1",
        "1.16777216",
        "4294967296",
        "1.2.3.4.5",
        "1.2.3.256",
        "-1",
        "+1",
        "1e3",
        "example.com",
        "0x7f000001.example",
    ],
)
def test_what_inet_aton_refuses_is_no_address(text: str) -> None:
    assert parse_inet_aton(text) is None
    with pytest.raises(OSError):
        socket.inet_aton(text)


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "127.0.0.1.",
        "[::1]",
        "[::ffff:127.0.0.1]",
        "[::ffff:7f00:1]",
        "[0:0:0:0:0:ffff:7f00:1]",
        "[::127.0.0.1]",
        "[fe80::1%25eth0]",
        "localhost",
        "LOCALHOST",
        "localhost.",
        "api.localhost",
        "a.b.localhost.",
        "1.2.3.4.5",  # aiohttp would take it for an address without resolving it
        "999.1.1.1",
    ],
)
def test_hosts_denied_without_resolving(host: str) -> None:
    assert PUBLIC_ONLY.host_denial(host) is not None


@pytest.mark.parametrize(
    "host", ["example.com", "evil.test", "localhost.example.com", "mylocalhost", "8.8.8.8"]
)
def test_host_names_and_public_literals_pass_without_resolving(host: str) -> None:
    assert PUBLIC_ONLY.host_denial(host) is None


def test_localhost_names_are_allowed_only_with_both_loopback_addresses() -> None:
    assert policy(LOOPBACK_ONLY).host_denial("localhost") is not None  # ::1 is not allowed
    assert policy("127.0.0.0/8, ::1").host_denial("localhost") is None
    assert policy("127.0.0.0/8, ::1").host_denial("x.localhost") is None


@pytest.mark.parametrize(
    "url",
    [
        f"http://{fullwidth('127.0.0.1')}/h",  # IDNA maps full-width digits to ASCII
        "http://①②⑦.0.0.1/h",
        f"http://{fullwidth('localhost')}/h",
        "http://[::ffff:127.0.0.1]:8080/h",
        "https://0x7f000001:443/h?q=1",
    ],
)
def test_urls_are_judged_by_the_host_aiohttp_would_connect_to(url: str) -> None:
    assert PUBLIC_ONLY.url_denial(url) is not None


def test_parse_ip_literal() -> None:
    assert parse_ip_literal("[::ffff:127.0.0.1]") == ipaddress.ip_address("::ffff:7f00:1")
    assert parse_ip_literal("0x7f.1") == IPv4("127.0.0.1")
    assert parse_ip_literal("example.com") is None


# -- delivery: a fake resolver, a guard on every connection -------------------------------------


class FakeResolver(AbstractResolver):
    """Answers each name with the next of its answers (the last repeats); records each call."""

    def __init__(self, answers: dict[str, Sequence[Sequence[str]]]) -> None:
        self.answers = answers
        self.calls: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.calls.append(host)
        sequence = self.answers[host]
        addresses = sequence[min(self.calls.count(host), len(sequence)) - 1]
        return [
            ResolveResult(
                hostname=host,
                host=a,
                port=port,
                family=socket.AF_INET6 if ":" in a else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
            )
            for a in addresses
        ]

    async def close(self) -> None:
        pass


@dataclass
class Guard:
    """Every address aiohttp tried to connect to; non-loopback ones were refused unopened."""

    tried: list[str] = field(default_factory=list)


@pytest.fixture
def guard(monkeypatch: pytest.MonkeyPatch) -> Guard:
    record = Guard()
    original = aiohappyeyeballs.start_connection

    async def start_connection(addr_infos: Sequence[Any], **kwargs: Any) -> socket.socket:
        addresses = [info[4][0] for info in addr_infos]
        record.tried.extend(addresses)
        if not all(ipaddress.ip_address(a).is_loopback for a in addresses):
            raise ConnectionRefusedError("the test guard refuses non-loopback addresses")
        return await original(addr_infos, **kwargs)

    original_connect = socket.socket.connect

    def connect(self: socket.socket, address: Any) -> None:
        """A second net, below aiohttp: no socket reaches a non-loopback address."""
        if isinstance(address, tuple) and not ipaddress.ip_address(address[0]).is_loopback:
            raise ConnectionRefusedError("the test guard refuses non-loopback addresses")
        original_connect(self, address)

    # aiohttp creates every outgoing socket inside aiohappyeyeballs.start_connection
    monkeypatch.setattr(aiohappyeyeballs, "start_connection", start_connection)
    monkeypatch.setattr(socket.socket, "connect", connect)
    return record


def timer_for(url: str) -> Timer:
    return Timer(id=new_timer_id(), url=url, due_at_ms=0, created_at_ms=0, attempts=1)


async def deliver_with(
    url: str, resolver: AbstractResolver | None = None, allowed: str = ""
) -> Attempt:
    settings = Settings(allowed_networks=allowed, connect_timeout_s=2, delivery_timeout_s=2)
    async with Deliverer(settings, resolver) as deliverer:
        return await deliverer.deliver(timer_for(url))


def assert_denied(attempt: Attempt) -> None:
    assert (attempt.error, attempt.permanent, attempt.status) == (ADDRESS_DENIED, True, None)
    assert not attempt.delivered
    assert classify(attempt.status, permanent=attempt.permanent) is Verdict.PERMANENT


class CountingServer:
    """A loopback listener that counts the connections it accepts."""

    def __init__(self) -> None:
        self.accepted = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._probed: asyncio.Event | None = None

    async def __aenter__(self) -> CountingServer:
        self._probed = probed = asyncio.Event()

        async def count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.accepted += 1  # before any await: handlers start in the order of accepting
            if await reader.read(1) == b"\0":
                probed.set()
            writer.close()

        self._server = await asyncio.start_server(count, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def others(self) -> int:
        """Connections accepted before a probe of our own, counted once the probe arrives."""
        assert self._probed is not None
        _, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(b"\0")
        await writer.drain()
        async with asyncio.timeout(5):
            await self._probed.wait()
        writer.close()
        return self.accepted - 1


RESOLVED_DENIED = [
    "127.0.0.1",
    "10.0.0.1",
    "172.16.0.1",
    "192.168.0.1",
    mapped("127.0.0.1"),
    nat64("10.0.0.1"),
    sixtofour("10.0.0.1"),
    teredo("10.0.0.1"),
    "169.254.169.254",
    "fe80::1",
    "100.64.0.1",
    "0.0.0.0",
    "255.255.255.255",
    "224.0.0.1",
    "240.0.0.1",
    "192.0.2.1",
    "2001:db8::1",
    "fc00::1",
    "::1",
    "::",
]


@pytest.mark.parametrize("address", RESOLVED_DENIED)
def test_a_name_resolving_to_a_denied_address_fails_permanently_unconnected(
    guard: Guard, address: str
) -> None:
    resolver = FakeResolver({"evil.test": [[address]]})
    attempt = asyncio.run(deliver_with("http://evil.test/hooks", resolver))
    assert_denied(attempt)
    assert resolver.calls == ["evil.test"]
    assert guard.tried == []


@pytest.mark.parametrize(
    "answer",
    [
        ["8.8.8.8", "10.0.0.1"],
        ["10.0.0.1", "8.8.8.8"],
        ["2606:4700:4700::1111", "::1"],
        ["8.8.8.8", "fe80::1"],
        ["127.0.0.1", "10.0.0.1"],  # one allowed by TIMERD_ALLOWED_NETWORKS, one not
    ],
)
def test_every_address_of_an_answer_must_be_allowed(guard: Guard, answer: list[str]) -> None:
    resolver = FakeResolver({"mixed.test": [answer]})
    attempt = asyncio.run(deliver_with("http://mixed.test/h", resolver, allowed=LOOPBACK_ONLY))
    assert_denied(attempt)
    assert guard.tried == []


def test_a_name_bound_to_loopback_is_denied_at_a_listening_server() -> None:
    async def scenario() -> tuple[Attempt, int]:
        async with CountingServer() as server:
            resolver = FakeResolver({"evil.test": [["127.0.0.1"]]})
            attempt = await deliver_with(f"http://evil.test:{server.port}/h", resolver)
            return attempt, await server.others()

    attempt, accepted = asyncio.run(scenario())
    assert_denied(attempt)
    assert accepted == 0


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "127.1",
        "0x7f000001",
        "2130706433",
        "0177.0.0.1",
        "0",
        "127.0.0.1.",
        "[::1]",
        "[::ffff:127.0.0.1]",
        "[::127.0.0.1]",
        "localhost",
        "api.localhost",
        fullwidth("127.0.0.1"),
    ],
)
def test_a_literal_loopback_host_is_denied_before_any_resolution(guard: Guard, host: str) -> None:
    async def scenario() -> tuple[Attempt, int]:
        async with CountingServer() as server:
            resolver = FakeResolver({})
            attempt = await deliver_with(f"http://{host}:{server.port}/h", resolver)
            assert resolver.calls == []
            return attempt, await server.others()

    attempt, accepted = asyncio.run(scenario())
    assert_denied(attempt)
    assert (accepted, guard.tried) == (0, [])


@pytest.mark.parametrize(
    "host",
    ["10.0.0.1", "169.254.169.254", "[fe80::1]", "100.64.0.1", "[64:ff9b::a00:1]", "[fc00::1]"],
)
def test_a_literal_private_host_is_denied_unconnected(guard: Guard, host: str) -> None:
    attempt = asyncio.run(deliver_with(f"http://{host}/latest/meta-data", FakeResolver({})))
    assert_denied(attempt)
    assert guard.tried == []


def test_without_a_fake_resolver_loopback_is_still_denied(guard: Guard) -> None:
    assert_denied(asyncio.run(deliver_with("http://127.0.0.1:9/h")))
    assert_denied(asyncio.run(deliver_with("http://localhost:9/h")))
    assert guard.tried == []


def test_allowed_loopback_is_delivered_to_the_checked_address(guard: Guard) -> None:
    with Receiver() as receiver:
        resolver = FakeResolver({"hooks.test": [["127.0.0.1"]]})
        url = f"http://hooks.test:{receiver.port}/hooks"
        attempt = asyncio.run(deliver_with(url, resolver, allowed=LOOPBACK_ONLY))
        [arrival] = receiver.wait_for(1)
        literal = asyncio.run(deliver_with(receiver.url, allowed=LOOPBACK_ONLY))
        receiver.wait_for(2)
    assert attempt.delivered and literal.delivered
    assert not attempt.permanent
    assert arrival.path.startswith("/hooks/")
    assert guard.tried == ["127.0.0.1", "127.0.0.1"]  # the guard sees real connections


def test_rebinding_cannot_switch_the_address_after_the_check(guard: Guard) -> None:
    """The name answers an allowed address first and a denied one on every later lookup: the
    connection goes to the address checked, and a later lookup is checked again."""
    with Receiver() as receiver:
        resolver = FakeResolver({"rebind.test": [["127.0.0.1"], ["10.0.0.1"]]})
        url = f"http://rebind.test:{receiver.port}/hooks"
        first = asyncio.run(deliver_with(url, resolver, allowed=LOOPBACK_ONLY))
        receiver.wait_for(1)
        second = asyncio.run(deliver_with(url, resolver, allowed=LOOPBACK_ONLY))
    assert first.delivered
    assert_denied(second)
    assert resolver.calls == ["rebind.test", "rebind.test"]  # one lookup per delivery, no more
    assert guard.tried == ["127.0.0.1"]


# -- the daemon: a denied target ends the timer at once -----------------------------------------


def test_the_daemon_fails_a_denied_timer_at_once_without_sending(tmp_path: Path) -> None:
    db = tmp_path / "timerd.db"
    store_url = f"sqlite:///{db}"
    with Receiver() as receiver, TimerdProcesses(tmp_path) as procs:
        store = open_store(store_url)
        try:
            timer_id = new_timer_id()
            now_ms = time.time_ns() // 1_000_000
            store.insert(
                Timer(id=timer_id, url=receiver.url, due_at_ms=now_ms, created_at_ms=now_ms)
            )
        finally:
            store.close()
        procs.start(
            "daemon",
            store_url,
            env={"TIMERD_ALLOWED_NETWORKS": "", "TIMERD_POLL_INTERVAL_S": "0.2"},
        )

        def finished() -> Timer | None:
            s = open_store(store_url)
            try:
                timer = s.get(timer_id)
            finally:
                s.close()
            return timer if timer.state not in {State.PENDING, State.FIRING} else None

        timer = wait_until(finished, 15, "the timer's outcome")
        assert receiver.arrivals == []
    assert (timer.state, timer.attempts, timer.last_error) == (State.FAILED, 1, ADDRESS_DENIED)


# -- creation: literal denied hosts answer 422 and store nothing --------------------------------

CREATION_DENIED = [
    "http://127.0.0.1/h",
    "http://127.0.0.1:8080/h",
    "http://127.1/h",
    "http://0x7f000001/h",
    "http://2130706433/h",
    "http://0177.0.0.1/h",
    "http://0/h",
    "http://0.0.0.0:9/h",
    "http://127.0.0.1./h",
    "http://localhost/h",
    "http://LOCALHOST:3000/h",
    "http://localhost./h",
    "https://app.localhost/h",
    "http://[::1]/h",
    "http://[::]/h",
    "http://[::ffff:127.0.0.1]/h",
    "http://[::ffff:7f00:1]/h",
    "http://[::127.0.0.1]/h",
    "http://[fe80::1%25eth0]/h",
    "http://10.0.0.1/h",
    "http://172.16.0.1/h",
    "http://192.168.1.1/h",
    "http://169.254.169.254/latest/meta-data",
    "http://0xa9fea9fe/latest/meta-data",
    "http://100.64.0.1/h",
    "http://255.255.255.255/h",
    "http://224.0.0.1/h",
    "http://240.0.0.1/h",
    "http://192.0.2.1/h",
    "http://198.18.0.1/h",
    "http://[2001:db8::1]/h",
    "http://[fc00::1]/h",
    "http://[fe80::1]/h",
    f"http://[{nat64('10.0.0.1')}]/h",
    f"http://[{sixtofour('127.0.0.1')}]/h",
    f"http://[{teredo('10.0.0.1')}]/h",
    f"http://{fullwidth('127.0.0.1')}/h",
    "http://1.2.3.4.5/h",
]


def db_rows(db: Path) -> int:
    with closing(sqlite3.connect(db)) as conn:
        count: int = conn.execute("SELECT count(*) FROM timers").fetchone()[0]
        return count


@pytest.fixture(scope="module")
def apis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[str, Path]]]:
    """Two `timerd api` processes: default policy, and TIMERD_ALLOWED_NETWORKS=127.0.0.0/8."""
    path = tmp_path_factory.mktemp("ssrf-api")
    with TimerdProcesses(path) as procs:
        started: dict[str, tuple[str, Path]] = {}
        for name, allowed in (("default", ""), ("loopback", LOOPBACK_ONLY)):
            db = path / f"{name}.db"
            proc = procs.start("api", f"sqlite:///{db}", env={"TIMERD_ALLOWED_NETWORKS": allowed})
            started[name] = (proc.base_url, db)
        yield started


def post(base_url: str, url: str) -> httpx.Response:
    return httpx.post(f"{base_url}/timers", json={"seconds": 3600, "url": url}, timeout=5.0)


@pytest.mark.parametrize("url", CREATION_DENIED)
def test_a_denied_literal_host_is_refused_at_creation(
    apis: dict[str, tuple[str, Path]], url: str
) -> None:
    base_url, db = apis["default"]
    before = db_rows(db)
    answer = post(base_url, url)
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert (error["code"], error["field"]) == ("invalid_field", "url")
    assert "not a public address" in error["message"]
    assert db_rows(db) == before


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/hooks",
        "http://evil.test/h",
        "http://8.8.8.8/h",
        "http://[2606:4700::1]/",
    ],
)
def test_host_names_and_public_literals_are_accepted_unresolved(
    apis: dict[str, tuple[str, Path]], url: str
) -> None:
    assert post(apis["default"][0], url).status_code == 201


@pytest.mark.parametrize(
    ("url", "status"),
    [
        ("http://127.0.0.1:9/h", 201),
        ("http://127.1:9/h", 201),
        ("http://[::ffff:127.0.0.1]:9/h", 201),
        ("http://10.0.0.1/h", 422),
        ("http://[::1]/h", 422),
        ("http://localhost:9/h", 422),  # its ::1 is not allowed
        (f"http://[{sixtofour('127.0.0.1')}]/h", 422),
    ],
)
def test_allowed_networks_let_chosen_literals_through_at_creation(
    apis: dict[str, tuple[str, Path]], url: str, status: int
) -> None:
    answer = post(apis["loopback"][0], url)
    assert answer.status_code == status, answer.text
