"""
TLS on the gateway's listeners: HTTPS and WSS with a real kernel, refusal
of plaintext, TLS 1.0/1.1 and weak ciphers, mutual TLS, certificate reload
(in process and by SIGHUP to a real daemon), and the response listener with
egateway's kernel-side launcher delivering over TLS.

Certificates are made by each test with C{cryptography}.  Blocking C{ssl}
clients (the only way to pin a client to one TLS version) run in threads, so
the gateway in this reactor can answer them.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import socket
import ssl
import sys
import uuid
import warnings
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError, ConnectionClosed
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS, trustRootFromCertificates
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool, ResponseFailed
from twisted.web.client import ResponseNeverReceived
from treq.client import HTTPClient

from egateway.clusters.response import ResponseListener
from egateway.config import ConfigError
from egateway.ops.tls import (
    CertificateFiles,
    TLSService,
    TLSSetupError,
    build_context_blocking,
    plan_listener,
    split_description,
)
from egateway.validation import load_config
from tests.support.daemon import REPO_ROOT, ChildProcess, free_port, pid_alive, processes_mentioning
from tests.support.gateway import InProcessGateway
from tests.support.wsclient import ChannelsClient
from tests.test_kernel_launcher import KernelHarness, launcher_argv

warnings.filterwarnings("ignore", r"ssl\.TLSVersion\.TLSv1", DeprecationWarning)
warnings.filterwarnings("ignore", r"ssl\.PROTOCOL_TLS", DeprecationWarning)

LOOPBACK = "127.0.0.1"


# -- certificates ----------------------------------------------------------


@dataclass
class Issued:
    """
    A certificate and its key, in memory and as PEM files.
    """

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cert_path: str
    key_path: str

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def twisted(self) -> Certificate:
        return Certificate.loadPEM(self.pem)


def issue(
    directory: str,
    name: str,
    *,
    ca: Issued | None = None,
    is_ca: bool = False,
    client: bool = False,
) -> Issued:
    """
    A certificate for C{name} (self-signed, or signed by C{ca}), valid for
    C{127.0.0.1} and C{localhost}, written to C{directory/name.{crt,key}}.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject if ca else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if not is_ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(LOOPBACK)), x509.DNSName("localhost")]
            ),
            critical=False,
        ).add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]),
            critical=False,
        )
    else:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
    cert = builder.sign(ca.key if ca else key, hashes.SHA256())
    cert_path = os.path.join(directory, f"{name}.crt")
    key_path = os.path.join(directory, f"{name}.key")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return Issued(cert, key, cert_path, key_path)


def escape(path: str) -> str:
    return path.replace("\\", "\\\\").replace(":", "\\:")


def replace_files(target: Issued, source: Issued) -> None:
    """
    Put C{source}'s certificate and key where C{target}'s are, each by an
    atomic rename, as a careful operator (or certbot) does.
    """
    for src, dst in ((source.cert_path, target.cert_path), (source.key_path, target.key_path)):
        with open(src, "rb") as f:
            data = f.read()
        with open(dst + ".new", "wb") as f:
            f.write(data)
        os.replace(dst + ".new", dst)


# -- blocking TLS clients (run in threads) ----------------------------------


