"""
Trusted front ends: proxies at configured addresses that authenticate users
themselves and tell the gateway who the user is.

A request from one of the C{trusted_proxies} networks that carries the
shared token may name its user in C{trusted_user_header} (for example
C{X-Forwarded-User}) or, failing that, in the start request's
C{KERNEL_USERNAME}.  From any other address neither is believed.

L{ProxyNetworks.client_of} also tells the real client behind a trusted proxy
(from C{X-Forwarded-For}), so failed-login limits apply per user address and
not to the proxy as a whole.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable, Sequence, Union

from twisted.internet.defer import Deferred, fail, succeed
from twisted.web.iweb import IRequest
from zope.interface import implementer

from egateway.api.authenticators.interface import IAuthenticator, presented_token
from egateway.api.authenticators.shared_token import token_matches
from egateway.api.identity import Identity, valid_username
from egateway.errors import Unauthorized
from egateway.ops.audit import client_address

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


def parse_networks(entries: Iterable[str]) -> list[Network]:
    """
    CIDRs (or single addresses) as networks.

    @raise ValueError: for an entry that is neither; the message names it.
    """
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{entry!r} is not an address or CIDR network (like 10.0.0.0/8)") from None
    return networks


class ProxyNetworks:
    """
    The addresses of trusted front ends.
    """

    def __init__(self, networks: Sequence[Network] = ()) -> None:
        self._networks = list(networks)

    def __bool__(self) -> bool:
        return bool(self._networks)

    def contains(self, address: str) -> bool:
        if not self._networks:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip.version == network.version and ip in network for network in self._networks)

    def client_of(self, request: IRequest) -> str:
        """
        The address of the client behind the request: the peer itself,
        unless the peer is a trusted proxy that says (in
        C{X-Forwarded-For}) whom it forwards for; each trusted hop is
        skipped from the right.
        """
        peer = client_address(request)
        if not self.contains(peer):
            return peer
        raw = request.getHeader(b"x-forwarded-for")
        if not raw:
            return peer
        text = raw.decode("latin-1") if isinstance(raw, bytes) else raw
        client = peer
        for hop in reversed([part.strip() for part in text.split(",")]):
            try:
                ipaddress.ip_address(hop)
            except ValueError:
                break
            client = hop
            if not self.contains(hop):
                break
        return client


@implementer(IAuthenticator)
class TrustedProxyAuthenticator:
    name = "trusted-proxy"

    def __init__(self, networks: ProxyNetworks, token: str, user_header: str = "") -> None:
        if not token:
            raise ValueError("trusted proxies authenticate with the shared token (auth_token)")
        if not networks:
            raise ValueError("the trusted-proxy authenticator needs trusted_proxies")
        self._networks = networks
        self._token = token.encode("utf-8")
        self._header = user_header.strip().lower().encode("latin-1") if user_header else b""

    def authenticate(self, request: IRequest) -> Deferred[Identity | None]:
        if not self._networks.contains(client_address(request)):
            return succeed(None)
        given = presented_token(request)
        if given is None or not token_matches(given, self._token):
            return succeed(None)
        username = ""
        if self._header:
            raw = request.getHeader(self._header)
            if raw:
                username = (raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw).strip()
                if not valid_username(username):
                    return fail(Unauthorized("the front end's user header names an unusable user name"))
        return succeed(
            Identity(username=username, authenticated=True, method=self.name, trusted_proxy=True)
        )
