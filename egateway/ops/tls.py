"""
TLS for the gateway's listeners, with certificates reloaded on SIGHUP.

Twisted's own C{ssl:} endpoint builds its context once, from the files named
in the description, and cannot swap the certificate of a running port.  So
the gateway reads C{ssl:} descriptions itself (same syntax, same keys), listens
on the equivalent plain endpoint, and wraps the site in
L{TLSMemoryBIOFactory} with a L{ReloadableServerTLS}: each new connection
gets the context current at its accept, so a reload changes what new
connections see while open connections (WebSockets included) keep the
context they started with.  The same wrapping gives TLS to any endpoint
(C{tcp:}, C{unix:}) when a certificate is configured (C{certfile}), as
Enterprise Gateway does.

Policy, fixed rather than configurable: TLS 1.2 or newer (1.3 only, if
asked), ECDHE key exchange with AEAD ciphers only for TLS 1.2, no
compression, no renegotiation, no session resumption (tickets would need a
rotating key to keep forward secrecy).  With a client CA, clients must
present a certificate that chains to it (mutual TLS).
"""

from __future__ import annotations

import hashlib
import signal
from dataclasses import dataclass, replace
from typing import Any, Sequence

from OpenSSL import SSL, crypto
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from egateway.config import ConfigError, ResponseConfig, ServerConfig
from egateway.ops.signals import SignalAction

MODERN_CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS"
"""
The TLS 1.2 suites offered: forward secret, authenticated encryption.
TLS 1.3 suites are all of that kind and are left at OpenSSL's default.
"""

MIN_VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}

_SSL_KEYS = {"port", "interface", "backlog", "privateKey", "certKey", "extraCertChain", "clientCA"}


class TLSSetupError(ValueError):
    """
    A TLS description or certificate file is unusable; the message names
    the file or key and says why.
    """


@dataclass(frozen=True)
class CertificateFiles:
    """
    Where a TLS listener's certificate comes from; every file is PEM.

    @ivar certificate: the server certificate, optionally followed by its
        intermediate certificates.
    @ivar private_key: its unencrypted private key (may be the same file).
    @ivar extra_chain: more intermediate certificates (Twisted's
        C{extraCertChain}).
    @ivar client_ca: CA certificates client certificates must chain to;
        empty for no client certificates.
    @ivar min_version: C{"1.2"} or C{"1.3"}.
    """

    certificate: str
    private_key: str
    extra_chain: str = ""
    client_ca: str = ""
    min_version: str = "1.2"

    def without_client_certificates(self) -> "CertificateFiles":
        """
        The same certificate for a listener whose peers have none (the
        response listener: kernel-side launchers authenticate otherwise).
        """
        return replace(self, client_ca="")


@dataclass(frozen=True)
class ListenerPlan:
    """
    @ivar description: the endpoint to listen on, without TLS keys.
    @ivar files: the certificate to serve, or C{None} for plain HTTP.
    """

    description: str
    files: CertificateFiles | None


def split_description(description: str) -> tuple[list[str], dict[str, str]]:
    """
    Split an endpoint description as Twisted does: C{:} separates
    arguments, the first C{=} of an argument makes it a keyword, and a
    backslash escapes the next character.
    """
    args: list[str] = []
    kwargs: dict[str, str] = {}
    current = ""
    key: str | None = None
    chars = iter(description)
    for char in chars:
        if char == "\\":
            current += next(chars, "")
        elif char == "=" and key is None:
            key, current = current, ""
        elif char == ":":
            if key is None:
                args.append(current)
            else:
                kwargs[key] = current
            key, current = None, ""
        else:
            current += char
    if key is None:
        args.append(current)
    else:
        kwargs[key] = current
    return args, kwargs


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def plan_listener(
    description: str,
    certfile: str = "",
    keyfile: str = "",
    client_ca: str = "",
    min_version: str = "1.2",
) -> ListenerPlan:
    """
    What to listen on for C{description} and the certificate settings.

    An C{ssl:} description takes Twisted's keys (C{port}, C{interface},
    C{backlog}, C{privateKey}, C{certKey}, C{extraCertChain}) plus
    C{clientCA}; keys it lacks come from the settings.  Any other
    description gets TLS when C{certfile} is set.

    @raise TLSSetupError: an unknown key, a key without a certificate, or
        an C{ssl:} description without one.
    """
    if min_version not in MIN_VERSIONS:
        raise TLSSetupError(f"TLS minimum version {min_version!r} is not one of {', '.join(MIN_VERSIONS)}")
    if keyfile and not certfile and not description.startswith("ssl:"):
        raise TLSSetupError("a key file (keyfile) was given without a certificate (certfile)")
    if not description.startswith("ssl:"):
        if not certfile:
            if client_ca:
                raise TLSSetupError("a client CA (client_ca) needs TLS: set certfile or listen on ssl:")
            return ListenerPlan(description, None)
        return ListenerPlan(
            description, CertificateFiles(certfile, keyfile or certfile, "", client_ca, min_version)
        )
    args, kwargs = split_description(description[len("ssl:"):])
    unknown = sorted(set(kwargs) - _SSL_KEYS)
    if unknown:
        raise TLSSetupError(
            f"ssl: does not take {', '.join(unknown)} (egateway accepts {', '.join(sorted(_SSL_KEYS))}; "
            "TLS versions and ciphers are fixed: TLS 1.2 or newer with modern ciphers)"
        )
    positional = [a for a in args if a]
    if len(positional) > 1 or (positional and "port" in kwargs):
        raise TLSSetupError(f"ssl: takes one port, got {description!r}")
    port = kwargs.get("port") or (positional[0] if positional else "")
    if not port.isdigit():
        raise TLSSetupError(f"ssl: needs a port number, got {description!r}")
    certificate = kwargs.get("certKey") or kwargs.get("privateKey") or certfile
    private_key = kwargs.get("privateKey") or keyfile or certificate
    if not certificate:
        raise TLSSetupError("ssl: needs privateKey= (and certKey= if the certificate is in another file), or certfile")
    plain = f"tcp:{port}"
    for name in ("interface", "backlog"):
        if kwargs.get(name):
            plain += f":{name}={_escape(kwargs[name])}"
    files = CertificateFiles(
        certificate,
        private_key,
        kwargs.get("extraCertChain", ""),
        kwargs.get("clientCA", client_ca),
        min_version,
    )
    return ListenerPlan(plain, files)