def handshake_blocking(
    port: int,
    *,
    version: ssl.TLSVersion | None = None,
    ciphers: str | None = None,
    client_cert: Issued | None = None,
    request: bytes | None = None,
) -> tuple[str, bytes, bytes]:
    """
    Connect with Python's C{ssl}, without verifying the server (the tests
    look at what it presents instead), pinned to C{version} if given.

    @return: the negotiated version, the server certificate (DER) and what
        the server answered to C{request} (empty without one).
    @raise ssl.SSLError, OSError: the server refused.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if version is not None:
        context.minimum_version = version
        context.maximum_version = version
        if version < ssl.TLSVersion.TLSv1_2:
            # OpenSSL 3 only offers TLS 1.0/1.1 at security level 0.
            context.set_ciphers("DEFAULT@SECLEVEL=0")
    if ciphers is not None:
        context.set_ciphers(ciphers)
    if client_cert is not None:
        context.load_cert_chain(client_cert.cert_path, client_cert.key_path)
    with socket.create_connection((LOOPBACK, port), timeout=10) as raw:
        with context.wrap_socket(raw) as sock:
            answer = b""
            if request is not None:
                sock.sendall(request)
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    answer += chunk
            return str(sock.version()), sock.getpeercert(binary_form=True) or b"", answer


def permissive_server_blocking(issued: Issued, version: ssl.TLSVersion) -> tuple[int, Any]:
    """
    A one-connection TLS server that accepts anything down to TLS 1.0: the
    control showing that our client really offers C{version}.

    @return: its port and a function that serves one handshake and
        returns the version negotiated.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1
    context.set_ciphers("DEFAULT@SECLEVEL=0")
    context.load_cert_chain(issued.cert_path, issued.key_path)
    listening = socket.create_server((LOOPBACK, 0))

    def serve() -> str:
        with listening:
            listening.settimeout(10)
            connection, _ = listening.accept()
            with context.wrap_socket(connection, server_side=True) as sock:
                return str(sock.version())

    return listening.getsockname()[1], serve


def get_api(port: int, client_cert: Issued | None = None) -> bytes:
    """
    C{GET /api} over TLS 1.2+ with a blocking client; the raw answer.
    """
    request = f"GET /api HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\nConnection: close\r\n\r\n".encode()
    return handshake_blocking(port, client_cert=client_cert, request=request)[2]


# -- Twisted clients -----------------------------------------------------------


class HttpsClient:
    """
    treq over HTTPS, trusting C{trusted} (and presenting C{client_cert}).
    """

    def __init__(self, base_url: str, *trusted: Issued, client_cert: Issued | None = None) -> None:
        self.base_url = base_url
        root = trustRootFromCertificates([issued.twisted() for issued in trusted])
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.trusted = trusted
        self.client_cert = client_cert
        self.client = HTTPClient(Agent(reactor, contextFactory=_Policy(root, client_cert), pool=self.pool))

    def tls_options(self) -> Any:
        root = trustRootFromCertificates([issued.twisted() for issued in self.trusted])
        return optionsForClientTLS(LOOPBACK, trustRoot=root, clientCertificate=_client(self.client_cert))

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        response = await self.client.request(method, self.base_url + path, data=data).addTimeout(30, reactor)
        content = await response.content()
        return response.code, (json.loads(content) if content else None)

    def close(self) -> Deferred[None]:
        return self.pool.closeCachedConnections()


def _client(issued: Issued | None) -> Any:
    if issued is None:
        return None
    from twisted.internet.ssl import PrivateCertificate

    key_pem = issued.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return PrivateCertificate.loadPEM(issued.pem + key_pem)


class _Policy(BrowserLikePolicyForHTTPS):
    def __init__(self, root: Any, client_cert: Issued | None) -> None:
        super().__init__(trustRoot=root)
        self._client_cert = client_cert

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return optionsForClientTLS(
            hostname.decode("ascii"), trustRoot=self._trustRoot, clientCertificate=_client(self._client_cert)
        )


class _Collect(Protocol):
    def __init__(self, send: bytes) -> None:
        self.send = send
        self.data = b""
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.send)

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(self.data)


async def plaintext_exchange(port: int, send: bytes) -> bytes:
    """
    What a plaintext client gets back for C{send} before the server
    closes the connection.
    """
    collect = _Collect(send)
    await connectProtocol(TCP4ClientEndpoint(reactor, LOOPBACK, port, timeout=10), collect)
    return await collect.done.addTimeout(10, reactor)


# -- unit tests ------------------------------------------------------------------


