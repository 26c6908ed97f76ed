"""
A kernel's connection information and the seam between the gateway and its
ZMQ transport.

Code above this module talks to kernels through L{IChannelFactory} and
L{IChannelSocket}; only L{egateway.wire.zmq} implements them with txzmq, so
tests can substitute an in-memory transport where no kernel is involved.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence

from zope.interface import Interface

CHANNEL_NAMES = ("shell", "iopub", "stdin", "control", "hb")

_Z85_KEY = re.compile(rb"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")


def _curve_key(data: Mapping[str, Any], name: str) -> bytes | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, str):
        value = value.encode("ascii", "replace")
    if not isinstance(value, bytes) or not _Z85_KEY.match(value):
        raise ValueError(f"{name} is not a Z85-encoded CurveZMQ key (40 characters)")
    return value


MAX_REASON = 500
"""
Characters of a launcher's C{encryption_reason} kept (it reaches the log and
the kernel's model; a version 1 payload is not even authenticated).
"""


def _reason(data: Mapping[str, Any]) -> str:
    value = data.get("encryption_reason")
    if not isinstance(value, str):
        return ""
    return "".join(c if c.isprintable() else " " for c in value[:MAX_REASON]).strip()


@dataclass(frozen=True)
class ConnectionInfo:
    """
    Where a kernel's five sockets listen and how its messages are signed.

    @ivar curve_publickey: the kernel's CurveZMQ public key (Z85), or
        C{None} when its channels are not encrypted.  Clients connect as
        CurveZMQ clients of this server key (JEP 145, ipykernel 7.4).
    @ivar curve_secretkey: the matching secret key, which the kernel reads
        from its connection file; known to the gateway only for kernels it
        provisioned (or whose launcher reported it).
    @ivar encryption_reason: for a kernel whose channels are not
        encrypted, why (a launcher's or the gateway's sentence for the
        operator); not part of the connection file.
    """

    ip: str
    shell_port: int
    iopub_port: int
    stdin_port: int
    control_port: int
    hb_port: int
    key: bytes
    signature_scheme: str = "hmac-sha256"
    transport: str = "tcp"
    curve_publickey: bytes | None = None
    curve_secretkey: bytes | None = None
    encryption_reason: str = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ConnectionInfo":
        """
        Read a connection file's fields (extra fields are ignored).  The
        CurveZMQ fields are optional; a secret key without its public key
        is an error.

        @raise ValueError: if a field is missing or of the wrong type.
        """
        try:
            key = data.get("key", b"")
            if isinstance(key, str):
                key = key.encode("utf-8")
            transport = str(data.get("transport", "tcp"))
            if transport not in ("tcp", "ipc"):
                raise ValueError(f"unsupported transport {transport!r}")
            ports = {
                name: int(data[name])
                for name in (
                    "shell_port",
                    "iopub_port",
                    "stdin_port",
                    "control_port",
                    "hb_port",
                )
            }
            if transport == "tcp" and not all(0 < p < 65536 for p in ports.values()):
                raise ValueError("ports must be between 1 and 65535")
            curve_publickey = _curve_key(data, "curve_publickey")
            curve_secretkey = _curve_key(data, "curve_secretkey")
            if curve_secretkey is not None and curve_publickey is None:
                raise ValueError("curve_secretkey without curve_publickey")
            return cls(
                ip=str(data["ip"]),
                key=bytes(key),
                signature_scheme=str(data.get("signature_scheme", "hmac-sha256")),
                transport=transport,
                curve_publickey=curve_publickey,
                curve_secretkey=curve_secretkey,
                encryption_reason=_reason(data) if curve_publickey is None else "",
                **ports,
            )
        except KeyError as e:
            raise ValueError(f"connection info lacks {e.args[0]}") from None
        except (TypeError, ValueError) as e:
            raise ValueError(f"bad connection info: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """
        The connection file's fields; the CurveZMQ ones only when set, so a
        kernel without encryption gets exactly the classic file (no
        C{encryption_reason}: ipykernel 6 passes every field it finds there
        back to jupyter_client, and version 7 of it refuses unknown ones).
        """
        data = {
            "ip": self.ip,
            "transport": self.transport,
            "shell_port": self.shell_port,
            "iopub_port": self.iopub_port,
            "stdin_port": self.stdin_port,
            "control_port": self.control_port,
            "hb_port": self.hb_port,
            "key": self.key.decode("utf-8"),
            "signature_scheme": self.signature_scheme,
            "kernel_name": "",
        }
        if self.curve_publickey is not None:
            data["curve_publickey"] = self.curve_publickey.decode("ascii")
        if self.curve_secretkey is not None:
            data["curve_secretkey"] = self.curve_secretkey.decode("ascii")
        return data

    def snapshot(self) -> dict[str, Any]:
        """
        What a launcher's snapshot keeps: the connection file's fields and
        the C{encryption_reason} (both read back by L{from_dict}).
        """
        data = self.to_dict()
        if self.encryption_reason:
            data["encryption_reason"] = self.encryption_reason
        return data

    @property
    def encrypted(self) -> bool:
        """
        Whether the kernel's channels use CurveZMQ.
        """
        return self.curve_publickey is not None

    @property
    def cleartext_reason(self) -> str:
        """
        Why the kernel's channels are not encrypted (empty when they are).
        """
        if self.encrypted:
            return ""
        if self.transport != "tcp":
            return f"{self.transport} transport (local sockets, not the network)"
        return self.encryption_reason or "its connection info has no CurveZMQ key"

    def with_ip(self, ip: str) -> "ConnectionInfo":
        return replace(self, ip=ip)

    def url(self, channel: str) -> str:
        port = getattr(self, f"{channel}_port")
        if self.transport == "ipc":
            return f"ipc://{self.ip}-{port}"
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"tcp://{host}:{port}"


FramesHandler = Callable[[Sequence[bytes]], None]


class IChannelSocket(Interface):
    """
    One socket connected to one kernel channel.
    """

    def send(frames: Sequence[bytes]) -> None:
        """
        Queue a multipart message; never blocks.
        """

    def close() -> None:
        """
        Disconnect and release the socket; idempotent.
        """


class IChannelFactory(Interface):
    """
    Makes sockets connected to kernel channels.
    """

    def dealer(
        url: str, identity: bytes, on_frames: FramesHandler, curve_serverkey: bytes | None = None
    ) -> IChannelSocket:
        """
        A DEALER socket (for shell, control and stdin) with a routing
        identity, delivering every received message to C{on_frames}.

        @param curve_serverkey: the kernel's CurveZMQ public key (Z85): the
            socket is then a CurveZMQ client of it; C{None} for clear text.
        """

    def subscriber(url: str, on_frames: FramesHandler, curve_serverkey: bytes | None = None) -> IChannelSocket:
        """
        A SUB socket subscribed to everything (for iopub); C{curve_serverkey}
        as for L{dealer}.
        """

    def close() -> None:
        """
        Close every socket and the context.
        """
