"""
Hostile values in every user-supplied field reach no shell, no argv
position and no template unescaped, and every refusal is a JSON 4xx.

The values carry shell metacharacters (quotes, C{;}, C{|}, C{&}, C{$()},
backticks, newlines), path tricks (C{../}, a leading C{-}), template syntax
(C{{{ }}}, C{%s}, the launchers' own C{{placeholders}}), very long and
non-ASCII text.  Each value that tries to run something would create a
marker file; none may appear.

The local launcher runs a real kernel from a kernelspec whose argv names
placeholders: its C{/proc/<pid>/cmdline} must be exactly that argv with the
gateway's placeholders substituted, while the client's values show up only
in its environment.  The SSH launcher's remote command line (quoted for the
remote shell) runs here under real C{sh} and C{bash}: test_ssh's
InjectionTests run it over real sshd with quotes and semicolons; this adds
the other kinds of value.  Slurm's argv and environment are covered in
test_slurm (sbatch takes an argv list and the job a constant script).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import uuid
from types import SimpleNamespace
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from tests.support.daemon import _bounded, processes_mentioning
from tests.support.gateway import GatewayTestCase
from tests.support.polling import eventually
from tests.support.threads import started_pool
from tests.test_hardening import RawReply, raw_exchange

KERNEL_SCRIPT = (
    "import sys; from ipykernel.kernelapp import launch_new_instance; "
    "launch_new_instance(argv=['-f', sys.argv[1]])"
)
"""
A kernel started with C{python -c}: the arguments after the connection file
are there only to be looked at in C{/proc}.
"""

TOKEN = "injection-t0ken-Qm4v"


def hostile_values(marker: str) -> dict[str, str]:
    """
    Values a client may send (they pass the environment rules) that would
    create C{marker} if a shell or a template ever interpreted them.
    """
    return {
        "KERNEL_QUOTES": f"x'; touch {marker}; echo '",
        "KERNEL_DOUBLE_QUOTES": f'a" ; touch {marker} | touch {marker} & echo "',
        "KERNEL_OPERATORS": f"|| touch {marker} && touch {marker} > {marker} < /dev/null &",
        "KERNEL_DASH": f"--help -rf --output={marker}",
        "KERNEL_DOTS": "../../../../../etc/passwd",
        "KERNEL_TEMPLATES": "{{ 7*7 }} {% print 1 %} {connection_file} {kernel_id} %s %n %(x)s",
        "KERNEL_UNICODE": "ünïcødé ✓ 漢字 \u202e \ufeff",
        "KERNEL_LONG": "y" * 4096,
        "KERNEL_GLOB": "* ? [a-z] ~ ~root",
        "KERNEL_WORKING_DIR": f"/tmp/../tmp; touch {marker}",
        # A gateway without authentication takes the client's user name, as
        # Enterprise Gateway does; it is data in the environment only.
        "KERNEL_USERNAME": f"-o'; touch {marker}",
    }


REFUSED_VALUES = [
    "$(touch {marker})",
    "`touch {marker}`",
    "${HOME}",
    "a\nb",
    "a\rb",
    "a\0b",
    "x" * 4097,
    "\ud800",
]
"""
Values every client field refuses: the characters that could leave a shell
script's quoting, overlong ones, and text that is not encodable.
"""

REFUSED_NAMES = [
    "KERNEL_A;touch",
    "KERNEL_$(x)",
    "KERNEL A",
    "1KERNEL",
    "KERNEL_X\n",
    "",
    "-KERNEL",
    "../KERNEL",
    "KERNEL_é",
    "KERNEL_X=Y",
]


class InjectionTestCase(GatewayTestCase):
    def setUp(self) -> Any:
        self.specs = os.path.abspath(self.mktemp())
        self.data_dir = os.path.abspath(self.mktemp())
        os.makedirs(self.data_dir, mode=0o700)
        self.marker = os.path.join(os.path.abspath(self.mktemp()), "pwned")
        os.makedirs(os.path.dirname(self.marker))
        spec_dir = os.path.join(self.specs, "probe")
        os.makedirs(spec_dir)
        self.spec_argv = [
            "python", "-c", KERNEL_SCRIPT, "{connection_file}", "{kernel_id}",
            "{KERNEL_QUOTES}", "${KERNEL_QUOTES}", "{{kernel_id}}", "{resource_dir}",
        ]
        with open(os.path.join(spec_dir, "kernel.json"), "w") as f:
            json.dump(
                {
                    "argv": self.spec_argv,
                    "display_name": "probe",
                    "language": "python",
                    "env": {"FROM_SPEC": "${KERNEL_QUOTES}", "TEMPLATE_FROM_SPEC": "[${KERNEL_TEMPLATES:-none}]"},
                },
                f,
            )
        self.spec_dir = spec_dir
        self.gateway_settings = {
            **self.gateway_settings,
            "kernelspec_path": self.specs,
            "data_dir": self.data_dir,
            "list_kernels": "true",
        }
        return super().setUp()

    def assertNoMarker(self) -> None:
        self.assertFalse(os.path.exists(self.marker), "a hostile value ran a command")
        self.assertEqual(os.listdir(os.path.dirname(self.marker)), [])
        self.assertEqual(processes_mentioning(self.marker), [])

    async def assertRefused(
        self, method: str, path: str, body: Any, status: int = 400, token: str | None = None
    ) -> dict[str, Any]:
        code, reply = await self.gateway.request(method, path, body, token=token)
        self.assertEqual(code, status, (method, path, body, reply))
        self.assertIsInstance(reply, dict, (method, path, body))
        self.assertEqual(set(reply), {"reason", "message"}, reply)
        return reply


class LocalLauncher(InjectionTestCase):
    async def test_values_reach_only_the_environment(self) -> None:
        """
        A session whose path, name, type and kernel environment are hostile
        starts a kernel whose argv is exactly the kernelspec's with the
        gateway's placeholders substituted; the values arrive verbatim in its
        environment and the session model, and run nothing.
        """
        values = hostile_values(self.marker)
        session_fields = {
            "path": f"../../{values['KERNEL_QUOTES']}/{values['KERNEL_TEMPLATES']}.ipynb",
            "name": values["KERNEL_OPERATORS"],
            "type": values["KERNEL_DASH"],
        }
        code, session = await self.gateway.request(
            "POST", "api/sessions", {**session_fields, "kernel": {"name": "probe", "env": values}}
        )
        self.assertEqual(code, 201, session)
        kernel_id = session["kernel"]["id"]
        pid = session["kernel"]["placement"]["pid"]
        self.gateway.pids.add(pid)
        self.assertEqual({k: session[k] for k in session_fields}, session_fields)

        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().rstrip(b"\0").split(b"\0")
        expected = [
            sys.executable, "-c", KERNEL_SCRIPT,
            os.path.join(self.data_dir, "runtime", f"kernel-{kernel_id}.json"), kernel_id,
            "{KERNEL_QUOTES}", "${KERNEL_QUOTES}", "{" + kernel_id + "}", self.spec_dir,
        ]
        self.assertEqual([arg.decode() for arg in argv], expected)

        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = dict(
                item.decode().split("=", 1) for item in f.read().rstrip(b"\0").split(b"\0") if b"=" in item
            )
        self.assertEqual({name: environ.get(name) for name in values}, values)
        self.assertEqual(environ["FROM_SPEC"], values["KERNEL_QUOTES"])
        self.assertEqual(environ["TEMPLATE_FROM_SPEC"], f"[{values['KERNEL_TEMPLATES']}]")
        self.assertEqual(environ["KERNEL_ID"], kernel_id)
        self.assertNotEqual(os.readlink(f"/proc/{pid}/cwd"), values["KERNEL_WORKING_DIR"])
        self.assertNoMarker()

        # The values also went through the gateway's models unchanged.
        code, model = await self.gateway.request("GET", f"api/kernels/{kernel_id}")
        self.assertEqual((code, model["username"]), (200, values["KERNEL_USERNAME"]))
        code, _ = await self.gateway.request("DELETE", f"api/sessions/{session['id']}")
        self.assertEqual(code, 204)
        self.assertNoMarker()

    async def test_resume_after(self) -> None:
        """
        A channels request whose resume_after is not a message number is a
        JSON 400 before the upgrade; a number (even negative) is accepted.
        """
        model = await self.gateway.start_kernel("probe")
        port = int(self.gateway.url.split(":")[2].split("/")[0])
        for value in ("1;touch%20x", "%24(id)", "%60id%60", "9" * 5000, "1e3", "0x10", "%00", "1%0d%0aX-Injected:%201",
                      "%ff"):
            reply = await raw_exchange(port, _upgrade(port, model["id"], f"resume_after={value}"))
            self.assertEqual(reply.code, 400, (value, reply.raw[:300]))
            self.assertEqual(reply.headers.get("content-type"), "application/json", value)
            self.assertEqual(set(reply.json()), {"reason", "message"})
            self.assertNotIn("x-injected", reply.headers)
        reply = await raw_exchange(port, _upgrade(port, model["id"], "resume_after=-5"))
        self.assertEqual(reply.code, 101, reply.raw[:300])
        kernel = self.gateway.manager.kernels[model["id"]]
        deadline = reactor.seconds() + 10
        while kernel.connections:
            self.assertLess(reactor.seconds(), deadline)
            await deferLater(reactor, 0.02, lambda: None)


class Refusals(InjectionTestCase):
    async def test_environment(self) -> None:
        """
        Environment values with $, backticks, CR, LF or NUL, overlong or
        unencodable ones, non-strings, and malformed names are refused with a
        JSON 400 in a start request and in a session's kernel; nothing
        starts.
        """
        for template in REFUSED_VALUES:
            value = template.replace("{marker}", self.marker)
            for name in ("KERNEL_EXTRA", "KERNEL_USERNAME", "KERNEL_WORKING_DIR", "KERNEL_ID", "KERNEL_PROFILE"):
                await self.assertRefused("POST", "api/kernels", {"name": "probe", "env": {name: value}})
            await self.assertRefused(
                "POST", "api/sessions",
                {"path": "a.ipynb", "type": "notebook", "kernel": {"name": "probe", "env": {"KERNEL_X": value}}},
            )
        for value in (1, 1.5, None, True, [], {}, ["$(id)"]):
            await self.assertRefused("POST", "api/kernels", {"name": "probe", "env": {"KERNEL_EXTRA": value}})
        for name in REFUSED_NAMES:
            await self.assertRefused("POST", "api/kernels", {"name": "probe", "env": {name: "x"}})
        for env in ("KERNEL_X=1; touch x", ["KERNEL_X=1"], 5):
            await self.assertRefused("POST", "api/kernels", {"name": "probe", "env": env})
        self.assertEqual(self.gateway.manager.kernels, {})
        self.assertNoMarker()

    async def test_kernel_ids(self) -> None:
        """
        A client-chosen KERNEL_ID must be a canonical UUID: it names files
        and reaches the kernel's argv.
        """
        for value in ("../../etc/passwd", f"{uuid.uuid4()}; touch {self.marker}", "-rf", str(uuid.uuid4()).upper(),
                      "{kernel_id}", "%s", "0" * 36, str(uuid.uuid4()) + "\t"):
            await self.assertRefused("POST", "api/kernels", {"name": "probe", "env": {"KERNEL_ID": value}})
        self.assertEqual(self.gateway.manager.kernels, {})

    async def test_names(self) -> None:
        """
        Hostile kernelspec and profile names, and non-string ones, are JSON
        4xx refusals (unknown kernelspec: 404; unknown profile: 400), in
        start requests and sessions alike.
        """
        values = [*hostile_values(self.marker).values(), "../probe", "probe/../probe", "probe\n", "probe\0",
                  "$(touch {})".format(self.marker), "`id`", "\ud800", "z" * 100_000]
        for value in values:
            await self.assertRefused("POST", "api/kernels", {"name": value}, 404)
            await self.assertRefused("POST", "api/sessions", _session(kernel={"name": value}), 404)
            await self.assertRefused("POST", "api/kernels", {"name": "probe", "profile": value}, 400)
            await self.assertRefused("POST", "api/kernels", {"name": "probe", "env": {"KERNEL_PROFILE": value}}, 400)
            if len(value) <= 4096:
                # Longer ones exceed Twisted's request line limit (a bare 400).
                status = 400 if "\ud800" in value else 404  # not UTF-8: a 400
                await self.assertRefused("GET", "api/kernelspecs/" + _quote(value), None, status)
        for value in (1, ["probe"], {"name": "probe"}, True):
            await self.assertRefused("POST", "api/kernels", {"name": value}, 400)
            await self.assertRefused("POST", "api/kernels", {"name": "probe", "profile": value}, 400)
            await self.assertRefused("POST", "api/sessions", {"path": value, "type": "notebook"}, 400)
            await self.assertRefused("POST", "api/sessions", _session(kernel={"id": value}), 400)
        await self.assertRefused("POST", "api/sessions", _session(kernel={"id": "../x"}), 404)
        self.assertEqual(self.gateway.manager.kernels, {})
        self.assertNoMarker()

    async def test_paths(self) -> None:
        """
        Hostile kernel ids and kernelspec resource paths in URLs, sent as
        raw bytes so no client normalises them, are JSON 404s (or 400s) that
        read no file outside the kernelspec and inject no header.
        """
        port = int(self.gateway.url.split(":")[2].split("/")[0])
        kid = str(uuid.uuid4())
        paths = [
            "/api/kernels/..%2F..%2F..%2Fetc%2Fpasswd",
            "/api/kernels/../../../etc/passwd",
            "/api/kernels/%24(touch%20x)",
            "/api/kernels/`id`",
            f"/api/kernels/{kid}%00",
            f"/api/kernels/{kid};touch%20x",
            f"/api/kernels/{kid}%0d%0aX-Injected:%201",
            f"/api/kernels/{kid.upper()}/interrupt",
            f"/api/kernels/-{kid[1:]}",
            "/api/kernels/" + "a" * 4000,
            "/api/kernels/%ff%fe%00",
            "/api/kernels/{{7*7}}",
            "/api/kernels/%25s%25n",
            f"/api/sessions/{kid}/..%2F..%2F",
            "/kernelspecs/probe/../../../../../../etc/passwd",
            "/kernelspecs/probe/..%2F..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd",
            "/kernelspecs/probe/%2Fetc%2Fpasswd",
            "/kernelspecs/probe//etc/passwd",
            "/kernelspecs/..%2Fprobe/kernel.json",
            "/kernelspecs/probe/kernel.json%00.png",
            "/api/kernelspecs/..%2Fprobe",
            "/api/kernelspecs/probe%0d%0aX-Injected:%201",
        ]
        for path in paths:
            reply = await raw_exchange(port, f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode("latin-1"))
            self.assertIn(reply.code, (400, 404, 405), (path, reply.raw[:300]))
            self.assertEqual(reply.headers.get("content-type"), "application/json", path)
            self.assertEqual(set(reply.json()), {"reason", "message"}, path)
            self.assertNotIn("x-injected", reply.headers, path)
            self.assertNotIn(b"root:", reply.raw, path)
        self.assertNoMarker()


class Headers(InjectionTestCase):
    gateway_settings = {
        "auth_token": TOKEN,
        "trusted_proxies": "127.0.0.1/32",
        "trusted_user_header": "X-Remote-User",
        # Every refusal here is a wrong credential: keep them all 401s.
        "auth_failure_limit": 0,
    }

    async def test_headers(self) -> None:
        """
        Hostile credentials, Origins and front-end user names are JSON 4xx
        refusals (401, 403), never a 500.
        """
        port = int(self.gateway.url.split(":")[2].split("/")[0])

        async def get(headers: dict[str, str], path: str = "/api/kernelspecs") -> RawReply:
            lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
            request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{lines}\r\n".encode("utf-8")
            return await raw_exchange(port, request)

        for credential in (f"token $(touch {self.marker})", "token `id`", "Bearer ' OR 1=1 --", "token " + "x" * 8000,
                           "token ünïcødé", "Basic Zm9vOmJhcg==", "token {{7*7}}", "token %s%s%n", "token",
                           "Bearer", "token " + TOKEN + "; x", " ", "token\t" + TOKEN + "x"):
            reply = await get({"Authorization": credential})
            self.assertEqual(reply.code, 401, (credential[:40], reply.raw[:300]))
            self.assertEqual(set(reply.json()), {"reason", "message"})
        for user in (f"a'; touch {self.marker}", "a b", "../x", "-rf", "x\ty", "a/b", "a:b", "u" * 300):
            reply = await get({"Authorization": f"token {TOKEN}", "X-Remote-User": user})
            self.assertEqual(reply.code, 401, (user[:40], reply.raw[:300]))
            self.assertEqual(set(reply.json()), {"reason", "message"})
        for origin in ("http://[::1", "http://a]b", "http://[zz]:80", "null", "javascript:alert(1)",
                       f"http://x; touch {self.marker}", "http://127.0.0.1:1@evil.example", "%s" * 100):
            reply = await get({"Authorization": f"token {TOKEN}", "Origin": origin})
            self.assertEqual(reply.code, 403, (origin, reply.raw[:300]))
            self.assertEqual(set(reply.json()), {"reason", "message"})
        reply = await get({"Authorization": f"token {TOKEN}", "X-Remote-User": "alice", "X-Forwarded-For": "$(id)"})
        self.assertEqual(reply.code, 200, reply.raw[:300])
        self.assertNoMarker()


class SSHRemoteCommand(TestCase):
    """
    The SSH launcher's command line for the remote shell, run by real
    local shells instead of over sshd.
    """

    timeout = 60

    async def test_values_stay_quoted(self) -> None:
        """
        Under sh and bash, the remote command line the SSH launcher builds
        starts the kernelspec's argv exactly, with every hostile value in
        the environment verbatim and nothing run.
        """
        from egateway.clusters.interface import LauncherContext, LaunchRequest, LaunchSettings
        from egateway.clusters.ssh import RunAs, SSHLauncher
        from egateway.config import build_config
        from egateway.kernels.specs import KernelSpec

        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        marker = os.path.join(workdir, "pwned")
        values = hostile_values(marker)
        for shell in ("/bin/sh", shutil.which("bash")):
            if shell is None:
                continue
            out = os.path.join(workdir, f"dump-{os.path.basename(shell)}.json")
            spec = KernelSpec.from_json(
                "remote",
                "/nonexistent",
                {
                    "argv": ["python", "-c", _DUMP_SCRIPT, out, "{kernel_id}", "{KERNEL_QUOTES}", "{response_address}"],
                    "language": "python",
                    "metadata": {"egateway": {"launcher": "ssh"}},
                },
            )
            config = build_config({}, {}, {"kernel-log-dir": workdir, "remote-hosts": "localhost"})
            launcher = SSHLauncher(
                LauncherContext(
                    reactor=reactor, runtime_dir="", ports=None, section=config.ssh,
                    shared=LaunchSettings.from_config(config), threadpool=started_pool(self),
                )
            )
            self.addCleanup(launcher.stop)
            launcher.processes.pool = _LocalShell(shell)
            kernel_id = str(uuid.uuid4())
            request = LaunchRequest(
                kernel_id=kernel_id, spec=spec, env=values, config={}, username="u",
                report=lambda *a, **k: None, timeout=30,
            )
            listener = _Listener()
            pending = SimpleNamespace(accept_v1=False, token="the-launch-token")
            started = await launcher._start_on("localhost", request, listener, pending, RunAs())
            self.assertGreater(started.pid, 1)
            dump = await eventually(lambda: _read_json(out), f"the kernel-side process under {shell} to report")
            self.assertEqual(
                dump["argv"],
                [out, kernel_id, "{KERNEL_QUOTES}", listener.response_address],
            )
            self.assertEqual({name: dump["env"].get(name) for name in values}, values)
            # The token reaches the kernel-side launcher on its stdin, never
            # in its environment (nor on a command line).
            self.assertNotIn("EG_LAUNCH_TOKEN", dump["env"])
            self.assertEqual(dump["stdin"], "the-launch-token\n")
        self.assertFalse(os.path.exists(marker), "a hostile value ran a command")
        self.assertEqual([name for name in os.listdir(workdir) if not name.startswith(("dump-", "kernel-"))], [])
        await eventually(lambda: not processes_mentioning(workdir), "the kernel-side processes to exit")


_DUMP_SCRIPT = (
    "import json, os, sys; out = sys.argv[1]; "
    "stdin = sys.stdin.readline() if os.environ.get('EG_LAUNCH_TOKEN_STDIN') else None; "
    "open(out + '.tmp', 'w').write(json.dumps({'argv': sys.argv[1:], 'env': dict(os.environ), 'stdin': stdin})); "
    "os.rename(out + '.tmp', out)"
)


class _Listener:
    response_address = "127.0.0.1:1"
    public_key = "not-a-key"


class _ShellProtocol(ProcessProtocol):
    def __init__(self, stdin: bytes) -> None:
        self._stdin = stdin
        self.out = b""
        self.err = b""
        self.done: Deferred[Any] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self._stdin)
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        self.done.callback(getattr(reason.value, "exitCode", 0) or 0)


class _LocalShell:
    """
    Stands in for the SSH pool: runs each command line the way sshd would,
    with the login shell's C{-c}, on this machine.
    """

    def __init__(self, shell: str) -> None:
        self.shell = shell

    async def run(self, host: str, command: str, stdin: bytes = b"", timeout: float = 30, user: Any = None) -> Any:
        from egateway.clusters.sshclient import CommandResult

        protocol = _ShellProtocol(stdin)
        reactor.spawnProcess(protocol, self.shell, [self.shell, "-c", command], env=dict(os.environ))
        code = await _bounded(protocol.done, timeout, reactor)
        return CommandResult(code, None, protocol.out, protocol.err)

    def close(self) -> None:
        pass


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None




def _session(**fields: Any) -> dict[str, Any]:
    return {"path": "a.ipynb", "type": "notebook", **fields}


def _quote(value: str) -> str:
    from urllib.parse import quote

    return quote(value.encode("utf-8", "surrogatepass"), safe="")


def _upgrade(port: int, kernel_id: str, query: str) -> bytes:
    return (
        f"GET /api/kernels/{kernel_id}/channels?session_id=s1&{query} HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode("latin-1")
