"""Outbound SSRF guard for user-given URLs (webhooks, zipurl), checked on the resolved address.

Which addresses are public is decided by explicit tables (:data:`REFUSED_RANGES`, from IANA's
IPv4 and IPv6 special-purpose and address-space registries), not by ``ipaddress``'s
``is_global``, whose answers change between Python versions (and call IPv4 multicast global).
Two tiers: the private-use blocks (RFC 1918, loopback ``127.0.0.0/8``) are refused unless an
allow-list entry contains the address, so ``0.0.0.0/0`` or ``10.0.0.0/8`` opens them as before;
link-local, cloud metadata and the reserved blocks (``0.0.0.0/8``, CGNAT, ULA, ``::1``,
documentation, benchmarking, multicast, IETF protocol assignments, every IPv6 block outside
global unicast ``2000::/3``, ...) are refused unless an allow-list entry lies *inside* the block,
so a broad entry never opens them by accident.

IPv6 can carry an IPv4 address inside it (NAT64, IPv4-compatible and -translated, 6to4, Teredo,
ISATAP): a translator or relay may then connect to that IPv4 for us. An IPv4-mapped address is
the IPv4 address itself and is judged as one; for every other IPv6 address, every IPv4 address
it embeds is judged too, and one refused embedded address refuses the IPv6 address
(:func:`embedded_ipv4`).

The check happens inside the connection: :class:`GuardedTransport` is an httpx transport whose
``httpcore`` network backend resolves the host, checks **every** address it resolves to (a name
answering one public and one private address is refused) and connects to the checked IP. The
check and the connection thus use the same address, so DNS rebinding cannot slip a different
answer in between; TLS still uses the URL's host name for SNI and certificates, and the Host
header is the URL's. Redirects are new connections and are checked again. A client built on
this transport ignores proxy environment variables (a proxy would connect on our behalf).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import urllib.parse
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import httpcore
import httpx

from scaleodm.common.logging import get_logger

log = get_logger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

LINK_LOCAL_OR_METADATA: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("169.254.0.0/16"),  # link-local; AWS/GCP/Azure metadata 169.254.169.254
    ipaddress.ip_network("fe80::/10"),
    ipaddress.ip_network("fd00:ec2::254/128"),  # AWS metadata over IPv6
    ipaddress.ip_network("100.100.100.200/32"),  # Alibaba Cloud metadata
)
METADATA_REASON = "link-local/metadata address"
PRIVATE_REASON = "private/loopback address"
RESERVED_REASON = "reserved address"


class Range(NamedTuple):
    """A block of addresses refused unless the allow-list opens it."""

    network: IPNetwork
    reason: str
    strict: bool  # opened only by an allow entry inside the block, not by a broader one


def _ranges(reason: str, strict: bool, *cidrs: str) -> tuple[Range, ...]:
    return tuple(Range(ipaddress.ip_network(c), reason, strict) for c in cidrs)


def _outside(*kept: str) -> tuple[Range, ...]:
    """The IPv6 space minus ``kept``, as the fewest CIDR blocks (reserved, strict)."""
    blocks = [ipaddress.IPv6Network("::/0")]
    for keep in map(ipaddress.IPv6Network, kept):
        blocks = [
            piece
            for block in blocks
            if not block.subnet_of(keep)
            for piece in (block.address_exclude(keep) if keep.subnet_of(block) else [block])
        ]
    return tuple(Range(b, RESERVED_REASON, True) for b in sorted(blocks))


NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052; public iff its IPv4 is
NAT64_LOCAL_USE = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215
SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")  # RFC 3056
TEREDO = ipaddress.IPv6Network("2001::/32")  # RFC 4380

# Checked in this order; the first block that contains the address and is not opened gives the
# reason. IANA IPv4/IPv6 Special-Purpose Address Registries (entries not globally reachable, or
# not unicast) and the IPv6 Address Space registry (everything outside 2000::/3 is unassigned,
# ULA, link-local, deprecated site-local or multicast).
REFUSED_RANGES: tuple[Range, ...] = (
    *(Range(n, METADATA_REASON, True) for n in LINK_LOCAL_OR_METADATA),
    *_ranges(PRIVATE_REASON, False, "10.0.0.0/8", "127.0.0.0/8", "172.16.0.0/12",
             "192.168.0.0/16"),
    *_ranges(
        PRIVATE_REASON, True,
        "0.0.0.0/8",  # "this network": 0.0.0.0 reaches the local host on Linux
        "100.64.0.0/10",  # shared address space (carrier-grade NAT)
        "::/128", "::1/128",  # unspecified (reaches the local host, as 0.0.0.0), loopback
        "fc00::/7", "fec0::/10",  # unique local, deprecated site-local
    ),
    *_ranges(
        RESERVED_REASON, True,
        "192.0.0.0/24",  # IETF protocol assignments (DS-Lite, NAT64 discovery, anycast)
        "192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24",  # documentation
        "192.88.99.0/24",  # deprecated 6to4 relay anycast
        "198.18.0.0/15",  # benchmarking
        "224.0.0.0/4", "240.0.0.0/4", "255.255.255.255/32",  # multicast, future use, broadcast
        "::/96",  # deprecated IPv4-compatible
        "::ffff:0:0:0/96",  # IPv4-translated (SIIT)
        str(NAT64_LOCAL_USE),
        "100::/64",  # discard-only
        "2001::/23",  # IETF protocol assignments: Teredo, benchmarking, ORCHID, ...
        "2001:db8::/32", "3fff::/20",  # documentation
        "5f00::/16",  # SRv6 segment identifiers
        "ff00::/8",  # multicast
    ),
    *_outside("2000::/3", str(NAT64_WELL_KNOWN)),
)


class RefusedAddressError(httpcore.ConnectError):
    """A target resolved to an address the outbound policy refuses; the message says why."""


class ResolveError(httpcore.ConnectError):
    """A target's host name does not resolve."""


