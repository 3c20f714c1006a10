"""ICE setup shared by WHIP and WHEP: which local addresses to offer and which STUN/TURN servers to use.

aiortc's defaults suit a desktop on the internet, not this service: it asks Google's STUN server
(unreachable offline, and a needless outside dependency for a control room) and never offers
127.0.0.1, so two peers on one host without a routable interface cannot connect. Here nothing
external is used unless configured, and the host addresses to offer can be pinned, either to
loopback (tests, single-host installs) or to the one interface a multi-homed server should use.

aioice reads its host addresses through a module-level function, so the choice is process-wide:
every peer connection of the process offers the same addresses.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import aioice.ice
from aiortc import RTCConfiguration, RTCIceServer

log = logging.getLogger(__name__)

_ORIGINAL_HOST_ADDRESSES: Callable[[bool, bool], list[str]] = aioice.ice.get_host_addresses
ICE_SCHEMES = ("stun:", "turn:", "turns:")


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

    def __post_init__(self) -> None:
        for addr in self.host_addresses or ():
            try:
                ipaddress.ip_address(addr)
            except ValueError:
                raise ValueError(f"ICE host address {addr!r} is not an IP address; "
                                 "write e.g. 127.0.0.1 or 10.0.0.5") from None


LOOPBACK = IceConfig(host_addresses=("127.0.0.1",))
"""Both peers on this host, no network needed (tests, demos)."""


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


def rtc_configuration(config: IceConfig) -> RTCConfiguration:
    """The aiortc configuration for ``config``; an empty server list stops aiortc's default STUN."""
    servers = [RTCIceServer(urls=list(s.urls), username=s.username, credential=s.credential)
               for s in config.servers]
    return RTCConfiguration(iceServers=servers)


def apply(config: IceConfig) -> RTCConfiguration:
    """Set the host addresses ``config`` names (None: aioice's default); return its RTCConfiguration."""
    set_host_addresses(config.host_addresses)
    return rtc_configuration(config)
