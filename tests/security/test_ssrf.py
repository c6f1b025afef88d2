"""SSRF attacks on the outbound guard (``scaleodm.common.netguard``), as the attacker sends them.

Covers: every IPv6 form that carries an IPv4 address (mapped, compatible, translated, NAT64
well-known and local-use in each RFC 6052 layout, 6to4, Teredo server and client, ISATAP) around
loopback, RFC 1918 and cloud metadata, refused by a policy that allows nothing private, and
refused *because of the embedded address* once the IPv6 wrapper itself is allowed; the IANA
special-purpose blocks, refused even under a broad ``0.0.0.0/0``/``::/0`` entry and opened only
by an entry inside them; IPv4 literals in decimal, octal and hex as URL hosts, as the system
resolver turns them into 127.0.0.1; real requests through :class:`netguard.GuardedTransport`
to a listener on 127.0.0.1 via those forms, refused unless 127/8 is allowed (and then reached,
which shows each form is a real path); a hypothesis property tying every embedding of a refused
IPv4 address to a refusal. Leaves out DNS answers (faked in tests/unit/test_netguard.py) and
the callers (tests/security/test_webhook_attacks.py, tests/integration/test_webhooks.py).
"""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator

import httpx
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from scaleodm.common import netguard
from tests.harness import properties, servers

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address


def embeddings(a: V4) -> dict[str, V6]:
    """Every IPv6 address that carries ``a``, by form."""
    n = int(a)
    inv = n ^ 0xFFFFFFFF
    return {
        "mapped": V6(0xFFFF << 32 | n),
        "compatible": V6(n),
        "translated": V6(0xFFFF0000 << 32 | n),
        "nat64": V6(int(V6("64:ff9b::")) | n),
        "nat64-local-96": V6(int(V6("64:ff9b:1::")) | n),
        # RFC 6052 /48 layout: 16 bits, the zero "u" octet, 16 bits
        "nat64-local-48": V6(int(V6("64:ff9b:1::")) | (n >> 16) << 64 | (n & 0xFFFF) << 40),
        "nat64-local-64": V6(int(V6("64:ff9b:1::")) | n << 24),
        "6to4": V6(0x2002 << 112 | n << 80 | 1),
        "teredo-server": V6(0x20010000 << 96 | n << 64 | 0x8000_63BF_0808_0808 ^ 0xFFFFFFFF),
        "teredo-client": V6(int(V6("2001:0:4136:e378:8000:63bf::")) | inv),
        "isatap": V6(int(V6("2a00:1450:4001:81c::")) | 0x5EFE << 32 | n),
        "isatap-universal": V6(int(V6("2a00:1450:4001:81c::")) | 0x0200_5EFE << 32 | n),
    }


HOSTILE_V4 = {
    "127.0.0.1": netguard.PRIVATE_REASON,
    "10.0.0.1": netguard.PRIVATE_REASON,
    "169.254.169.254": netguard.METADATA_REASON,
}
# Allow entries that open each IPv6 wrapper, so only the embedded address can refuse it.
WRAPPERS_OPEN = ["::/96", "::ffff:0:0:0/96", "64:ff9b::/96", "64:ff9b:1::/48", "2002::/16",
                 "2001::/32", "2a00:1450:4001:81c::/64"]


@pytest.mark.parametrize(
    ("form", "v4"),
    [pytest.param(form, v4, id=f"{form}-{v4}")
     for v4 in HOSTILE_V4 for form in embeddings(V4(v4))],
)
def test_ipv6_carrying_a_private_ipv4_is_refused(form: str, v4: str) -> None:
    address = str(embeddings(V4(v4))[form])
    assert netguard.OutboundPolicy().refusal(address) is not None, address
    # Open every wrapper: the embedded address alone must still refuse it, and say so.
    reason = netguard.OutboundPolicy(WRAPPERS_OPEN).refusal(address)
    if form == "mapped":  # the IPv4 address itself, on the wire
        assert reason == HOSTILE_V4[v4]
    else:
        assert reason == f"embeds {v4}: {HOSTILE_V4[v4]}", address


@pytest.mark.parametrize("form", list(embeddings(V4("8.8.8.8"))))
def test_ipv6_carrying_a_public_ipv4_follows_its_wrapper(form: str) -> None:
    address = str(embeddings(V4("8.8.8.8"))[form])
    assert netguard.OutboundPolicy(WRAPPERS_OPEN).refusal(address) is None, address