class InvalidTargetError(ValueError):
    """A user-given URL that can never be fetched or posted to; the message says why."""


MAX_URL_LENGTH = 2048
_CONTROL_OR_SPACE = re.compile(r"[\x00-\x20\x7f]")


def validate_url(
    url: str, *, schemes: Sequence[str] = ("http", "https"), max_length: int = MAX_URL_LENGTH
) -> urllib.parse.SplitResult:
    """``url`` split, when it is a well-formed absolute URL of one of ``schemes`` with a host.

    Refuses (``InvalidTargetError``) what no request could ever use: over ``max_length``
    characters, control characters or spaces, another scheme (``file:``, ``gopher:``, ...), no
    host, a bad port or a malformed IPv6 literal. Says nothing about where the host resolves to:
    that is :meth:`OutboundPolicy.resolve_checked`'s job, at submission and again at connect.
    """
    if len(url) > max_length:
        raise InvalidTargetError(f"URL longer than {max_length} characters")
    if _CONTROL_OR_SPACE.search(url):
        raise InvalidTargetError("URL contains spaces or control characters")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
        host = parts.hostname
        httpx.URL(url)
    except (ValueError, httpx.InvalidURL) as exc:
        raise InvalidTargetError(f"malformed URL ({exc})") from exc
    if parts.scheme.lower() not in schemes:
        wanted = ", ".join(f"{s}://" for s in schemes)
        raise InvalidTargetError(f"unsupported URL scheme {parts.scheme!r} (expected {wanted})")
    if not host:
        raise InvalidTargetError("URL has no host")
    if port == 0:
        raise InvalidTargetError("URL has port 0")
    return parts


