"""Outbound SSRF guard for user-given URLs (webhooks, zipurl), checked on the resolved address.

Link-local and cloud-metadata addresses are always refused unless an allow-list entry lies inside
them (a broad ``0.0.0.0/0`` does not open them); every other non-public address (loopback, RFC1918,
ULA, CGNAT, ...) is refused unless an allow-list entry contains it.

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
from typing import Any

import httpcore
import httpx

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


class OutboundPolicy:
    """Which resolved addresses outbound requests may connect to."""

    def __init__(self, allow: Iterable[IPNetwork | str] = ()) -> None:
        self.allow = tuple(ipaddress.ip_network(n) if isinstance(n, str) else n for n in allow)

    def _allowed(self, ip: IPAddress, *, inside: Sequence[IPNetwork] = ()) -> bool:
        for net in self.allow:
            if net.version != ip.version or ip not in net:
                continue
            if not inside or any(
                net.version == r.version and net.subnet_of(r) for r in inside  # type: ignore[arg-type]
            ):
                return True
        return False

    def refusal(self, address: str) -> str | None:
        """None when ``address`` (an IP literal) may be connected to, else the reason."""
        ip = _unmapped(ipaddress.ip_address(address.split("%", 1)[0]))
        if any(ip.version == n.version and ip in n for n in LINK_LOCAL_OR_METADATA):
            if self._allowed(ip, inside=LINK_LOCAL_OR_METADATA):
                return None
            return METADATA_REASON
        if ip.is_global or self._allowed(ip):
            return None
        return PRIVATE_REASON

    async def resolve_checked(self, host: str, port: int) -> list[str]:
        """Every address ``host`` resolves to, all allowed, else :class:`RefusedAddressError`."""
        addresses = await resolve(host, port)
        for address in addresses:
            reason = self.refusal(address)
            if reason is not None:
                shown = host if host == address else f"{host} resolves to {address},"
                raise RefusedAddressError(f"{shown} refused ({reason})")
        return addresses


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
