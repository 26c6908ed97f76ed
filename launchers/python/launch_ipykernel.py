#!/usr/bin/env python3
"""
Start an IPython kernel on a remote host for egateway (or Enterprise
Gateway) and report its connection info back to the gateway.

This file is copied onto kernel hosts and into kernel images, so it is
self-contained: it needs only the Python standard library, ipykernel,
jupyter_client and cryptography (not PyCryptodome, and not egateway).  The
wire formats it speaks are specified in egateway's
C{docs/launcher-protocol.md}.

What it does, in order:

 1. Parse Enterprise Gateway's arguments (C{--kernel-id},
    C{--response-address}, C{--public-key}, C{--port-range}, ...) and their
    C{--RemoteProcessProxy.*} aliases, plus C{--ip} and the launch token
    (the first line of stdin with C{EG_LAUNCH_TOKEN_STDIN=1}, else
    C{EG_LAUNCH_TOKEN}; both preferred over C{--launch-token} because the
    command line shows in C{ps}).  With a token it speaks payload
    version 2 and the authenticated comm protocol; without, version 1.
 2. Become its own process group (not in a YARN container: see
    L{own_process_group}), so a gateway signalling C{-pgid} reaches
    the kernel and its children and nothing else.
 3. Bind the comm port (inside the port range) and start the comm
    listener in a separate process (a grandchild, so it is not one of the
    kernel's children).  It watches a pipe from the kernel: when the kernel
    process ends, however it ends, the listener sees EOF and exits.  No
    orphan, and a kernel busy in C code holding the GIL can still be
    signalled.
 4. Start the kernel (C{IPKernelApp}) and let it bind its five ports, then
    send the connection info (with C{pid}, C{pgid}, C{comm_port},
    C{kernel_id}).  Reporting after the bind means the gateway never hears
    of ports the kernel failed to get.  If the gateway answers that it
    refused the payload, the kernel exits at once.  With a CA
    (C{--response-ca} or C{EG_RESPONSE_CA}) the payload goes over TLS and
    the gateway's certificate is checked against it.
 5. Run the kernel until it is shut down, remove the connection file and
    reap the listener.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import importlib
import json
import logging
import os
import random
import select
import signal
import socket
import sys
import tempfile
import uuid

LOG = logging.getLogger("launch_ipykernel")

DEFAULT_KERNEL_CLASS = "ipykernel.ipkernel.IPythonKernel"
TOKEN_ENV = "EG_LAUNCH_TOKEN"
TOKEN_STDIN_ENV = "EG_LAUNCH_TOKEN_STDIN"
TOKEN_FILE_ENV = "EG_LAUNCH_TOKEN_FILE"
RESPONSE_CA_ENV = "EG_RESPONSE_CA"
RESPONSE_SERVER_NAME_ENV = "EG_RESPONSE_SERVER_NAME"
ENCRYPTION_ENV = "EG_KERNEL_ENCRYPTION"
COMM_LABEL = b"egateway-comm-v2"
MAX_REQUEST = 65536
MAX_LINE = 4096
REQUEST_TIMEOUT = 5.0
RESPONSE_TIMEOUT = 30.0


def _env_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = os.environ.get(name, "")
        if value.strip().isdigit():
            return int(value)
    return default


# Enterprise Gateway's environment knobs, same names.
MIN_PORT_RANGE_SIZE = _env_int(("MIN_PORT_RANGE_SIZE", "EG_MIN_PORT_RANGE_SIZE"), 100)
MAX_PORT_RANGE_RETRIES = _env_int(("MAX_PORT_RANGE_RETRIES", "EG_MAX_PORT_RANGE_RETRIES"), 20)


class LaunchFailed(Exception):
    """
    The launch cannot go on; the message says why, for the kernel's log.
    """


# -- arguments -------------------------------------------------------------


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    """
    Enterprise Gateway's arguments (every one optional on the command line,
    as there) with each C{--RemoteProcessProxy.x} alias folded into C{x}.
    """
    parser = argparse.ArgumentParser(description="Start an IPython kernel for a Jupyter gateway.")
    for name, help_text in (
        ("kernel-id", "the kernel's id (required)"),
        ("response-address", "ip:port where the connection info goes"),
        ("public-key", "the gateway's base64 DER RSA public key (required)"),
        ("port-range", "lo..hi for the kernel's ports and the comm port (0..0: any)"),
        ("spark-context-initialization-mode", "lazy, eager or none"),
        ("cluster-type", "spark, dask or none"),
    ):
        dest = name.replace("-", "_")
        parser.add_argument(f"--{name}", dest=dest, nargs="?", help=help_text)
        parser.add_argument(f"--RemoteProcessProxy.{name}", dest=f"rpp_{dest}", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--kernel-class-name", nargs="?", default=DEFAULT_KERNEL_CLASS)
    parser.add_argument("--ip", default="0.0.0.0", help="address the kernel binds (default 0.0.0.0)")
    parser.add_argument(
        "--launch-token",
        nargs="?",
        help=f"one-time launch token for version 2 (prefer the {TOKEN_ENV} environment variable)",
    )
    parser.add_argument(
        "--response-ca",
        default=os.environ.get(RESPONSE_CA_ENV) or None,
        help=f"CA file (PEM) the gateway's certificate must chain to: deliver over TLS [env {RESPONSE_CA_ENV}]",
    )
    parser.add_argument(
        "--response-server-name",
        default=os.environ.get(RESPONSE_SERVER_NAME_ENV) or None,
        help="name the gateway's certificate must carry (default: the response address's host) "
        f"[env {RESPONSE_SERVER_NAME_ENV}]",
    )
    parser.add_argument(
        "--kernel-encryption",
        choices=("auto", "off", "required"),
        default=(os.environ.get(ENCRYPTION_ENV) or "auto").lower(),
        help="CurveZMQ for the kernel's channels (version 2 only): auto (when ipykernel supports it), "
        f"off or required [env {ENCRYPTION_ENV}]",
    )
    parser.add_argument("connection_file", nargs="?", help="connection file path (legacy)")
    args = parser.parse_args(argv)
    for name in ("kernel_id", "response_address", "public_key", "port_range",
                 "spark_context_initialization_mode", "cluster_type"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(args, f"rpp_{name}"))
        delattr(args, f"rpp_{name}")
    # Enterprise Gateway's effective defaults.
    args.spark_context_initialization_mode = args.spark_context_initialization_mode or "none"
    args.cluster_type = args.cluster_type or "spark"
    if args.cluster_type == "spark" and args.spark_context_initialization_mode == "none":
        args.cluster_type = "none"
    token = os.environ.pop(TOKEN_ENV, None)  # not inherited by the kernel's children
    from_stdin = token_from_stdin()
    from_file = token_from_file()
    args.launch_token = args.launch_token or from_stdin or from_file or token or None
    if not args.kernel_id:
        raise LaunchFailed("--kernel-id is required")
    if not args.public_key:
        raise LaunchFailed("--public-key is required")
    if args.cluster_type not in ("spark", "dask", "none"):
        raise LaunchFailed(f"unknown --cluster-type {args.cluster_type!r}")
    if args.kernel_encryption not in ("auto", "off", "required"):
        raise LaunchFailed(f"unknown kernel encryption {args.kernel_encryption!r} ({ENCRYPTION_ENV}): auto, off or required")
    return args


def token_from_stdin() -> str | None:
    """
    The launch token from the first line of stdin, when the gateway says
    it put it there (C{EG_LAUNCH_TOKEN_STDIN=1}, as egateway's SSH launcher
    does): a process's initial environment stays readable in
    C{/proc/<pid>/environ} for its whole life, stdin does not.  stdin is
    then replaced by C{/dev/null}, so the kernel's code cannot read it.
    """
    if os.environ.pop(TOKEN_STDIN_ENV, "") != "1":
        return None
    line = b""
    while not line.endswith(b"\n") and len(line) < 4096:
        chunk = os.read(0, 1)
        if not chunk:
            break
        line += chunk
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    return line.decode("utf-8", "replace").strip() or None


def token_from_file() -> str | None:
    """
    The launch token from the file named in C{EG_LAUNCH_TOKEN_FILE},
    removed once read: for a launcher run by a program that does not hand
    its stdin on (spark-submit gives a Python application a pipe of its
    own), C{launchers/spark/submit_kernel.sh} moves the token from stdin
    into such a file (mode 0600).
    """
    path = os.environ.pop(TOKEN_FILE_ENV, "")
    if not path:
        return None
    try:
        with open(path) as f:
            return f.readline(4096).strip() or None
    except OSError as e:
        raise LaunchFailed(f"cannot read the launch token from {path}: {e}") from None
    finally:
        _remove(path)


def parse_port_range(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 0
    try:
        low, high = (int(part) for part in text.split(".."))
    except ValueError:
        raise LaunchFailed(f"--port-range {text!r} is not of the form lo..hi") from None
    if (low, high) == (0, 0):
        return 0, 0
    if not (0 < low < high <= 65535):
        raise LaunchFailed(f"--port-range {text!r} must satisfy 0 < lo < hi <= 65535")
    if high - low + 1 < MIN_PORT_RANGE_SIZE:
        raise LaunchFailed(
            f"--port-range {text!r} holds fewer than {MIN_PORT_RANGE_SIZE} ports "
            "(EG_MIN_PORT_RANGE_SIZE)"
        )
    return low, high


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise LaunchFailed(f"--response-address {text!r} is not ip:port")
    return host.strip("[]"), int(port)


# -- ports -----------------------------------------------------------------


def _socket_for(ip: str) -> socket.socket:
    return socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM)


def bind_in_range(ip: str, low: int, high: int, avoid: set[int]) -> socket.socket:
    """
    A TCP socket bound to a free port in C{low..high} (any port for 0..0).
    """
    for _ in range(MAX_PORT_RANGE_RETRIES + 1):
        port = 0 if (low, high) == (0, 0) else random.randint(low, high)
        if port in avoid:
            continue
        sock = _socket_for(ip)
        try:
            sock.bind((ip, port))
            return sock
        except OSError:
            sock.close()
    raise LaunchFailed(f"no free port in {low}..{high} after {MAX_PORT_RANGE_RETRIES} tries")


def choose_kernel_ports(ip: str, low: int, high: int, avoid: set[int]) -> list[int]:
    """
    Five ports for the kernel.  Without a range the kernel binds port 0
    itself, which cannot race; within a range we probe and release, as
    every launcher must.
    """
    if (low, high) == (0, 0):
        return [0] * 5
    return probe_ports(ip, low, high, avoid)


def probe_ports(ip: str, low: int, high: int, avoid: set[int]) -> list[int]:
    """
    Five free ports in C{low..high} (any five for 0..0), probed and
    released: for kernels that need them chosen before they start.
    """
    probes = []
    try:
        for _ in range(5):
            probe = bind_in_range(ip, low, high, avoid)
            avoid.add(probe.getsockname()[1])
            probes.append(probe)
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def write_connection_file(path: str, ip: str, ports: list[int]) -> None:
    info = {
        "shell_port": ports[0],
        "iopub_port": ports[1],
        "stdin_port": ports[2],
        "hb_port": ports[3],
        "control_port": ports[4],
        "ip": ip,
        "key": str(uuid.uuid4()),
        "transport": "tcp",
        "signature_scheme": "hmac-sha256",
        "kernel_name": "",
    }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f)


def connection_file_for(requested: str | None, kernel_id: str) -> str:
    """
    The requested file if its directory exists (Enterprise Gateway's
    rule), else a private temporary file.
    """
    if requested and os.path.isdir(os.path.dirname(os.path.abspath(requested))):
        return requested
    fd, path = tempfile.mkstemp(prefix=f"kernel-{kernel_id}_", suffix=".json")
    os.close(fd)
    return path


# -- the handshake payload -------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def load_public_key(public_key_b64: str):
    """
    The gateway's RSA public key, checked before anything is started.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    try:
        key = serialization.load_der_public_key(base64.b64decode(public_key_b64, validate=True))
    except ValueError as e:
        raise LaunchFailed(f"--public-key is not a base64 DER public key: {e}") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise LaunchFailed("--public-key is not an RSA key")
    return key