class PlanTests(SynchronousTestCase):
    def test_split_like_twisted(self) -> None:
        """
        Descriptions split as Twisted splits them: backslash escapes, first
        '=' makes a keyword, later '=' belong to the value.
        """
        self.assertEqual(
            split_description(r"8443:interface=\:\:1:privateKey=/a\:b/k=v.pem"),
            (["8443"], {"interface": "::1", "privateKey": "/a:b/k=v.pem"}),
        )

    def test_ssl_description(self) -> None:
        """
        An ssl: description becomes the same tcp: port plus certificate
        files; a missing certKey means the key file holds both.
        """
        plan = plan_listener("ssl:8443:interface=127.0.0.1:backlog=7:privateKey=/k.pem:clientCA=/ca.pem")
        self.assertEqual(plan.description, "tcp:8443:interface=127.0.0.1:backlog=7")
        self.assertEqual(plan.files, CertificateFiles("/k.pem", "/k.pem", "", "/ca.pem", "1.2"))

    def test_settings_fill_in(self) -> None:
        """
        certfile/keyfile complete an ssl: description without keys and turn
        any other endpoint into a TLS one.
        """
        self.assertEqual(
            plan_listener("ssl:8443", certfile="/c.pem", keyfile="/k.pem").files,
            CertificateFiles("/c.pem", "/k.pem"),
        )
        plan = plan_listener("unix:/run/eg.sock", certfile="/c.pem", min_version="1.3")
        self.assertEqual(plan.description, "unix:/run/eg.sock")
        self.assertEqual(plan.files, CertificateFiles("/c.pem", "/c.pem", min_version="1.3"))
        self.assertIsNone(plan_listener("tcp:8888").files)

    def test_refusals(self) -> None:
        """
        Settings that would silently weaken or not apply are start-up errors
        naming what is wrong.
        """
        for description, kwargs, words in [
            ("ssl:8443:privateKey=/k:sslmethod=TLSv1_METHOD", {}, "sslmethod"),
            ("ssl:8443", {}, "privateKey"),
            ("ssl:port:privateKey=/k", {}, "port number"),
            ("tcp:8888", {"keyfile": "/k"}, "without a certificate"),
            ("tcp:8888", {"client_ca": "/ca"}, "needs TLS"),
        ]:
            with self.assertRaises(TLSSetupError) as caught:
                plan_listener(description, **kwargs)
            self.assertIn(words, str(caught.exception))

    def test_config(self) -> None:
        """
        Enterprise Gateway's EG_CERTFILE/EG_KEYFILE make the default listener
        TLS; response_tls without a certificate is refused.
        """
        config = load_config({}, {"EG_CERTFILE": "/c.pem", "EG_KEYFILE": "/k.pem", "EG_CLIENT_CA": "/ca"}, {})
        self.assertEqual(config.server.certfile, "/c.pem")
        self.assertEqual(config.server.client_ca, "/ca")
        with self.assertRaises(ConfigError) as caught:
            load_config({}, {"EG_RESPONSE_TLS": "true"}, {})
        self.assertIn("response.response_tls", str(caught.exception))
        with self.assertRaises(ConfigError):
            load_config({}, {"EG_TLS_MIN_VERSION": "1.1"}, {})

    def test_bad_files(self) -> None:
        """
        Missing files and a key that does not fit the certificate are
        reported with the file's name.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        one, other = issue(directory, "one"), issue(directory, "other")
        with self.assertRaises(TLSSetupError) as caught:
            build_context_blocking(CertificateFiles(os.path.join(directory, "nope.crt"), one.key_path))
        self.assertIn("nope.crt", str(caught.exception))
        with self.assertRaises(TLSSetupError) as caught:
            build_context_blocking(CertificateFiles(one.cert_path, other.key_path))
        self.assertIn("does not fit", str(caught.exception))
        context, summary = build_context_blocking(CertificateFiles(one.cert_path, one.key_path))
        self.assertIn("CN=one", summary)


# -- the gateway in this process ---------------------------------------------------


class TLSGatewayTestCase(TestCase):
    timeout = 120

    def certificates(self) -> str:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        return directory

    async def start_gateway(self, server: Issued, **flags: Any) -> tuple[InProcessGateway, int]:
        listen = (
            f"ssl:0:interface={LOOPBACK}:privateKey={escape(server.key_path)}:certKey={escape(server.cert_path)}"
        )
        settings = {"listen": listen, **flags}
        gateway = InProcessGateway(**settings)
        await gateway.start()
        self.addCleanup(self._stop, gateway)
        port = int(gateway.url.split(":")[2].split("/")[0])
        return gateway, port

    async def _stop(self, gateway: InProcessGateway) -> None:
        await gateway.stop()
        leaked = sorted(pid for pid in gateway.pids if pid_alive(pid))
        self.assertEqual(leaked, [], "kernel processes outlived the test")

    def https(self, port: int, *trusted: Issued, client_cert: Issued | None = None) -> HttpsClient:
        client = HttpsClient(f"https://{LOOPBACK}:{port}/", *trusted, client_cert=client_cert)
        self.addCleanup(client.close)
        return client


class HttpsTests(TLSGatewayTestCase):
    async def test_https_and_wss_with_a_kernel(self) -> None:
        """
        A client that trusts the certificate starts a kernel over HTTPS and
        runs code over WSS.
        """
        server = issue(self.certificates(), "gateway")
        gateway, port = await self.start_gateway(server)
        https = self.https(port, server)
        code, api = await https.request("GET", "api")
        self.assertEqual(code, 200)
        self.assertIn("version", api)
        code, model = await https.request("POST", "api/kernels", {})
        self.assertEqual(code, 201, model)
        gateway.pids.add(model["placement"]["pid"])
        channels = await ChannelsClient.connect(https.base_url, model["id"], client_tls=https.tls_options())
        try:
            result = await channels.execute("print(6 * 7)")
            self.assertEqual(result["stdout"].strip(), "42")
        finally:
            channels._proto.sendClose()
            await channels.closed.addTimeout(10, reactor)
        code, _ = await https.request("DELETE", f"api/kernels/{model['id']}")
        self.assertEqual(code, 204)

    async def test_untrusted_client_fails(self) -> None:
        """
        A client that does not trust the certificate cannot talk to the
        gateway (the certificate really is what is served).
        """
        directory = self.certificates()
        server, stranger = issue(directory, "gateway"), issue(directory, "stranger")
        _, port = await self.start_gateway(server)
        with self.assertRaises((ResponseFailed, ResponseNeverReceived)):
            await self.https(port, stranger).request("GET", "api")

    async def test_plaintext_refused(self) -> None:
        """
        Plain HTTP to the TLS port gets no HTTP answer, only a closed
        connection (after at most a TLS alert).
        """
        server = issue(self.certificates(), "gateway")
        _, port = await self.start_gateway(server)
        answer = await plaintext_exchange(port, b"GET /api HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertNotIn(b"HTTP/", answer)
        self.assertNotIn(b"version", answer)
        if answer:
            self.assertEqual(answer[0], 0x15, "only a TLS alert record may come back")

    async def test_versions(self) -> None:
        """
        TLS 1.0 and 1.1 handshakes are refused, though this client can offer
        them (a permissive server accepts it); TLS 1.2 and 1.3 succeed.
        (OpenSSL 3's default security level refuses 1.0/1.1 too; that the
        gateway's own minimum is applied shows in L{test_minimum_13}.)
        """
        server = issue(self.certificates(), "gateway")
        _, port = await self.start_gateway(server)
        for version in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
            control_port, serve = permissive_server_blocking(server, version)
            served = deferToThread(serve)
            negotiated, _, _ = await deferToThread(handshake_blocking, control_port, version=version)
            self.assertEqual(await served, negotiated)
            self.assertIn(negotiated, ("TLSv1", "TLSv1.1"))
            with self.assertRaises((ssl.SSLError, OSError)):
                await deferToThread(handshake_blocking, port, version=version)
        for version, name in ((ssl.TLSVersion.TLSv1_2, "TLSv1.2"), (ssl.TLSVersion.TLSv1_3, "TLSv1.3")):
            negotiated, der, _ = await deferToThread(handshake_blocking, port, version=version)
            self.assertEqual(negotiated, name)
            self.assertEqual(der, server.der)

    async def test_weak_ciphers_refused(self) -> None:
        """
        A TLS 1.2 client offering only a CBC/SHA-1 suite is refused; one
        offering ECDHE with AES-GCM or ChaCha20 is served.
        """
        server = issue(self.certificates(), "gateway")
        _, port = await self.start_gateway(server)
        with self.assertRaises((ssl.SSLError, OSError)):
            await deferToThread(
                handshake_blocking, port, version=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-ECDSA-AES128-SHA"
            )
        for suite in ("ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305"):
            negotiated, _, _ = await deferToThread(
                handshake_blocking, port, version=ssl.TLSVersion.TLSv1_2, ciphers=suite
            )
            self.assertEqual(negotiated, "TLSv1.2")

    async def test_minimum_13(self) -> None:
        """
        With tls_min_version 1.3 the server refuses TLS 1.2: the refusals
        come from the gateway's own setting, not the system's defaults.
        """
        server = issue(self.certificates(), "gateway")
        _, port = await self.start_gateway(server, tls_min_version="1.3")
        with self.assertRaises((ssl.SSLError, OSError)):
            await deferToThread(handshake_blocking, port, version=ssl.TLSVersion.TLSv1_2)
        negotiated, _, _ = await deferToThread(handshake_blocking, port, version=ssl.TLSVersion.TLSv1_3)
        self.assertEqual(negotiated, "TLSv1.3")

    async def test_mutual_tls(self) -> None:
        """
        With a client CA, a client without a certificate or with one from
        another CA gets no answer; one with a certificate from the CA does.
        """
        directory = self.certificates()
        server = issue(directory, "gateway")
        ca = issue(directory, "clients-ca", is_ca=True)
        alice = issue(directory, "alice", ca=ca, client=True)
        other_ca = issue(directory, "other-ca", is_ca=True)
        mallory = issue(directory, "mallory", ca=other_ca, client=True)
        _, port = await self.start_gateway(server, client_ca=ca.cert_path)
        answer = await deferToThread(get_api, port, alice)
        self.assertTrue(answer.startswith(b"HTTP/1.1 200"), answer[:100])
        for who in (None, mallory):
            try:
                answer = await deferToThread(get_api, port, who)
            except (ssl.SSLError, OSError):
                continue
            self.assertEqual(answer, b"", f"{who and who.cert.subject} was answered")
        code, _ = await self.https(port, server, client_cert=alice).request("GET", "api")
        self.assertEqual(code, 200)

    async def test_reload(self) -> None:
        """
        A reload makes new connections see the new certificate, leaves an
        open WebSocket working, and a reload of broken files changes
        nothing.
        """
        directory = self.certificates()
        first, second = issue(directory, "first"), issue(directory, "second")
        gateway, port = await self.start_gateway(first)
        https = self.https(port, first, second)
        code, model = await https.request("POST", "api/kernels", {})
        self.assertEqual(code, 201, model)
        gateway.pids.add(model["placement"]["pid"])
        channels = await ChannelsClient.connect(https.base_url, model["id"], client_tls=https.tls_options())
        self.addCleanup(lambda: channels.closed.called or channels.drop())
        replace_files(first, second)
        self.assertTrue(await gateway.service.tls.reload())
        _, der, _ = await deferToThread(handshake_blocking, port)
        self.assertEqual(der, second.der)
        self.assertEqual((await channels.execute("print('still here')"))["stdout"].strip(), "still here")
        with open(first.key_path, "wb") as f:
            f.write(b"not a key")
        self.assertFalse(await gateway.service.tls.reload())
        _, der, _ = await deferToThread(handshake_blocking, port)
        self.assertEqual(der, second.der)
        await https.request("DELETE", f"api/kernels/{model['id']}")


# -- a real daemon, reloaded by SIGHUP ----------------------------------------------


class DaemonReloadTests(TestCase):
    timeout = 180

    async def test_sighup_reloads_without_dropping_connections(self) -> None:
        """
        twistd egateway on ssl: with a self-signed certificate: after the
        files are replaced and SIGHUP is sent, new connections get the new
        certificate while an open WSS stays open and runs code.
        """
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        first, second = issue(workdir, "first"), issue(workdir, "second")
        data_dir = os.path.join(workdir, "runtime")
        os.makedirs(data_dir, mode=0o700)
        port = free_port()
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("EG_", "KG_"))}
        environ["PYTHONPATH"] = REPO_ROOT
        argv = [
            sys.executable,
            os.path.join(os.path.dirname(sys.executable), "twistd"),
            "--nodaemon",
            "--pidfile=",
            "egateway",
            f"--listen=ssl:{port}:interface={LOOPBACK}:privateKey={escape(first.key_path)}:"
            f"certKey={escape(first.cert_path)}",
            f"--data-dir={data_dir}",
            "--response-port=0",
            "--on-stop=shutdown",
        ]
        daemon = ChildProcess("egateway", os.path.join(workdir, "egateway.log"), reactor)
        daemon.start(argv, environ, workdir)

        async def stop() -> None:
            report = await daemon.stop(20, marker=workdir)
            self.assertTrue(report.graceful, f"{report.describe()}; log: {daemon.log_path}")

        self.addCleanup(stop)
        https = HttpsClient(f"https://{LOOPBACK}:{port}/", first, second)
        self.addCleanup(https.close)
        deadline = reactor.seconds() + 30
        while True:
            self.assertFalse(daemon.ended, f"egateway exited:\n{daemon.log_tail()}")
            try:
                code, _ = await https.request("GET", "api")
                if code == 200:
                    break
            except (ConnectError, ConnectionClosed, ResponseFailed, ResponseNeverReceived):
                pass
            self.assertLess(reactor.seconds(), deadline, f"egateway never answered:\n{daemon.log_tail()}")
            await deferLater(reactor, 0.1, lambda: None)

        code, model = await https.request("POST", "api/kernels", {})
        self.assertEqual(code, 201, model)
        channels = await ChannelsClient.connect(https.base_url, model["id"], client_tls=https.tls_options())
        self.assertEqual((await channels.execute("print('before')"))["stdout"].strip(), "before")
        seen = channels._proto.transport.getPeerCertificate().to_cryptography()
        self.assertEqual(seen, first.cert)

        replace_files(first, second)
        daemon.send_signal(signal.SIGHUP)
        deadline = reactor.seconds() + 15
        while True:
            _, der, _ = await deferToThread(handshake_blocking, port)
            if der == second.der:
                break
            self.assertEqual(der, first.der)
            self.assertLess(reactor.seconds(), deadline, f"no reload after SIGHUP:\n{daemon.log_tail()}")
            await deferLater(reactor, 0.1, lambda: None)

        self.assertFalse(channels.closed.called, "the open WebSocket was dropped")
        self.assertEqual((await channels.execute("print('after')"))["stdout"].strip(), "after")
        fresh = await ChannelsClient.connect(https.base_url, model["id"], client_tls=https.tls_options())
        self.assertEqual(fresh._proto.transport.getPeerCertificate().to_cryptography(), second.cert)
        self.assertEqual((await fresh.execute("print('new')"))["stdout"].strip(), "new")
        for client in (channels, fresh):
            client._proto.sendClose()
            await client.closed.addTimeout(10, reactor)
        code, _ = await https.request("DELETE", f"api/kernels/{model['id']}")
        self.assertEqual(code, 204)
        self.assertIn("now serves CN=second", open(daemon.log_path).read())
        self.assertFalse(daemon.ended)
        await stop()
        self.assertEqual(processes_mentioning(data_dir + os.sep), [])


# -- the response listener over TLS ----------------------------------------------------


class ResponseTLSTests(TestCase):
    timeout = 180

    def listener(self, server: Issued) -> ResponseListener:
        tls = TLSService(reactor, None, handle_sighup=False)
        certificate = tls.add(CertificateFiles(server.cert_path, server.key_path), "response")
        tls.startService()
        self.addCleanup(tls.stopService)
        return KernelHarness.make_listener(self, tls=certificate)

    async def test_launcher_delivers_over_tls(self) -> None:
        """
        egateway's launcher, given the CA, delivers version 2 connection
        info over TLS, and the kernel runs.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        server = issue(directory, "gateway")
        harness = KernelHarness(self, self.listener(server))
        kernel_id = str(uuid.uuid4())
        pending = harness.listener.expect(kernel_id)
        harness.spawn(launcher_argv(harness.listener, kernel_id, "--response-ca", server.cert_path), pending.token)
        info = await harness.receive(pending)
        self.assertEqual(pending.version, 2)
        self.assertEqual(info["kernel_id"], kernel_id)
        await harness.connect()
        reply, outputs = await harness.execute("print('over tls')")
        self.assertEqual(reply["status"], "ok")
        self.assertEqual("".join(outputs).strip(), "over tls")

    async def test_server_name_checked(self) -> None:
        """
        The certificate must carry the name the launcher expects: the
        response address's host by default, --response-server-name when
        given (here one the certificate lacks).
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        server = issue(directory, "gateway")
        harness = KernelHarness(self, self.listener(server))
        kernel_id = str(uuid.uuid4())
        pending = harness.listener.expect(kernel_id)
        argv = launcher_argv(
            harness.listener, kernel_id, "--response-ca", server.cert_path, "--response-server-name", "elsewhere.invalid"
        )
        harness.spawn(argv, pending.token)
        code, _ = await harness.process.ended.addTimeout(60, reactor)
        self.assertEqual(code, 1, harness.process.tail())
        self.assertIn("elsewhere.invalid", harness.process.tail())
        self.assertFalse(pending.received.called)
        pending.cancel()

    async def test_wrong_ca_and_plaintext_refused(self) -> None:
        """
        A launcher given another CA refuses to send (and exits), and a
        plaintext payload, as Enterprise Gateway's launchers send it, is
        never accepted by a TLS listener.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        server, stranger = issue(directory, "gateway"), issue(directory, "stranger")
        harness = KernelHarness(self, self.listener(server))
        kernel_id = str(uuid.uuid4())
        pending = harness.listener.expect(kernel_id)
        harness.spawn(launcher_argv(harness.listener, kernel_id, "--response-ca", stranger.cert_path), pending.token)
        code, _ = await harness.process.ended.addTimeout(60, reactor)
        self.assertEqual(code, 1, harness.process.tail())
        self.assertIn("CERTIFICATE_VERIFY_FAILED", harness.process.tail())
        self.assertFalse(pending.received.called)
        pending.cancel()

        sys.path.insert(0, os.path.join(REPO_ROOT, "launchers", "python"))
        try:
            import launch_ipykernel
        finally:
            sys.path.pop(0)
        payload = launch_ipykernel.encrypt_payload(
            {"kernel_id": kernel_id, "ip": "0.0.0.0", "shell_port": 1, "iopub_port": 2, "stdin_port": 3,
             "control_port": 4, "hb_port": 5, "key": "k", "transport": "tcp"},
            harness.listener.public_key,
            None,
        )
        pending = harness.listener.expect(kernel_id)
        answer = await plaintext_exchange(harness.listener.port, payload + b"\n")
        self.assertNotIn(b"OK", answer)
        self.assertFalse(pending.received.called)
        pending.cancel()