@pytest.mark.parametrize(
    ("address", "reason", "inside"),
    [
        pytest.param("0.0.0.0", netguard.PRIVATE_REASON, "0.0.0.0/32", id="this-host"),
        pytest.param("0.1.2.3", netguard.PRIVATE_REASON, "0.0.0.0/8", id="this-network"),
        pytest.param("100.64.0.1", netguard.PRIVATE_REASON, "100.64.0.0/10", id="cgnat"),
        pytest.param("192.0.0.9", netguard.RESERVED_REASON, "192.0.0.0/24", id="ietf-v4"),
        pytest.param("192.0.2.1", netguard.RESERVED_REASON, "192.0.2.0/24", id="test-net-1"),
        pytest.param("198.18.0.1", netguard.RESERVED_REASON, "198.18.0.0/15", id="benchmark"),
        pytest.param("198.51.100.1", netguard.RESERVED_REASON, "198.51.100.0/24", id="test-net-2"),
        pytest.param("203.0.113.1", netguard.RESERVED_REASON, "203.0.113.0/24", id="test-net-3"),
        pytest.param("192.88.99.1", netguard.RESERVED_REASON, "192.88.99.0/24", id="6to4-relay"),
        pytest.param("224.0.0.1", netguard.RESERVED_REASON, "224.0.0.0/4", id="multicast-v4"),
        pytest.param("239.255.255.250", netguard.RESERVED_REASON, "239.0.0.0/8", id="ssdp"),
        pytest.param("240.0.0.1", netguard.RESERVED_REASON, "240.0.0.0/4", id="future-use"),
        pytest.param("255.255.255.255", netguard.RESERVED_REASON, "255.255.255.255/32",
                     id="broadcast"),
        pytest.param("::", netguard.PRIVATE_REASON, "::/128", id="unspecified-v6"),
        pytest.param("::1", netguard.PRIVATE_REASON, "::1/128", id="loopback-v6"),
        pytest.param("100::1", netguard.RESERVED_REASON, "100::/64", id="discard"),
        pytest.param("2001:2::1", netguard.RESERVED_REASON, "2001::/23", id="benchmark-v6"),
        pytest.param("2001:20::1", netguard.RESERVED_REASON, "2001::/23", id="orchid"),
        pytest.param("2001:db8::1", netguard.RESERVED_REASON, "2001:db8::/32", id="doc-v6"),
        pytest.param("3fff::1", netguard.RESERVED_REASON, "3fff::/20", id="doc-v6-new"),
        pytest.param("5f00::1", netguard.RESERVED_REASON, "5f00::/16", id="srv6"),
        pytest.param("fc00::1", netguard.PRIVATE_REASON, "fc00::/7", id="ula-fc"),
        pytest.param("fd12:3456::1", netguard.PRIVATE_REASON, "fd00::/8", id="ula-fd"),
        pytest.param("fec0::1", netguard.PRIVATE_REASON, "fec0::/10", id="site-local"),
        pytest.param("ff02::1", netguard.RESERVED_REASON, "ff00::/8", id="multicast-v6"),
        pytest.param("1000::1", netguard.RESERVED_REASON, "1000::/4", id="unassigned-v6"),
        pytest.param("4000::1", netguard.RESERVED_REASON, "4000::/3", id="unassigned-v6-high"),
        pytest.param("fe80::1", netguard.METADATA_REASON, "fe80::/64", id="link-local-v6"),
        pytest.param("169.254.169.254", netguard.METADATA_REASON, "169.254.169.254/32",
                     id="metadata"),
    ],
)
def test_reserved_blocks_need_an_allow_entry_inside_them(
    address: str, reason: str, inside: str
) -> None:
    assert netguard.OutboundPolicy().refusal(address) == reason
    broad = netguard.OutboundPolicy(["0.0.0.0/0", "::/0"])
    assert broad.refusal(address) == reason, "a broad entry must not open a reserved block"
    assert netguard.OutboundPolicy([inside]).refusal(address) is None


@pytest.mark.parametrize(
    ("address", "allow"),
    [
        pytest.param("127.0.0.1", ["127.0.0.0/8"], id="loopback"),  # the tests and `task up`
        pytest.param("10.1.2.3", ["0.0.0.0/0"], id="rfc1918-by-broad-entry"),
        pytest.param("192.168.1.10", ["192.168.1.0/24"], id="rfc1918"),
        pytest.param("64:ff9b::808:808", [], id="nat64-public"),
        pytest.param("2002:808:808::1", [], id="6to4-public"),
        pytest.param("2a00:1450:4001:81c::200e", [], id="public-v6"),
        pytest.param("1.1.1.1", [], id="public-v4"),
    ],
)
def test_still_allowed(address: str, allow: list[str]) -> None:
    assert netguard.OutboundPolicy(allow).refusal(address) is None


@pytest.mark.parametrize(
    "host",
    [
        pytest.param("2130706433", id="decimal"),
        pytest.param("0x7f000001", id="hex"),
        pytest.param("0x7f.1", id="hex-short"),
        pytest.param("017700000001", id="octal"),
        pytest.param("0177.0.0.1", id="octal-dotted"),
        pytest.param("127.1", id="short"),
    ],
)
async def test_numeric_host_forms_resolve_to_loopback_and_are_refused(host: str) -> None:
    assert await netguard.resolve(host, 80) == ["127.0.0.1"]
    with pytest.raises(netguard.RefusedAddressError) as info:
        await netguard.OutboundPolicy().resolve_checked(host, 80)
    assert str(info.value) == f"{host} resolves to 127.0.0.1, refused (private/loopback address)"