def encrypt_payload(info: dict, public_key_b64: str, token: str | None) -> bytes:
    """
    Version 2 with a token, else version 1; formats in
    C{docs/launcher-protocol.md}.
    """
    from cryptography.hazmat.primitives import hashes, padding
    from cryptography.hazmat.primitives.asymmetric.padding import MGF1, OAEP, PKCS1v15
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    public_key = load_public_key(public_key_b64)
    if token is None:
        aes_key = os.urandom(16)
        padder = padding.PKCS7(128).padder()
        padded = padder.update(json.dumps(info).encode("utf-8")) + padder.finalize()
        encryptor = Cipher(algorithms.AES(aes_key), modes.ECB()).encryptor()
        outer = {
            "version": 1,
            "key": _b64(public_key.encrypt(aes_key, PKCS1v15())),
            "conn_info": _b64(encryptor.update(padded) + encryptor.finalize()),
        }
    else:
        kernel_id = info["kernel_id"]
        aes_key = os.urandom(32)
        nonce = os.urandom(12)
        plaintext = json.dumps(dict(info, launch_token=token)).encode("utf-8")
        oaep = OAEP(mgf=MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
        outer = {
            "version": 2,
            "kernel_id": kernel_id,
            "key": _b64(public_key.encrypt(aes_key, oaep)),
            "nonce": _b64(nonce),
            "conn_info": _b64(AESGCM(aes_key).encrypt(nonce, plaintext, f"2|{kernel_id}".encode("utf-8"))),
        }
    return base64.b64encode(json.dumps(outer).encode("utf-8"))


def _tls_context(ca_file: str):
    import ssl

    try:
        context = ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as e:
        raise LaunchFailed(f"cannot load the gateway's CA {ca_file}: {e}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def send_connection_info(
    address: str, payload: bytes, ca_file: str | None = None, server_name: str | None = None
) -> None:
    """
    Deliver the payload, end it and read the gateway's verdict.  egateway
    answers C{OK} or C{ERROR ...}; Enterprise Gateway answers nothing, which
    counts as accepted.

    In plain TCP a half-close ends the payload.  With C{ca_file} it goes
    over TLS, checked against that CA and C{server_name} (default: the
    address's host), and a newline ends it, since TLS cannot half-close.
    """
    host, port = parse_address(address)
    try:
        with socket.create_connection((host, port), timeout=RESPONSE_TIMEOUT) as raw:
            if ca_file:
                sock = _tls_context(ca_file).wrap_socket(raw, server_hostname=server_name or host)
                sock.sendall(payload + b"\n")
            else:
                sock = raw
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
            verdict = b""
            try:
                while len(verdict) < 256:
                    chunk = sock.recv(256)
                    if not chunk:
                        break
                    verdict += chunk
            except OSError:
                pass
    except OSError as e:
        raise LaunchFailed(f"cannot deliver connection info to {address}: {e}") from None
    if verdict.startswith(b"ERROR"):
        raise LaunchFailed(
            f"the gateway at {address} refused the connection info; see the gateway log"
        )


# -- the comm listener (runs in a child process) ---------------------------


def comm_key(token: str, kernel_id: str) -> bytes:
    return hmac.new(token.encode("utf-8"), COMM_LABEL + b"|" + kernel_id.encode("utf-8"), hashlib.sha256).digest()


class CommListener:
    """
    Serves the comm port for one kernel: one request per connection,
    version 1 (plain JSON to EOF) without a key, version 2
    (challenge-response, see C{egateway.clusters.comm}) with one.
    """

    def __init__(
        self,
        sock: socket.socket,
        kernel_pid: int,
        kernel_gone_fd: int,
        key: bytes | None,
        cluster_type: str,
        cancel_fd: int | None = None,
    ) -> None:
        self.sock = sock
        self.kernel_pid = kernel_pid
        self.kernel_gone_fd = kernel_gone_fd
        self.key = key
        self.cluster_type = cluster_type
        self.cancel_fd = cancel_fd

    def cancel_spark_jobs(self) -> None:
        """
        Tell the kernel's Spark-cancelling thread to cancel its jobs (an
        interrupt stops the cell; its Spark jobs would run on).  A second
        signal (Enterprise Gateway's SIGUSR2 right after SIGINT) can be
        taken by another thread of the kernel while the main thread still
        has the first pending, and the sleeping cell then misses the
        interrupt; a byte on a pipe cannot.
        """
        if self.cancel_fd is not None:
            try:
                os.write(self.cancel_fd, b"c")
            except OSError as e:
                LOG.warning("cannot ask the kernel to cancel its Spark jobs: %s", e)

    def kernel_alive(self) -> bool:
        """
        The pipe from the kernel reaches EOF the moment the kernel process
        ends, however it ends.
        """
        if select.select([self.kernel_gone_fd], [], [], 0)[0]:
            return False
        try:
            os.kill(self.kernel_pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True

    def serve(self) -> None:
        """
        Answer requests until asked to shut down or until the kernel ends.
        """
        self.sock.listen(16)
        while True:
            # The pipe is the signal; the timeout is a backstop for a pipe
            # end kept open by a process the kernel forked.
            readable, _, _ = select.select([self.sock, self.kernel_gone_fd], [], [], 5.0)
            if self.kernel_gone_fd in readable or not self.kernel_alive():
                return
            if not readable:
                continue
            try:
                connection, _ = self.sock.accept()
            except OSError:
                continue
            with connection:
                connection.settimeout(REQUEST_TIMEOUT)
                try:
                    if self.handle(connection):
                        return
                except (OSError, ValueError) as e:
                    LOG.warning("comm request failed: %s", e)

    def handle(self, connection: socket.socket) -> bool:
        """
        Serve one connection; returns whether to stop listening.
        """
        if self.key is None:
            data = b""
            while len(data) <= MAX_REQUEST:
                chunk = connection.recv(4096)
                if not chunk:
                    break
                data += chunk
            if not data.strip():
                return False
            request = json.loads(data.decode("utf-8"))
            if not isinstance(request, dict):
                raise ValueError("the request is not a JSON object")
            ok, error, stop = self.act(request)
            if error:
                LOG.warning("comm request %s: %s", request, error)
            return stop
        challenge = os.urandom(16)
        connection.sendall(json.dumps({"version": 2, "challenge": _b64(challenge)}).encode() + b"\n")
        line = b""
        while b"\n" not in line and len(line) <= MAX_LINE:
            chunk = connection.recv(4096)
            if not chunk:
                break
            line += chunk
        message = json.loads(line.split(b"\n", 1)[0].decode("utf-8"))
        text = message.get("request") if isinstance(message, dict) else None
        mac = message.get("mac") if isinstance(message, dict) else None
        if not isinstance(text, str) or not isinstance(mac, str):
            raise ValueError("malformed version 2 request")
        expected = hmac.new(
            self.key, COMM_LABEL + b"\n" + challenge + b"\n" + text.encode("utf-8"), hashlib.sha256
        ).hexdigest()
        if not hmac.compare_digest(expected.encode(), mac.encode()):
            LOG.warning("refused a comm request with a wrong MAC")
            self._answer(connection, False, "authentication failed")
            return False
        request = json.loads(text)
        if not isinstance(request, dict):
            raise ValueError("the request is not a JSON object")
        ok, error, stop = self.act(request)
        self._answer(connection, ok, error)
        return stop

    def _answer(self, connection: socket.socket, ok: bool, error: str) -> None:
        reply: dict[str, object] = {"ok": ok, "alive": self.kernel_alive()}
        if error:
            reply["error"] = error
        connection.sendall(json.dumps(reply).encode("utf-8") + b"\n")

    def act(self, request: dict) -> tuple[bool, str, bool]:
        """
        Carry out C{signum} and C{shutdown}; returns (ok, error, stop).
        """
        stop = bool(request.get("shutdown"))
        signum = request.get("signum")
        if signum is None:
            return True, "", stop
        if not self.kernel_alive():
            return False, "the kernel process is gone", True
        try:
            signum = int(signum)
            if signum != 0:
                LOG.info("comm request: signal %d to kernel %d", signum, self.kernel_pid)
            os.kill(self.kernel_pid, signum)
            if signum == signal.SIGINT and self.cluster_type == "spark":
                self.cancel_spark_jobs()
        except (TypeError, ValueError, OverflowError):
            return False, f"bad signal number {signum!r}", stop
        except ProcessLookupError:
            return False, "the kernel process is gone", True
        except OSError as e:
            return False, f"cannot signal the kernel: {e}", stop
        return True, "", stop


class ListenerHandle:
    """
    The kernel's two pipe ends to its comm listener: closing C{stop_fd}
    tells the listener the kernel is ending; C{exited_fd} reaches EOF once
    the listener process has gone.
    """

    def __init__(self, stop_fd: int, exited_fd: int) -> None:
        self.stop_fd = stop_fd
        self.exited_fd = exited_fd

    def stop(self, timeout: float = 5.0) -> None:
        """
        Make the listener exit and wait (bounded) until it has, so that a
        launcher that has exited leaves no process behind, even briefly.
        """
        os.close(self.stop_fd)
        try:
            while select.select([self.exited_fd], [], [], timeout)[0]:
                if not os.read(self.exited_fd, 64):
                    break
            else:
                LOG.warning("the comm listener did not exit within %gs", timeout)
        finally:
            os.close(self.exited_fd)


def start_comm_listener(
    sock: socket.socket, key: bytes | None, cluster_type: str, cancel_fd: int | None = None
) -> ListenerHandle:
    """
    Start the comm listener as a grandchild of the kernel (fork twice), so
    it is not among the kernel's children: ipykernel would otherwise kill it
    and wait for it while shutting down, and user code reaping "any child"
    could take it.  The listener exits when the kernel process ends (EOF on
    a pipe only the kernel holds open), however it ends.
    """
    kernel_pid = os.getpid()
    stop_read, stop_write = os.pipe()
    exited_read, exited_write = os.pipe()
    intermediate = os.fork()
    if intermediate == 0:
        status = 0
        try:
            os.close(stop_write)
            os.close(exited_read)
            if os.fork() == 0:
                # exited_write stays open, unused, until this process ends.
                status = _run_listener(sock, kernel_pid, stop_read, key, cluster_type, cancel_fd)
        finally:
            # Neither forked process may ever return into the kernel's code.
            os._exit(status)
    os.waitpid(intermediate, 0)
    os.close(stop_read)
    os.close(exited_write)
    sock.close()
    return ListenerHandle(stop_write, exited_read)


def _run_listener(
    sock: socket.socket, kernel_pid: int, gone_fd: int, key: bytes | None, cluster_type: str, cancel_fd: int | None
) -> int:
    try:
        # Interrupts and Spark cancellation are for the kernel, not us.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        LOG.info(
            "comm listener %d on port %d (protocol version %d)",
            os.getpid(), sock.getsockname()[1], 2 if key else 1,
        )
        CommListener(sock, kernel_pid, gone_fd, key, cluster_type, cancel_fd).serve()
        return 0
    except BaseException:
        LOG.exception("comm listener failed")
        return 1
    finally:
        logging.shutdown()


# -- the kernel ------------------------------------------------------------


class _SparkPlaceholder:
    """
    Stands in for C{spark}/C{sc}/C{sqlContext} while the Spark session is
    created in the background; first use waits for it.
    """

    def __init__(self, name: str, ready, namespace: dict) -> None:
        self._name, self._ready, self._namespace = name, ready, namespace

    def __getattr__(self, attribute: str):
        if attribute.startswith("__") or attribute.startswith("_ipython_") or attribute.startswith("_repr_"):
            raise AttributeError(attribute)
        error = self._ready()
        if error is not None:
            raise RuntimeError(f"{self._name} could not be initialised: {error}") from error
        return getattr(self._namespace[self._name], attribute)


_spark_context = None


def initialize_namespace(namespace: dict, cluster_type: str, mode: str = "lazy") -> None:
    """
    Spark: C{spark}, C{sc}, C{sqlContext}, C{sqlCtx} and C{sql}.  With
    C{eager} the session exists before the kernel reports (on YARN, the
    application is RUNNING when the kernel is ready); with C{lazy} it is
    created in a background thread so the kernel answers at once, and its
    names wait for it on first use.  Dask: C{cluster} from C{dask_yarn}.
    None: nothing.

    @raise LaunchFailed: eager, and the session cannot be created.
    """
    if cluster_type == "dask":
        import dask_yarn

        namespace["cluster"] = dask_yarn.YarnCluster.from_current()
        return
    if cluster_type != "spark":
        return
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        LOG.info("pyspark is not installed; no Spark session will be created")
        return
    import atexit
    import threading

    failure: list[BaseException] = []

    def build() -> None:
        global _spark_context
        try:
            session = SparkSession.builder.getOrCreate()
        except BaseException as e:  # reported on first use of the placeholders
            failure.append(e)
            return
        _spark_context = session.sparkContext
        atexit.register(session.stop)
        legacy = sql_context(session)
        namespace.update(spark=session, sc=session.sparkContext, sql=session.sql,
                         sqlContext=legacy, sqlCtx=legacy)

    if mode == "eager":
        build()
        if failure:
            raise LaunchFailed(f"the Spark session could not be created: {failure[0]}")
        return
    worker = threading.Thread(target=build, name="spark-session", daemon=True)

    def ready():
        worker.join()
        return failure[0] if failure else None

    spark = _SparkPlaceholder("spark", ready, namespace)
    context = _SparkPlaceholder("sqlContext", ready, namespace)
    namespace.update(spark=spark, sc=_SparkPlaceholder("sc", ready, namespace),
                     sqlContext=context, sqlCtx=context, sql=lambda query: spark.sql(query))
    worker.start()


def spark_yarn_cluster_driver() -> bool:
    """
    Whether we are the driver of a Spark application in YARN cluster mode:
    Spark's C{PythonRunner} started us (it hands the driver JVM's Py4J
    gateway over in C{PYSPARK_GATEWAY_PORT}) inside a YARN container (the
    NodeManager sets C{CONTAINER_ID}), which only the ApplicationMaster's
    driver is; and Spark's YARN client staged the application
    (C{SPARK_YARN_STAGING_DIR}, set in the ApplicationMaster's environment).
    """
    return all(os.environ.get(name) for name in ("PYSPARK_GATEWAY_PORT", "CONTAINER_ID", "SPARK_YARN_STAGING_DIR"))


HIDDEN_CONTEXT_CONF = {
    "spark.executor.instances": "0",
    "spark.dynamicAllocation.enabled": "true",
    "spark.dynamicAllocation.minExecutors": "0",
    "spark.dynamicAllocation.initialExecutors": "0",
    "spark.dynamicAllocation.shuffleTracking.enabled": "true",
}
"""
The hidden context's executors: none while idle, as many as its jobs ask
for (within the kernelspec's C{spark.dynamicAllocation.maxExecutors}).
"""


def keep_application_master_alive() -> None:
    """
    For a kernel without a Spark context that is the driver of a YARN
    cluster-mode application: create a Spark context anyway, in a
    background thread (the kernel is ready at once), out of the user's
    namespace (C{none} keeps its meaning there), stopped at exit.  It holds
    no executor while idle: dynamic allocation from zero (with shuffle
    tracking, so no external shuffle service is needed), so code that makes
    its own session later (C{SparkSession.builder.getOrCreate()}, which
    returns this context) still gets executors for its jobs, and gives them
    back when idle.

    Why: Spark's ApplicationMaster registers with the ResourceManager only
    once the driver has created its Spark context, and the ResourceManager
    fails an ApplicationMaster that has not registered within
    C{yarn.am.liveness-monitor.expiry-interval-ms} (10 minutes by default),
    whatever C{spark.yarn.am.waitTime} says: an idle kernel would die.  The
    ApplicationMaster's allocator takes its configuration from this
    context.

    A failure is logged and the kernel runs on (as it did before: until
    the ResourceManager's expiry).
    """
    import atexit
    import threading

    def build() -> None:
        try:
            from pyspark import SparkConf, SparkContext

            SparkContext._ensure_initialized()  # connect to the driver JVM: the configuration comes from it
            conf = SparkConf()
            if conf.get("spark.master", "") != "yarn" or conf.get("spark.submit.deployMode", "") != "cluster":
                LOG.info("not a YARN cluster-mode driver (master %s); no hidden Spark context",
                         conf.get("spark.master", "?"))
                return
            for name, value in HIDDEN_CONTEXT_CONF.items():
                conf.set(name, value)
            context = SparkContext(conf=conf)
        except Exception as e:  # the kernel still works, until the ResourceManager's expiry
            LOG.warning(
                "no Spark context for the ApplicationMaster to register with YARN: %s; the ResourceManager "
                "will fail this idle kernel after yarn.am.liveness-monitor.expiry-interval-ms", e,
            )
            return
        atexit.register(context.stop)
        LOG.info("hidden Spark context created (executors on demand): the ApplicationMaster registers with YARN")

    LOG.info(
        "kernel without a Spark context in a YARN cluster-mode application: creating a hidden Spark context "
        "(no executor until a job needs one), so that the ApplicationMaster registers with the ResourceManager (which would fail "
        "it after yarn.am.liveness-monitor.expiry-interval-ms otherwise); spark and sc stay undefined"
    )
    threading.Thread(target=build, name="yarn-am-keepalive", daemon=True).start()


def sql_context(session):
    """
    A C{SQLContext} over the session (C{spark._wrapped}, which Enterprise
    Gateway's launcher reads, is gone since pyspark 3.3), or C{None}.
    """
    import warnings

    try:
        from pyspark.sql import SQLContext

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return SQLContext(session.sparkContext, session)
    except Exception as e:  # an optional convenience: the session still works
        LOG.info("no sqlContext: %s", e)
        return None


def follow_spark_cancellations(fd: int) -> None:
    """
    A daemon thread cancelling the Spark jobs each time the comm listener
    writes to C{fd} (after it delivered an interrupt).
    """
    import threading

    def follow() -> None:
        while True:
            try:
                data = os.read(fd, 64)
            except OSError:
                return
            if not data:
                return
            _cancel_spark_jobs(signal.SIGUSR2, None)

    threading.Thread(target=follow, name="spark-cancel", daemon=True).start()


def _cancel_spark_jobs(signum, frame) -> None:
    if _spark_context is not None:
        try:
            _spark_context.cancelAllJobs()
        except Exception as e:
            LOG.warning("cancelling Spark jobs failed: %s", e)


def import_class(dotted: str):
    module, _, name = dotted.rpartition(".")
    if not module:
        raise LaunchFailed(f"--kernel-class-name {dotted!r} is not a dotted name")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise LaunchFailed(f"cannot import kernel class {dotted!r}: {e}") from None


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        LOG.warning("could not remove %s: %s", path, e)


def curve_keys(policy: str, version_2: bool) -> tuple[str, str] | None:
    """
    A CurveZMQ key pair to offer the kernel (Z85 public, secret), or
    C{None} for clear text.  Only with version 2: a version 1 gateway
    (Enterprise Gateway) would not know to use them.  Whether the installed
    ipykernel really encrypts with them is only known once it has bound its
    sockets (L{curve_in_use}).
    """
    if policy == "off" or not version_2:
        if policy == "required" and not version_2:
            raise LaunchFailed("--kernel-encryption required needs a version 2 gateway (a launch token)")
        return None
    try:
        import zmq

        supported = bool(zmq.has("curve"))
    except ImportError:
        supported = False
    if not supported:
        if policy == "required":
            raise LaunchFailed("--kernel-encryption required, but this libzmq cannot do CurveZMQ (no libsodium)")
        LOG.info("kernel channels stay in clear text: this libzmq cannot do CurveZMQ")
        return None
    public, secret = zmq.curve_keypair()
    return public.decode("ascii"), secret.decode("ascii")


def offer_curve_keys(app, curve: tuple[str, str]) -> None:
    """
    Hand the key pair to the kernel application before it binds, as bytes
    (the type its traits hold).  We do not write them into the connection
    file ourselves: ipykernel 6 under jupyter_client 8.10 merges such a
    file into its own and dies writing it (the keys come back as text).  An
    application without the traits (jupyter_client 7) simply gets none.
    """
    if app.has_trait("curve_secretkey") and app.has_trait("curve_publickey"):
        app.curve_publickey = curve[0].encode("ascii")
        app.curve_secretkey = curve[1].encode("ascii")


def _kernel_sockets(app) -> list:
    """
    The kernel's bound ZMQ sockets that carry messages (not the heartbeat).
    """
    sockets = [getattr(app, name, None) for name in ("shell_socket", "stdin_socket", "control_socket")]
    iopub_thread = getattr(app, "iopub_thread", None)
    sockets.append(getattr(iopub_thread, "socket", None))
    return [sock for sock in sockets if sock is not None]


def curve_in_use(app) -> tuple[bool, str]:
    """
    Whether the initialised kernel bound every message socket as a CurveZMQ
    server: what it really does, whatever traits it has.  Returns (True,
    "") or (False, the reason for the kernel's log and the gateway).

    @raise LaunchFailed: some sockets are encrypted and others are not, so
        no client could use them all.
    """
    import zmq

    flags = [bool(sock.getsockopt(zmq.CURVE_SERVER)) for sock in _kernel_sockets(app)]
    if flags and all(flags):
        return True, ""
    if any(flags):
        raise LaunchFailed("the kernel bound some of its sockets with CurveZMQ and others without")
    versions = []
    for name in ("ipykernel", "jupyter_client"):
        try:
            versions.append(f"{name} {importlib.import_module(name).__version__}")
        except (ImportError, AttributeError):
            versions.append(f"{name} (unknown version)")
    return False, (
        f"{' with '.join(versions)} bound the kernel's sockets without CurveZMQ "
        "(ipykernel 7.4 or newer encrypts them)"
    )


def _forget_curve_keys(app, info: dict) -> None:
    """
    The kernel ignored its keys: report none, so the gateway connects in
    clear text instead of waiting for a CurveZMQ handshake that never comes.
    """
    if app.has_trait("curve_secretkey"):
        app.curve_publickey = None
        app.curve_secretkey = None
    info.pop("curve_publickey", None)
    info.pop("curve_secretkey", None)



def in_yarn_container() -> bool:
    """
    Whether a YARN NodeManager started us (it sets C{CONTAINER_ID} in every
    container's environment).
    """
    return bool(os.environ.get("CONTAINER_ID"))


def own_process_group() -> None:
    """
    Become our own process group, so a gateway signalling C{-pgid} (over
    SSH) reaches the kernel and its children and nothing else.

    Not inside a YARN container: the NodeManager kills a container by
    signalling the container's process group, and a kernel that had left
    it would outlive its killed application.  There the kernel stays in
    the container's group and also asks the kernel (Linux) to end it when
    its parent, the ApplicationMaster's driver JVM, dies.
    """
    if in_yarn_container():
        die_with_parent()
        return
    try:
        os.setpgid(0, 0)
    except OSError:
        pass  # a session leader already leads its group


def die_with_parent() -> None:
    """
    C{prctl(PR_SET_PDEATHSIG, SIGTERM)}: SIGTERM when our parent exits.
    """
    import ctypes

    PR_SET_PDEATHSIG = 1
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            LOG.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    except (OSError, AttributeError) as e:
        LOG.warning("cannot ask to die with the parent process: %s", e)
    if os.getppid() != parent:
        # The parent died before prctl took effect.
        os.kill(os.getpid(), signal.SIGTERM)


def launch(args: argparse.Namespace) -> int:
    low, high = parse_port_range(args.port_range)
    if args.response_address:
        parse_address(args.response_address)
        load_public_key(args.public_key)
        if args.response_ca:
            _tls_context(args.response_ca)
    curve = curve_keys(args.kernel_encryption, bool(args.launch_token))
    own_process_group()
    comm_socket = bind_in_range(args.ip, low, high, set())
    comm_port = comm_socket.getsockname()[1]
    ports = choose_kernel_ports(args.ip, low, high, {comm_port})
    connection_file = connection_file_for(args.connection_file, args.kernel_id)
    write_connection_file(connection_file, args.ip, ports)
    key = comm_key(args.launch_token, args.kernel_id) if args.launch_token else None
    cancel_read, cancel_write = os.pipe() if args.cluster_type == "spark" else (None, None)
    listener = start_comm_listener(comm_socket, key, args.cluster_type, cancel_write)
    if cancel_write is not None:
        os.close(cancel_write)
        follow_spark_cancellations(cancel_read)

    def terminated(signum, frame):
        # Leave no connection file behind, then die of the signal as usual.
        _remove(connection_file)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, terminated)
    try:
        kernel_class = import_class(args.kernel_class_name)
        from ipykernel.kernelapp import IPKernelApp

        namespace: dict = {}
        initialize_namespace(namespace, args.cluster_type, args.spark_context_initialization_mode)
        if args.cluster_type != "spark" and spark_yarn_cluster_driver():
            keep_application_master_alive()
        if args.cluster_type == "spark":
            # Enterprise Gateway's gateways still send SIGUSR2 to cancel.
            signal.signal(signal.SIGUSR2, _cancel_spark_jobs)
        app = IPKernelApp.instance(
            kernel_class=kernel_class, user_ns=namespace, connection_file=connection_file, ip=args.ip
        )
        if curve is not None:
            offer_curve_keys(app, curve)
        app.initialize([])
        with open(connection_file) as f:
            info = json.load(f)
        if curve is not None:
            encrypted, reason = curve_in_use(app)
            if not encrypted:
                if args.kernel_encryption == "required":
                    raise LaunchFailed(f"--kernel-encryption required, but {reason}")
                LOG.warning("kernel channels stay in clear text (signed, not encrypted): %s", reason)
                _forget_curve_keys(app, info)
                info["encryption_reason"] = reason
            elif info.get("curve_publickey") != curve[0]:
                raise LaunchFailed("the kernel encrypts, but its connection file lacks its CurveZMQ key")
        elif args.launch_token:
            info["encryption_reason"] = (
                f"--kernel-encryption off ({ENCRYPTION_ENV}) on the kernel's host"
                if args.kernel_encryption == "off"
                else "the kernel host's libzmq cannot do CurveZMQ"
            )
        info.update(pid=os.getpid(), pgid=os.getpgid(0), comm_port=comm_port, kernel_id=args.kernel_id)
        if args.response_address:
            send_connection_info(
                args.response_address,
                encrypt_payload(info, args.public_key, args.launch_token),
                args.response_ca,
                args.response_server_name,
            )
            LOG.info("connection info sent to %s", args.response_address)
        app.start()
        return 0
    finally:
        _remove(connection_file)
        listener.stop()


def main(argv: list[str] | None = None) -> int:
    level = os.environ.get("LOG_LEVEL", os.environ.get("EG_LOG_LEVEL", "INFO"))
    logging.basicConfig(
        format="[%(levelname)1.1s %(asctime)s %(name)s] %(message)s",
        level=int(level) if level.isdigit() else level.upper(),
    )
    try:
        args = parse_arguments(sys.argv[1:] if argv is None else argv)
        return launch(args)
    except LaunchFailed as e:
        LOG.error("%s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