def _read_blocking(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSSetupError(f"cannot read the {what} {path}: {e.strerror}") from None


def _certificates(data: bytes, path: str, what: str) -> list[Any]:
    from cryptography import x509

    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise TLSSetupError(f"the {what} {path} holds no PEM certificate: {e}") from None
    return certificates


def build_context_blocking(files: CertificateFiles) -> tuple[SSL.Context, str]:
    """
    A server context for C{files}, and a line describing its certificate
    for the log.  Reads the files: call it from a thread once running.

    @raise TLSSetupError: a file is missing or unreadable, or the key does
        not match the certificate.
    """
    from cryptography.hazmat.primitives import serialization

    chain = _certificates(_read_blocking(files.certificate, "certificate"), files.certificate, "certificate")
    key_data = _read_blocking(files.private_key, "private key")
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except (ValueError, TypeError) as e:
        raise TLSSetupError(
            f"the private key {files.private_key} cannot be loaded (it must be an unencrypted PEM key): {e}"
        ) from None
    extra: list[Any] = []
    if files.extra_chain:
        extra = _certificates(
            _read_blocking(files.extra_chain, "certificate chain"), files.extra_chain, "certificate chain"
        )
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(MIN_VERSIONS[files.min_version])
    context.set_options(
        SSL.OP_NO_COMPRESSION
        | SSL.OP_CIPHER_SERVER_PREFERENCE
        | SSL.OP_NO_RENEGOTIATION
        | SSL.OP_SINGLE_ECDH_USE
        | SSL.OP_NO_TICKET
    )
    context.set_cipher_list(MODERN_CIPHERS)
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    try:
        context.use_certificate(crypto.X509.from_cryptography(chain[0]))
        context.use_privatekey(crypto.PKey.from_cryptography_key(key))
        context.check_privatekey()
        for certificate in [*chain[1:], *extra]:
            context.add_extra_chain_cert(crypto.X509.from_cryptography(certificate))
    except (SSL.Error, TypeError, ValueError) as e:
        raise TLSSetupError(
            f"the private key {files.private_key} does not fit the certificate {files.certificate}: {e}"
        ) from None
    if files.client_ca:
        _certificates(_read_blocking(files.client_ca, "client CA"), files.client_ca, "client CA")
        context.load_verify_locations(files.client_ca)
        context.load_client_ca(files.client_ca.encode())
        context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
        # Required for client certificates whenever sessions are involved.
        context.set_session_id(b"egateway")
    leaf = chain[0]
    fingerprint = hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest()
    expires = leaf.not_valid_after_utc.isoformat()
    summary = f"{leaf.subject.rfc4514_string()} (sha256 {fingerprint[:16]}..., expires {expires})"
    return context, summary


@implementer(IOpenSSLServerConnectionCreator)
class ReloadableServerTLS:
    """
    The TLS side of one listener: hands each new connection the current
    context.  L{TLSService} loads and reloads it.
    """

    def __init__(self, files: CertificateFiles, name: str) -> None:
        self.files = files
        self.name = name
        self.summary = ""
        self._context: SSL.Context | None = None

    @property
    def loaded(self) -> bool:
        return self._context is not None

    def install(self, context: SSL.Context, summary: str) -> None:
        """
        Use C{context} for connections accepted from now on.
        """
        self._context = context
        self.summary = summary

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        if self._context is None:
            raise RuntimeError(f"the {self.name} TLS certificate has not been loaded")
        return SSL.Connection(self._context, None)

    def wrap(self, factory: Any) -> TLSMemoryBIOFactory:
        """
        C{factory} behind TLS with this certificate.
        """
        wrapped = TLSMemoryBIOFactory(self, False, factory)
        wrapped.noisy = False
        return wrapped


class TLSService(Service):
    """
    Loads the certificates before any listener starts and reloads them on
    SIGHUP (or L{reload}).  A reload that fails (a file half-written, a key
    that does not fit) is logged and changes nothing: the old certificate
    stays in use.

    Loading at start-up happens in C{privilegedStartService}, so key files
    readable only by root work when twistd drops privileges; a reload then
    runs as the unprivileged user and needs the files readable by it.
    """

    name = "tls"
    _log = Logger()

    def __init__(self, reactor: Any, threadpool: Any, *, handle_sighup: bool = True) -> None:
        self._reactor = reactor
        self._threadpool = threadpool
        # The signal is shared: the main and audit logs reopen on it too.
        self._sighup = SignalAction(reactor, signal.SIGHUP, self.reload) if handle_sighup else None
        self.listeners: list[ReloadableServerTLS] = []
        self.reloads = 0

    def add(self, files: CertificateFiles, name: str) -> ReloadableServerTLS:
        listener = ReloadableServerTLS(files, name)
        self.listeners.append(listener)
        return listener

    def _load_all_blocking(self) -> list[tuple[SSL.Context, str]]:
        return [build_context_blocking(listener.files) for listener in self.listeners]

    def _install(self, loaded: Sequence[tuple[SSL.Context, str]], verb: str) -> None:
        for listener, (context, summary) in zip(self.listeners, loaded):
            listener.install(context, summary)
            self._log.info(
                "TLS for the {listener} listener {verb} {summary}",
                listener=listener.name,
                verb=verb,
                summary=summary,
            )

    def privilegedStartService(self) -> None:
        if not all(listener.loaded for listener in self.listeners):
            self._install(self._load_all_blocking(), "serves")
        super().privilegedStartService()

    def startService(self) -> None:
        if not all(listener.loaded for listener in self.listeners):
            self._install(self._load_all_blocking(), "serves")
        super().startService()
        if self._sighup is not None:
            self._sighup.startService()

    def stopService(self) -> Any:
        if self._sighup is not None:
            self._sighup.stopService()
        return super().stopService()

    def reload(self) -> Deferred[bool]:
        """
        Read the certificate files again and use them for new connections.

        @return: fires with whether the new certificates are in use.
        """
        self._log.info("reloading TLS certificates")
        loading: Deferred[list[tuple[SSL.Context, str]]] = deferToThreadPool(
            self._reactor, self._threadpool, self._load_all_blocking
        )

        def loaded(contexts: list[tuple[SSL.Context, str]]) -> bool:
            self._install(contexts, "now serves")
            self.reloads += 1
            return True

        def failed(failure: Any) -> bool:
            failure.trap(TLSSetupError, SSL.Error, OSError)
            self._log.error(
                "TLS certificate reload failed, still serving the previous certificates: {error}; "
                "fix the files and send SIGHUP again",
                error=str(failure.value),
            )
            return False

        return loading.addCallbacks(loaded, failed)


def listener_files(description: str, settings: Any) -> ListenerPlan:
    """
    L{plan_listener} for the C{server} section of the configuration.
    """
    return plan_listener(
        description,
        certfile=settings.certfile,
        keyfile=settings.keyfile,
        client_ca=settings.client_ca,
        min_version=settings.tls_min_version,
    )



def check_config(listen_endpoint: str, server: ServerConfig, response: ResponseConfig) -> None:
    """
    The listener's TLS settings (C{[server]}) and the response listener's
    need of them (C{[response]}), checked at start-up (the gateway's
    assembly runs this) without reading the files.
    """
    with ConfigError.about("server.listen/certfile", TLSSetupError):
        plan = listener_files(listen_endpoint, server)
    if response.response_tls and plan.files is None:
        raise ConfigError(
            "response.response_tls: needs a certificate: set certfile (EG_CERTFILE) or listen on ssl:"
        )

__all__ = [
    "CertificateFiles",
    "ListenerPlan",
    "ReloadableServerTLS",
    "TLSService",
    "TLSSetupError",
    "build_context_blocking",
    "check_config",
    "listener_files",
    "plan_listener",
    "split_description",
]
