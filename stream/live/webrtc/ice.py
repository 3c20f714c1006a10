"""ICE setup shared by WHIP and WHEP: which local addresses and UDP ports to use, which STUN/TURN servers.

aiortc's defaults suit a desktop on the internet, not this service: it asks Google's STUN server
(unreachable offline, and a needless outside dependency for a control room) and never offers
127.0.0.1, so two peers on one host without a routable interface cannot connect. Here nothing
external is used unless configured, and the host addresses to offer can be pinned, either to
loopback (tests, single-host installs) or to the one interface a multi-homed server should use.
A socket bound to an address can only reach what that address routes to, so pinning also limits
where a client's offer can make this server send its ICE checks (STUN) to.

The local UDP ports can be held to a range (``udp_ports``), so a firewall can open exactly that
range for WebRTC media. aioice (0.13) has no such option: it binds each host candidate with
``loop.create_datagram_endpoint(..., local_addr=(address, 0))``. :func:`set_udp_ports` therefore
wraps aioice's per-component gathering to mark (in a context variable) that a host candidate is
being bound, and wraps the running loop's ``create_datagram_endpoint`` to bind such a socket to
the first free port of the range, from a random start, instead of port 0. Every other datagram
endpoint of the process is created as before. Each WebRTC session holds one port per host address.

aioice reads its host addresses through a module-level function, so these choices are process-wide:
every peer connection of the process offers the same addresses and uses the same port range.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import ipaddress
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aioice.ice
from aiortc import RTCConfiguration, RTCIceServer

log = logging.getLogger(__name__)
T = TypeVar("T")

_ORIGINAL_HOST_ADDRESSES: Callable[[bool, bool], list[str]] = aioice.ice.get_host_addresses
_ORIGINAL_COMPONENT_CANDIDATES = aioice.ice.Connection.get_component_candidates
_udp_ports: tuple[int, int] | None = None
_binding_ports: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
    "ice_udp_ports", default=None)
"""set while aioice gathers host candidates with a port range in force (and only then)"""
ICE_SCHEMES = ("stun:", "turn:", "turns:")


def _check_port_range(ports: tuple[int, int] | None) -> None:
    if ports is not None and not (len(ports) == 2 and 1 <= ports[0] <= ports[1] <= 65535):
        raise ValueError(f"UDP port range {ports!r} is not (first, last) with 1 <= first <= last <= 65535")


@dataclass(frozen=True)
class IceServer:
    """One STUN or TURN server. The credential is a secret: it is kept out of ``repr`` and logs."""

    urls: tuple[str, ...]
    username: str | None = None
    credential: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.urls:
            raise ValueError("an ICE server needs at least one URL (stun:host:port or turn:host:port)")
        for url in self.urls:
            if not url.startswith(ICE_SCHEMES):
                shown = url.split("@")[-1]  # never echo user:password@ back
                raise ValueError(f"ICE server URL {shown!r} is not stun:, turn: or turns:; "
                                 "write e.g. turn:turn.example.org:3478?transport=udp")


@dataclass(frozen=True)
class IceConfig:
    """What a peer connection gathers: host candidates on ``host_addresses``, plus the servers' ones.

    ``host_addresses=None`` keeps aioice's choice (every interface address except loopback);
    ``("127.0.0.1",)`` offers loopback only, which is what two peers on one offline host need.
    ``servers`` is empty by default: no STUN request ever leaves the host unless configured.
    """

    servers: tuple[IceServer, ...] = ()
    host_addresses: tuple[str, ...] | None = None
    udp_ports: tuple[int, int] | None = None
    """``(first, last)`` local UDP ports host candidates bind to (None: any ephemeral port)"""

    def __post_init__(self) -> None:
        for addr in self.host_addresses or ():
            try:
                ipaddress.ip_address(addr)
            except ValueError:
                raise ValueError(f"ICE host address {addr!r} is not an IP address; "
                                 "write e.g. 127.0.0.1 or 10.0.0.5") from None
        _check_port_range(self.udp_ports)


LOOPBACK = IceConfig(host_addresses=("127.0.0.1",))
"""Both peers on this host, no network needed (tests, demos)."""


def host_addresses_for(listen_host: str | None) -> tuple[str, ...] | None:
    """The host candidates that match the HTTP listen address: that one address, or None (aioice's choice).

    A server told to listen on one address (``127.0.0.1``, ``10.0.0.5``) should not offer media on
    the others; ``0.0.0.0``, ``::``, a host name or None leave aioice's default of every interface
    address except loopback.
    """
    if not listen_host:
        return None
    try:
        ip = ipaddress.ip_address(listen_host)
    except ValueError:
        return None
    return None if ip.is_unspecified else (str(ip),)


def set_host_addresses(addresses: Sequence[str] | None) -> None:
    """Make aioice offer exactly ``addresses`` as host candidates (``None`` restores its default).

    Process-wide, since aioice looks the function up at gather time; the last call wins.
    """
    if addresses is None:
        aioice.ice.get_host_addresses = _ORIGINAL_HOST_ADDRESSES
        return
    pinned = [ipaddress.ip_address(a) for a in addresses]

    def get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [str(a) for a in pinned if (a.version == 4 and use_ipv4) or (a.version == 6 and use_ipv6)]

    aioice.ice.get_host_addresses = get_host_addresses
    log.info("WebRTC: offering host candidates on %s only", ", ".join(str(a) for a in pinned))


def set_udp_ports(ports: tuple[int, int] | None) -> None:
    """Bind host candidates to local UDP ports in ``ports`` (``(first, last)``); None restores any port.

    Process-wide, like :func:`set_host_addresses`; the last call wins. See the module docstring for
    how the range is applied to aioice.
    """
    global _udp_ports
    _check_port_range(ports)
    _udp_ports = None if ports is None else (int(ports[0]), int(ports[1]))
    if ports is None:
        aioice.ice.Connection.get_component_candidates = _ORIGINAL_COMPONENT_CANDIDATES  # type: ignore[method-assign]
        return
    aioice.ice.Connection.get_component_candidates = _component_candidates_in_range  # type: ignore[method-assign]
    log.info("WebRTC: host candidates bind to UDP ports %d-%d", *ports)


async def _component_candidates_in_range(self: aioice.ice.Connection, component: int, addresses: list[str],
                                         timeout: int = 5) -> list[aioice.Candidate]:
    """aioice's gathering, with the host candidates' sockets bound inside the configured port range."""
    ports = _udp_ports
    if ports is None:
        return await _ORIGINAL_COMPONENT_CANDIDATES(self, component, addresses, timeout)
    _bind_in_range_on(asyncio.get_running_loop())
    token = _binding_ports.set(ports)
    try:
        return await _ORIGINAL_COMPONENT_CANDIDATES(self, component, addresses, timeout)
    finally:
        _binding_ports.reset(token)


def _bind_in_range_on(loop: asyncio.AbstractEventLoop) -> None:
    """Wrap ``loop.create_datagram_endpoint`` once, so that host candidate sockets bind in the range.

    The wrapper changes nothing unless called while :data:`_binding_ports` is set, for a socket
    bound to ``(address, 0)`` with no remote address (exactly how aioice binds a host candidate).
    """
    create = loop.create_datagram_endpoint
    if getattr(create, "_binds_in_port_range", False):
        return

    async def create_datagram_endpoint(protocol_factory: Callable[[], asyncio.DatagramProtocol],
                                       local_addr: tuple[str, int] | None = None,
                                       remote_addr: tuple[str, int] | None = None,
                                       **kwargs: Any) -> tuple[asyncio.DatagramTransport, Any]:
        ports = _binding_ports.get()
        if ports is None or local_addr is None or local_addr[1] != 0 or remote_addr is not None:
            return await create(protocol_factory, local_addr=local_addr, remote_addr=remote_addr, **kwargs)
        return await bind_in_range(
            lambda port: create(protocol_factory, local_addr=(local_addr[0], port), **kwargs),
            local_addr[0], ports)

    create_datagram_endpoint._binds_in_port_range = True  # type: ignore[attr-defined]
    try:
        loop.create_datagram_endpoint = create_datagram_endpoint  # type: ignore[method-assign]
    except AttributeError:  # a loop implementation whose methods cannot be replaced (e.g. uvloop)
        raise RuntimeError("webrtc.udp_ports needs asyncio's own event loop; this loop "
                           f"({type(loop).__name__}) cannot be told which ports to bind") from None


async def bind_in_range(bind: Callable[[int], Awaitable[T]], host: str, ports: tuple[int, int]) -> T:
    """``bind(port)`` for the ports of ``ports`` from a random one on, until one is free.

    Only "address in use" moves on to the next port; any other error (the address is not on this
    host, say) would be the same on every port and is raised at once. A random start spreads
    sessions over the range and keeps the next session's port from being predictable.
    """
    first, last = ports
    span = last - first + 1
    start = random.randrange(span)
    for i in range(span):
        port = first + (start + i) % span
        try:
            return await bind(port)
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
    log.warning("WebRTC: no free UDP port in %d-%d on %s (webrtc.udp_ports): a session gets no host "
                "candidate there; widen the range", first, last, host)
    raise OSError(errno.EADDRINUSE, f"no free UDP port in {first}-{last} on {host} (webrtc.udp_ports)")


def rtc_configuration(config: IceConfig) -> RTCConfiguration:
    """The aiortc configuration for ``config``; an empty server list stops aiortc's default STUN."""
    servers = [RTCIceServer(urls=list(s.urls), username=s.username, credential=s.credential)
               for s in config.servers]
    return RTCConfiguration(iceServers=servers)


def apply(config: IceConfig) -> RTCConfiguration:
    """Set the host addresses and UDP ports ``config`` names (None: aioice's default); return its
    RTCConfiguration."""
    set_host_addresses(config.host_addresses)
    set_udp_ports(config.udp_ports)
    return rtc_configuration(config)