def _unmapped(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _bits(value: int, start: int, length: int) -> int:
    """``length`` bits of a 128-bit ``value`` from bit ``start`` (0 = most significant)."""
    return (value >> (128 - start - length)) & ((1 << length) - 1)


def _local_nat64(n: int) -> list[int]:
    """The IPv4 addresses a ``64:ff9b:1::/48`` address carries in the RFC 6052 layouts it fits."""
    if _bits(n, 64, 8) != 0:  # the "u" octet must be zero: no layout fits, read it as a /96
        return [_bits(n, 96, 32)]
    layouts = (  # (IPv4 around the "u" octet, the suffix after it, which must be zero)
        (_bits(n, 48, 16) << 16 | _bits(n, 72, 16), _bits(n, 88, 40)),  # /48
        (_bits(n, 56, 8) << 24 | _bits(n, 72, 24), _bits(n, 96, 32)),  # /56
        (_bits(n, 72, 32), _bits(n, 104, 24)),  # /64
        (_bits(n, 96, 32), 0),  # /96
    )
    # An all-zero field carries nothing (a shorter layout's suffix read as a /96); when every
    # field is zero, the address stands for 0.0.0.0.
    return [v4 for v4, suffix in layouts if suffix == 0 and v4 != 0] or [0]


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """Every IPv4 address a relay or translator could reach on behalf of ``ip``.

    IPv4-compatible ``::a.b.c.d`` (not ``::`` or ``::1``) and IPv4-translated
    ``::ffff:0:a.b.c.d``; NAT64 well-known ``64:ff9b::/96``; NAT64 local-use ``64:ff9b:1::/48``,
    where the operator's prefix may be a /48, /56, /64 or /96 (RFC 6052 §2.2), so the IPv4 of
    every layout the address fits (zero "u" octet, zero suffix) counts; 6to4 ``2002:AABB:CCDD::``
    (bits 16-47); Teredo ``2001:0:SSSS:SSSS:...:CCCC:CCCC`` (server, and client with its bits
    inverted); ISATAP interface identifiers ``::0:5efe:a.b.c.d`` and ``::200:5efe:a.b.c.d`` under
    any prefix. IPv4-mapped addresses are not listed: they *are* the IPv4 address
    (:meth:`OutboundPolicy.refusal` judges them as one).
    """
    n = int(ip)
    found: list[int] = []
    if n >> 32 in (0, 0xFFFF0000) and n > 1:  # compatible, translated
        found.append(n & 0xFFFFFFFF)
    if ip in NAT64_WELL_KNOWN:
        found.append(_bits(n, 96, 32))
    if ip in NAT64_LOCAL_USE:
        found += _local_nat64(n)
    if ip in SIX_TO_FOUR:
        found.append(_bits(n, 16, 32))
    if ip in TEREDO:
        found += [_bits(n, 32, 32), _bits(n, 96, 32) ^ 0xFFFFFFFF]
    if _bits(n, 64, 32) & 0xFDFFFFFF == 0x00005EFE:  # ISATAP, universal/local bit either way
        found.append(_bits(n, 96, 32))
    return [ipaddress.IPv4Address(v) for v in dict.fromkeys(found)]


def _inside(net: IPNetwork, outer: IPNetwork) -> bool:
    return (
        net.version == outer.version
        and net.network_address in outer
        and net.prefixlen >= outer.prefixlen
    )


class OutboundPolicy:
    """Which resolved addresses outbound requests may connect to."""

    def __init__(self, allow: Iterable[IPNetwork | str] = ()) -> None:
        self.allow = tuple(ipaddress.ip_network(n) if isinstance(n, str) else n for n in allow)

    def _opens(self, block: Range, ip: IPAddress) -> bool:
        return any(
            net.version == ip.version and ip in net
            and (not block.strict or _inside(net, block.network))
            for net in self.allow
        )

    def _block_refusal(self, ip: IPAddress) -> str | None:
        for block in REFUSED_RANGES:
            if block.network.version == ip.version and ip in block.network:
                if not self._opens(block, ip):
                    return block.reason
        return None

    def refusal(self, address: str) -> str | None:
        """None when ``address`` (an IP literal) may be connected to, else the reason."""
        ip = _unmapped(ipaddress.ip_address(address.split("%", 1)[0]))
        reason = self._block_refusal(ip)
        if reason is not None or not isinstance(ip, ipaddress.IPv6Address):
            return reason
        for inner in embedded_ipv4(ip):
            reason = self._block_refusal(inner)
            if reason is not None:
                return f"embeds {inner}: {reason}"
        return None

    async def resolve_checked(self, host: str, port: int) -> list[str]:
        """Every address ``host`` resolves to, all allowed, else :class:`RefusedAddressError`."""
        addresses = await resolve(host, port)
        for address in addresses:
            reason = self.refusal(address)
            if reason is not None:
                if host.strip("[]") == address:
                    raise RefusedAddressError(f"{address} refused ({reason})")
                if _numeric_host(host):  # 2130706433, 0x7f.1, [::ffff:7f00:1]: no DNS involved
                    raise RefusedAddressError(f"{host} resolves to {address}, refused ({reason})")
                # The address stays in the operator's log: told to the client, it would answer
                # questions about internal DNS names.
                log.info("outbound target refused", host=host, address=address, reason=reason)
                kind = reason.split(": ", 1)[-1]  # "embeds a.b.c.d: <kind>" names the address
                raise RefusedAddressError(f"{host} refused (it resolves to a {kind})")
        return addresses


def _numeric_host(host: str) -> bool:
    """Whether ``host`` is an address written as a number (no resolver answer is disclosed)."""
    bare = host.strip("[]").split("%", 1)[0]
    try:
        ipaddress.ip_address(bare)
        return True
    except ValueError:
        pass
    try:
        socket.inet_aton(bare)  # the classic forms getaddrinfo accepts: 127.1, 0x7f.1, 017...
        return True
    except OSError:
        return False


async def resolve(host: str, port: int) -> list[str]:
    """The host's addresses (IP literals pass through), in resolver order, deduplicated."""
    bare = host.strip("[]")
    try:
        return [str(ipaddress.ip_address(bare.split("%", 1)[0]))]
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            bare, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
    except OSError as exc:
        raise ResolveError(f"cannot resolve {bare}: {exc}") from exc
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """An httpcore network backend connecting only to addresses the policy allows."""

    def __init__(self, policy: OutboundPolicy, inner: httpcore.AsyncNetworkBackend | None = None):
        self.policy = policy
        self.inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await self.policy.resolve_checked(host, port)
        last: Exception | None = None
        for address in addresses:  # connect to the very addresses just checked
            try:
                return await self.inner.connect_tcp(
                    address, port, timeout=timeout, local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise RefusedAddressError(f"unix socket {path} refused")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


class GuardedTransport(httpx.AsyncHTTPTransport):
    """``httpx.AsyncHTTPTransport`` whose connections go through :class:`GuardedBackend`."""

    def __init__(self, policy: OutboundPolicy, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # The pool is the transport's only connection path; swap in its backend (httpx takes
        # no network_backend argument, httpcore's pool does).
        self._pool._network_backend = GuardedBackend(policy)


def refusal_of(exc: BaseException) -> str | None:
    """The refusal message when ``exc`` (an httpx error) came from the guard, else None."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, RefusedAddressError):
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    return None