@pytest.fixture(scope="module")
async def listener() -> AsyncIterator[tuple[int, list[bytes]]]:
    """An HTTP server on 127.0.0.1 answering 200; records each request head."""
    async with servers.recording_http_server() as server:
        yield server


PRIVATE = netguard.PRIVATE_REASON
EMBEDS_LOOPBACK = f"embeds 127.0.0.1: {netguard.PRIVATE_REASON}"


@pytest.mark.integration  # a real HTTP listener on loopback
@pytest.mark.parametrize(
    ("host", "reason", "opened_by"),
    [
        pytest.param("[::ffff:127.0.0.1]", PRIVATE, "127.0.0.0/8", id="mapped-dotted"),
        pytest.param("[::ffff:7f00:1]", PRIVATE, "127.0.0.0/8", id="mapped-hex"),
        pytest.param("2130706433", PRIVATE, "127.0.0.0/8", id="decimal"),
        pytest.param("0x7f.1", PRIVATE, "127.0.0.0/8", id="hex"),
        pytest.param("017700000001", PRIVATE, "127.0.0.0/8", id="octal"),
        pytest.param("127.1", PRIVATE, "127.0.0.0/8", id="short"),
        # Linux connects 0.0.0.0 to the local host: a loopback service answers
        pytest.param("0.0.0.0", PRIVATE, "0.0.0.0/8", id="this-host"),
        pytest.param("0", PRIVATE, "0.0.0.0/8", id="zero"),
        pytest.param("[::127.0.0.1]", netguard.RESERVED_REASON, None, id="compatible"),
        pytest.param("[64:ff9b::7f00:1]", EMBEDS_LOOPBACK, None, id="nat64"),
        pytest.param("[2002:7f00:1::1]", EMBEDS_LOOPBACK, None, id="6to4"),
        pytest.param("[2001:0:4136:e378:8000:63bf:80ff:fffe]", netguard.RESERVED_REASON, None,
                     id="teredo-client"),
        pytest.param("[2a00:1450:4001:81c::5efe:7f00:1]", EMBEDS_LOOPBACK, None, id="isatap"),
    ],
)
async def test_guarded_request_to_loopback_in_disguise_is_refused(
    listener: tuple[int, list[bytes]], host: str, reason: str, opened_by: str | None
) -> None:
    port, heads = listener
    url = f"http://{host}:{port}/internal"
    before = len(heads)
    transport = netguard.GuardedTransport(netguard.OutboundPolicy(["10.0.0.0/8"]))
    async with httpx.AsyncClient(transport=transport, timeout=5) as client:
        with pytest.raises(httpx.ConnectError) as info:
            await client.get(url)
    refusal = netguard.refusal_of(info.value)
    assert refusal is not None and refusal.endswith(f" refused ({reason})"), info.value
    assert len(heads) == before, "nothing may reach the listener"
    if opened_by is None:
        return  # no translator or relay here: nothing could connect anyway
    # The same URL reaches the listener once its block is allowed: a real path, refused above.
    transport = netguard.GuardedTransport(netguard.OutboundPolicy([opened_by]))
    async with httpx.AsyncClient(transport=transport, timeout=5) as client:
        assert (await client.get(url)).text == "ok"
    assert len(heads) == before + 1


POLICIES = [
    [],
    ["127.0.0.0/8"],
    ["0.0.0.0/0", "::/0"],
    WRAPPERS_OPEN,
    WRAPPERS_OPEN + ["10.0.0.0/8", "0.0.0.0/0", "::/0"],
]
# Mostly addresses from the refused blocks, so the property is not vacuous.
REFUSED_V4_BLOCKS = [r.network for r in netguard.REFUSED_RANGES if r.network.version == 4]


@settings(max_examples=properties.examples(300), deadline=None, derandomize=True)
@given(
    a=st.one_of(
        st.sampled_from(REFUSED_V4_BLOCKS).flatmap(lambda n: st.ip_addresses(network=n)),
        st.ip_addresses(v=4),
    ),
    allow=st.sampled_from(POLICIES),
    rest=st.integers(0, 2**80 - 1),
)
def test_every_embedding_of_a_refused_ipv4_is_refused(
    a: V4, allow: list[str], rest: int
) -> None:
    policy = netguard.OutboundPolicy(allow)
    assume(policy.refusal(str(a)) is not None)
    forms = embeddings(a)
    # 6to4 and ISATAP leave other bits to the sender: vary them
    forms["6to4-any"] = V6(0x2002 << 112 | int(a) << 80 | rest)
    forms["isatap-any-prefix"] = V6((rest & (2**64 - 1)) << 64 | 0x5EFE << 32 | int(a))
    for form, address in forms.items():
        assert policy.refusal(str(address)) is not None, (form, str(address), allow)
