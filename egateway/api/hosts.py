"""
Which C{Host} a request may name when the gateway runs without
authentication: the defence against DNS rebinding.

A web page from C{evil.example} can make its name resolve to 127.0.0.1 (or
to the gateway's address on the local network) and then call the gateway
from the victim's browser as its own origin, so neither CORS nor the Origin
check sees anything foreign.  What gives it away is the C{Host} header,
which still says C{evil.example}.  As Jupyter Server does, an
unauthenticated gateway therefore answers only requests naming it:

  - loopback names (C{localhost}, C{*.localhost}) and loopback addresses;
  - the address or name of the interface it listens on; when it listens on
    every interface, any IP address (a page cannot rebind a literal
    address) and the host's own name;
  - the names in C{allowed_hosts} (C{.example.org} admits every name under
    it; C{*} turns the check off).

A request without C{Host} (HTTP/1.0, not a browser) passes.  With
authentication on, a rebinding page has no credentials and the check is
not needed.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Sequence

from twisted.web.iweb import IRequest

from egateway.errors import Forbidden

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def listen_interface(description: str) -> str | None:
    """
    The interface a Twisted endpoint description listens on: its
    C{interface=} value, C{""} for every interface (a TCP or TLS port
    without one), C{None} for a UNIX socket (reached through a local front
    end only).
    """
    fields: list[str] = []
    current: list[str] = []
    escaped = False
    for char in description:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            fields.append("".join(current))
            current = []
        else:
            current.append(char)
    fields.append("".join(current))
    if fields[0].lower() == "unix":
        return None
    for field in fields[1:]:
        key, sep, value = field.partition("=")
        if sep and key == "interface":
            return value
    return ""


def _address(text: str) -> IPAddress | None:
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped if mapped is not None else address


def host_name(header: str) -> str:
    """
    The name or address of a C{Host} header, without its port or brackets,
    in lower case.
    """
    header = header.strip()
    if header.startswith("["):
        name = header[1:].partition("]")[0]
    elif header.count(":") == 1:
        name = header.partition(":")[0]
    else:
        name = header
    return name.rstrip(".").lower()


class HostPolicy:
    """
    The names an unauthenticated gateway answers to (see the module).
    """

    def __init__(self, listen: str, allowed: Sequence[str] = (), hostname: str | None = None) -> None:
        """
        @param listen: the listener's endpoint description.
        @param allowed: the C{allowed_hosts} setting.
        @param hostname: this host's name (default: C{socket.gethostname()}).
        """
        interface = listen_interface(listen)
        self._everything = "*" in allowed
        self._interface = _address(interface) if interface else None
        self._any_address = interface == "" or (self._interface is not None and self._interface.is_unspecified)
        names = {entry.strip().rstrip(".").lower() for entry in allowed if entry.strip() and entry != "*"}
        self._suffixes = tuple(sorted(name for name in names if name.startswith(".")))
        self._names = {name for name in names if not name.startswith(".")}
        if interface and self._interface is None:
            self._names.add(host_name(interface))
        listens_outside = self._any_address or (self._interface is not None and not self._interface.is_loopback)
        if listens_outside:
            own = (hostname if hostname is not None else socket.gethostname()).rstrip(".").lower()
            if own:
                self._names.update({own, own.split(".", 1)[0]})

    def allows(self, header: str) -> bool:
        """
        Whether a request whose C{Host} header is C{header} may be served.
        """
        if self._everything:
            return True
        name = host_name(header)
        address = _address(name)
        if address is not None:
            return address.is_loopback or self._any_address or address == self._interface
        return (
            name == "localhost"
            or name.endswith(".localhost")
            or name in self._names
            or any(name.endswith(suffix) for suffix in self._suffixes)
        )

    def check(self, request: IRequest) -> None:
        """
        @raise Forbidden: the request names a host that is not this
            gateway's.
        """
        raw = request.getHeader(b"host")
        if raw is None:
            return
        header = raw.decode("latin-1") if isinstance(raw, bytes) else raw
        if not self.allows(header):
            raise Forbidden(
                f"Host {host_name(header)[:100]!r} is not a name of this gateway, which runs without "
                "authentication (requests naming other hosts may come from a DNS rebinding page); add the name "
                "to allowed_hosts (EG_ALLOWED_HOSTS) or turn authentication on"
            )
