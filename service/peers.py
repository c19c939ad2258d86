"""Who may send: calling AE titles, each optionally bound to the hosts it may call from.

An entry of ``allowed_ae`` is ``AE`` (that AE title from anywhere) or
``AE@host`` where host is an IP address, a network in CIDR notation
(``10.1.0.0/16``) or a host name, resolved once at start to all of its
addresses. An association whose calling AE title is not listed, or that comes
from a host not bound to its title, is rejected as PS3.8 §7.1.1.3 orders for
an unknown caller: rejected-permanent, DICOM UL service-user, "calling AE
title not recognized" (result 1, source 1, reason 3), the answer dcm4chee and
Orthanc give a caller they do not know. A title may be listed several times
with different hosts.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from service.errors import ConfigurationError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class AllowedPeer:
    """One allow-list entry: an AE title and the networks it may call from (``None``: any host)."""

    ae_title: str
    networks: tuple[IPNetwork, ...] | None = None

    def admits(self, calling_ae: str, address: str) -> bool:
        if calling_ae != self.ae_title:
            return False
        if self.networks is None:
            return True
        try:
            peer = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(peer, ipaddress.IPv6Address) and peer.ipv4_mapped is not None:
            peer = peer.ipv4_mapped  # a dual-stack socket reports IPv4 callers as ::ffff:a.b.c.d
        return any(peer in network for network in self.networks)


def _resolve(host: str) -> tuple[IPNetwork, ...]:
    try:
        return (ipaddress.ip_network(host, strict=False),)
    except ValueError:
        pass
    try:
        answers = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        raise ConfigurationError(f"allowed_ae host {host!r} does not resolve: {exc}") from exc
    return tuple(sorted({ipaddress.ip_network(str(answer[4][0]).split("%", 1)[0]) for answer in answers}, key=str))


def parse_allowed_peer(text: str, resolve: bool = True) -> AllowedPeer:
    """Parse ``AE`` or ``AE@host``; with ``resolve`` a host name is looked up now (else only its form is checked).

    Raises
    ------
    ConfigurationError
        If the host is empty or (with ``resolve``) does not resolve. The AE
        title's form (PS3.5 AE VR) is checked by the settings.
    """
    ae_title, at, host = text.strip().partition("@")
    ae_title = ae_title.strip()
    if not at:
        return AllowedPeer(ae_title)
    host = host.strip().strip("[]")
    if not host:
        raise ConfigurationError(f"allowed_ae entry {text!r}: nothing after '@' (expected AE@host or AE@network/bits)")
    return AllowedPeer(ae_title, _resolve(host) if resolve else ())


def admitted(peers: Iterable[AllowedPeer], calling_ae: str, address: str) -> bool:
    """Whether any entry admits ``calling_ae`` calling from ``address``."""
    return any(peer.admits(calling_ae, address) for peer in peers)
