"""
Kernels on SSH hosts: real sshd daemons in network namespaces the test
creates, real kernels started there by launchers/python/launch_ipykernel.py,
reporting their connection info to the gateway's response listener.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tests.fixtures import SSHHosts
from tests.fixtures._processes import describe
from tests.fixtures.system import SSH_PACKAGES, require_packages
from tests.support.contract import LauncherContract, request_for
from tests.support.forgery import Gate, forged_v1, pending_launch, run_here, send_from
from tests.support.gateway import GatewayTestCase
from tests.support.polling import eventually
from tests.support import remote_kernels
from tests.support.remote_kernels import launcher_argv
from tests.support.wsclient import ChannelsClient
from tests.support.threads import started_pool



def write_spec(directory: str, name: str, argv: list[str], config: dict[str, Any]) -> None:
    """
    An SSH kernelspec with launcher config C{config}.
    """
    remote_kernels.write_spec(directory, name, argv, "ssh", config=config)



class SSHTestCase(GatewayTestCase):
    """
    Two SSH hosts and a gateway whose kernelspecs run kernels on them.
    """

    timeout = 180
    hosts = ("h1", "h2")
    extra_settings: dict[str, Any] = {}

    async def setUp(self) -> None:
        require_packages(*SSH_PACKAGES)
        workdir = tempfile.mkdtemp(prefix="egw-", dir="/tmp")
        self.ssh = SSHHosts(workdir, self.hosts)
        self.ssh.up()
        self.addCleanup(self.ssh.down)
        self.addCleanup(self._check_hosts_clean)
        self.ips = {h.name: h.ip for h in self.ssh.hosts}
        self.names = {h.ip: h.name for h in self.ssh.hosts}
        self.specs = os.path.abspath(self.mktemp())
        os.makedirs(self.specs)
        self.write_specs(",".join(h.ip for h in self.ssh.hosts))
        self.gateway_settings = {
            "kernelspec_path": self.specs,
            "response_ip": self.ssh.bridge_ip,
            "ssh_key_files": self.ssh.client_key_path,
            "ssh_known_hosts": self.ssh.known_hosts_path,
            "remote_user": self.ssh.user,
            "list_kernels": "true",
            "shutdown_wait": 3,
            "terminate_wait": 3,
            "poll_interval": 1,
            **self.extra_settings,
        }
        await super().setUp()

    def write_specs(self, hosts: str) -> None:
        """
        The kernelspecs in C{self.specs}, run on C{hosts} (comma-separated).
        """
        write_spec(self.specs, "remote", launcher_argv(), {"remote_hosts": hosts})
        write_spec(
            self.specs,
            "broken",
            [sys.executable, "/nonexistent/launch.py", "--kernel-id", "{kernel_id}"],
            {"remote_hosts": hosts},
        )
        write_spec(self.specs, "silent", ["sleep", "600"], {"remote_hosts": hosts})

    async def _check_hosts_clean(self) -> None:
        """
        No kernel process remains on any host (checked inside each
        namespace) once the gateway has stopped; one still exiting gets a
        few seconds to finish.
        """
        for name in self.hosts:
            try:
                await eventually(lambda: not self.ssh.pids(name), f"the processes on {name} to exit", timeout=10)
            except AssertionError:
                pass
            left = self.ssh.pids(name)
            described = [describe(pid) for pid in left]
            self.assertEqual(left, [], f"processes left on {name}: {described}")

    async def start_remote(self, name: str = "remote", env: dict[str, str] | None = None) -> dict[str, Any]:
        code, model = await self.gateway.request(
            "POST", "api/kernels", {"name": name, **({"env": env} if env else {})}
        )
        self.assertEqual(code, 201, model)
        return model

    async def hostname_of(self, kernel_id: str) -> str:
        client = await ChannelsClient.connect(self.gateway.url, kernel_id)
        result = await client.execute("import socket; print(socket.gethostname())")
        await client.close()
        return result["stdout"].strip()


class PlacementTests(SSHTestCase):
    async def test_round_robin(self) -> None:
        """
        Consecutive kernels land on different hosts (each kernel reports its
        own hostname), and run code there.
        """
        first = await self.start_remote()
        second = await self.start_remote()
        hosts = {first["placement"]["host"], second["placement"]["host"]}
        self.assertEqual(hosts, set(self.ips.values()))
        self.assertEqual(await self.hostname_of(first["id"]), self.names[first["placement"]["host"]])
        self.assertEqual(await self.hostname_of(second["id"]), self.names[second["placement"]["host"]])
        phases = [p["phase"] for p in first["phases"]]
        self.assertEqual(
            phases, ["queued", "submitted", "placed", "connection info received", "connected", "ready"]
        )

    async def test_interrupt_restart_shutdown(self) -> None:
        """
        A time.sleep(60) cell on a remote kernel is interrupted; the kernel
        restarts (new process, same id) and shuts down leaving nothing on the
        host.
        """
        model = await self.start_remote()
        host = self.names[model["placement"]["host"]]
        client = await ChannelsClient.connect(self.gateway.url, model["id"])
        await client.execute("x = 1")

        async def interrupt() -> None:
            code, _ = await self.gateway.request("POST", f"api/kernels/{model['id']}/interrupt")
            self.assertEqual(code, 204)

        reply = await client.interrupted_sleep(interrupt)
        self.assertEqual(reply["ename"], "KeyboardInterrupt")
        self.assertEqual((await client.execute("x + 1"))["result"]["text/plain"], "2")

        old_pid = model["placement"]["pid"]
        code, restarted = await self.gateway.request("POST", f"api/kernels/{model['id']}/restart")
        self.assertEqual(code, 200, restarted)
        self.assertNotEqual(restarted["placement"]["pid"], old_pid)
        result = await client.execute("'x' in dir()")
        self.assertEqual(result["result"]["text/plain"], "False")
        self.assertNotIn(old_pid, self.ssh.pids(self.names[restarted["placement"]["host"]]))
        await client.close()

        code, _ = await self.gateway.request("DELETE", f"api/kernels/{model['id']}")
        self.assertEqual(code, 204)
        self.assertEqual(self.ssh.pids(host), [])


class LeastConnectionTests(SSHTestCase):
    extra_settings = {"load_balancing_algorithm": "least-connection"}

    async def test_balances(self) -> None:
        """
        Least-connection puts each kernel on the host with the fewest, and
        reuses a host whose kernel went away.
        """
        a = await self.start_remote()
        b = await self.start_remote()
        self.assertNotEqual(a["placement"]["host"], b["placement"]["host"])
        code, _ = await self.gateway.request("DELETE", f"api/kernels/{a['id']}")
        self.assertEqual(code, 204)
        c = await self.start_remote()
        self.assertEqual(c["placement"]["host"], a["placement"]["host"])


class DeadHostTests(SSHTestCase):
    extra_settings = {"host_backoff": 1.0, "ssh_connect_timeout": 3}

    async def test_dead_host_skipped_then_retried(self) -> None:
        """
        With one host's sshd stopped, launches succeed on the other; once
        its back-off has passed and sshd is back, the host is used again.
        """
        self.ssh.stop_sshd("h1")
        models = [await self.start_remote() for _ in range(3)]
        self.assertEqual({m["placement"]["host"] for m in models}, {self.ips["h2"]})
        self.ssh.start_sshd("h1")
        deadline = reactor.seconds() + 20
        used = set()
        while self.ips["h1"] not in used:
            self.assertLess(reactor.seconds(), deadline, "h1 was never used again")
            await deferLater(reactor, 0.5, lambda: None)
            used.add((await self.start_remote())["placement"]["host"])

    async def test_no_host_reachable(self) -> None:
        """
        With every host down the launch fails fast with 503, naming the
        hosts, and nothing runs anywhere.
        """
        self.ssh.stop_sshd("h1")
        self.ssh.stop_sshd("h2")
        code, body = await self.gateway.request("POST", "api/kernels", {"name": "remote"})
        self.assertEqual(code, 503, body)
        self.assertIn(self.ips["h1"], body["message"])
        self.assertIn(self.ips["h2"], body["message"])
        self.assertIn("last phase: submitted", body["message"])
        self.assertEqual(self.gateway.manager.kernels, {})


def write_jeg_spec(directory: str, name: str, argv_prefix: list[str], script: str, host: str) -> None:
    """
    An Enterprise Gateway kernelspec (its process proxy and arguments)
    running its own C{script} on C{host}, declared as Enterprise Gateway's
    launcher (C{kernel_launcher}) so the gateway may take its version 1
    connection info.
    """
    spec_dir = os.path.join(directory, name)
    os.makedirs(spec_dir)
    with open(os.path.join(spec_dir, "kernel.json"), "w") as f:
        json.dump(
            {
                "display_name": "JEG distributed",
                "language": "python",
                "metadata": {
                    "process_proxy": {
                        "class_name": "enterprise_gateway.services.processproxies.distributed.DistributedProcessProxy",
                        "config": {"remote_hosts": host, "kernel_launcher": "enterprise-gateway"},
                    }
                },
                "argv": [*argv_prefix, *remote_kernels.jeg_launcher_argv(script)],
            },
            f,
        )


class FailedLaunchTests(SSHTestCase):
    extra_settings = {"launch_timeout": 8}

    async def test_enterprise_gateway_launcher_needs_v1_turned_on(self) -> None:
        """
        A kernelspec declaring Enterprise Gateway's launcher fails at once,
        naming the setting, while the operator has not turned version 1
        on (the default): its launcher could only be refused.
        """
        write_jeg_spec(self.specs, "jeg", [], "/nonexistent/launch_ipykernel.py", self.ips["h1"])
        code, body = await self.gateway.request("POST", "api/kernels", {"name": "jeg"})
        self.assertEqual(code, 500, body)
        self.assertIn("response_accept_v1", body["message"])
        self.assertEqual(self.ssh.pids("h1"), [])

    async def test_launcher_exits_early(self) -> None:
        """
        A launcher that dies at once fails the launch well before the
        timeout, quoting its log, and leaves nothing running.
        """
        started = reactor.seconds()
        code, body = await self.gateway.request("POST", "api/kernels", {"name": "broken"})
        self.assertEqual(code, 500, body)
        self.assertIn("exited before sending connection info", body["message"])
        self.assertIn("No such file", body["message"])
        self.assertLess(reactor.seconds() - started, 7)

    async def test_timeout(self) -> None:
        """
        A launcher that never reports times out with 504 naming the phase,
        and its process on the host is killed.
        """
        code, body = await self.gateway.request("POST", "api/kernels", {"name": "silent"})
        self.assertEqual(code, 504, body)
        self.assertIn("timed out after 8 s waiting for connection info", body["message"])
        self.assertIn("last phase: placed", body["message"])
        for name in self.hosts:
            self.assertEqual(self.ssh.pids(name), [])


class InjectionTests(SSHTestCase):
    async def test_hostile_values(self) -> None:
        """
        Quotes, semicolons, pipes, globs and spaces in KERNEL_USERNAME and
        other KERNEL_* values reach the kernel verbatim and run nothing on
        the host; values with $, backticks or newlines are refused.
        """
        marker = f"/tmp/egw-pwned-{os.getpid()}"
        hostile = {
            "KERNEL_USERNAME": f"x'; touch {marker}; echo '",
            "KERNEL_EXTRA": f'a" ; touch {marker} | touch {marker}2 & * > {marker}3',
            "KERNEL_SPACES": "  leading and trailing  ",
        }
        model = await self.start_remote(env=hostile)
        client = await ChannelsClient.connect(self.gateway.url, model["id"])
        result = await client.execute(
            "import os, json; print(json.dumps({k: os.environ.get(k) for k in "
            "['KERNEL_USERNAME', 'KERNEL_EXTRA', 'KERNEL_SPACES']}))"
        )
        self.assertEqual(json.loads(result["stdout"]), hostile)
        await client.close()
        for suffix in ("", "2", "3"):
            self.assertFalse(os.path.exists(marker + suffix))
        for value in ("$(touch /tmp/x)", "`id`", "a\nb"):
            code, body = await self.gateway.request(
                "POST", "api/kernels", {"name": "remote", "env": {"KERNEL_USERNAME": value}}
            )
            self.assertEqual(code, 400, body)


class LaunchSecretsTests(SSHTestCase):
    async def test_token_not_in_kernel_environment(self) -> None:
        """
        The launch token is in no part of the SSH kernel's environment, not
        even its initial one (C{/proc/self/environ}, which user code and
        anyone with the user's rights can read); the kernel's variables
        still arrive.
        """
        model = await self.start_remote(env={"KERNEL_MARKER": "m-42"})
        client = await ChannelsClient.connect(self.gateway.url, model["id"])
        result = await client.execute(
            "import json, os; raw = open('/proc/self/environ', 'rb').read().split(b'\\0'); "
            "print(json.dumps([sorted(e.split(b'=')[0].decode() for e in raw if e), os.environ.get('KERNEL_MARKER')]))"
        )
        await client.close()
        names, marker = json.loads(result["stdout"])
        self.assertNotIn("EG_LAUNCH_TOKEN", names)
        self.assertIn("KERNEL_ID", names)
        self.assertEqual(marker, "m-42")


class EnterpriseGatewayLauncherTests(SSHTestCase):
    extra_settings = {"response_accept_v1": "true"}

    async def test_unmodified_jeg_launcher(self) -> None:
        """
        Enterprise Gateway's own launch_ipykernel.py, unmodified from its
        PyPI source distribution, started by egateway on an SSH host from an
        Enterprise Gateway kernelspec (declared as such, with version 1
        turned on), becomes a working kernel that can be interrupted and
        shut down, leaving nothing on the host.
        """
        from tests.test_jeg_launcher_compat import jeg_launcher

        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        script = await jeg_launcher(directory)
        write_jeg_spec(self.specs, "jeg_distributed", [], script, self.ips["h2"])
        model = await self.start_remote("jeg_distributed")
        self.assertEqual(model["launcher"], "ssh")
        self.assertEqual(model["placement"]["host"], self.ips["h2"])
        self.assertIn("payload v1", model["phases"][3]["detail"])
        client = await ChannelsClient.connect(self.gateway.url, model["id"])
        self.assertEqual(await self.hostname_of(model["id"]), "h2")

        async def interrupt() -> None:
            code, _ = await self.gateway.request("POST", f"api/kernels/{model['id']}/interrupt")
            self.assertEqual(code, 204)

        reply = await client.interrupted_sleep(interrupt)
        self.assertEqual(reply["ename"], "KeyboardInterrupt")
        await client.close()
        code, _ = await self.gateway.request("DELETE", f"api/kernels/{model['id']}")
        self.assertEqual(code, 204)
        # JEG's launcher runs its comm listener as a separate process that
        # notices the kernel's end on its own: bounded wait.
        await eventually(lambda: not self.ssh.pids("h2"), "the JEG kernel's processes on h2 to exit", timeout=10)

    async def test_v1_only_from_the_kernels_host(self) -> None:
        """
        While an Enterprise Gateway kernel launches on h2, version 1
        connection info forged from another host (h1) or from the
        gateway's own host is refused; the genuine launcher's, from h2,
        then delivers.
        """
        from tests.test_jeg_launcher_compat import jeg_launcher

        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        script = await jeg_launcher(directory)
        gate = Gate(directory)
        write_jeg_spec(self.specs, "jeg_gated", gate.argv([]), script, self.ips["h2"])
        starting = Deferred.fromCoroutine(self.gateway.request("POST", "api/kernels", {"name": "jeg_gated"}))
        kernel, listener = await pending_launch(self.gateway)
        forged = forged_v1(kernel.id, listener.public_key)
        for run in (lambda argv: self.ssh.run("h1", argv), run_here):
            self.assertEqual(await send_from(run, listener.response_address, forged), "ERROR refused")
        await gate.open()
        code, model = await starting
        self.assertEqual(code, 201, model)
        self.assertIn("payload v1", model["phases"][3]["detail"])
        self.assertEqual(await self.hostname_of(model["id"]), "h2")
        code, _ = await self.gateway.request("DELETE", f"api/kernels/{model['id']}")
        self.assertEqual(code, 204)
        await eventually(lambda: not self.ssh.pids("h2"), "the JEG kernel's processes on h2 to exit", timeout=10)


class ForgedHandshakeTests(SSHTestCase):
    """
    Forged connection info during a pending launch of egateway's launcher,
    even with the operator's response_accept_v1 on.
    """

    extra_settings = {"response_accept_v1": "true"}

    async def test_forged_v1_refused(self) -> None:
        """
        While a kernel launches on h1, version 1 connection info forged
        from its kernel id and the public key (what any user of h1 sees)
        is refused, sent from h1 itself or from h2; the genuine launcher's
        version 2 payload then delivers, and the user's code runs in the
        genuine kernel.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        gate = Gate(directory)
        write_spec(self.specs, "gated", gate.argv(launcher_argv()), {"remote_hosts": self.ips["h1"]})
        starting = Deferred.fromCoroutine(self.gateway.request("POST", "api/kernels", {"name": "gated"}))
        kernel, listener = await pending_launch(self.gateway)
        forged = forged_v1(kernel.id, listener.public_key)
        for host in ("h1", "h2"):
            answer = await send_from(lambda argv: self.ssh.run(host, argv), listener.response_address, forged)
            self.assertEqual(answer, "ERROR refused", host)
        await gate.open()
        code, model = await starting
        self.assertEqual(code, 201, model)
        self.assertIn("payload v2", model["phases"][3]["detail"])
        self.assertEqual(await self.hostname_of(model["id"]), "h1")


FORGE_PGID = r"""
import os, runpy, sys
sys.argv = sys.argv[1:]
launch = runpy.run_path(sys.argv[0])["launch"]
real = launch.__globals__["encrypt_payload"]
victim = int(os.environ["VICTIM_PGID"])
launch.__globals__["encrypt_payload"] = lambda info, *rest: real(dict(info, pid=victim, pgid=victim), *rest)
sys.exit(launch.__globals__["main"]())
"""
"""
egateway's launcher, made to report another process group's id as its
kernel's pid and pgid (as a forged payload would).
"""


class ForgedPgidTests(SSHTestCase):
    async def test_payload_pgid_never_signalled(self) -> None:
        """
        A launcher reporting an unrelated process group as its kernel's
        does not get that group signalled: the kernel's placement is what
        the gateway started, and shutting the kernel down (TERM, KILL,
        reaping its group) leaves the other group running.
        """
        victim = self.ssh.popen("h1", ["sleep", "600"], start_new_session=True)
        self.addCleanup(victim.wait)
        self.addCleanup(victim.kill)
        remote_kernels.write_spec(
            self.specs,
            "forging",
            [sys.executable, "-c", FORGE_PGID, *launcher_argv()[1:]],
            "ssh",
            config={"remote_hosts": self.ips["h1"]},
            env={"VICTIM_PGID": str(victim.pid)},
        )
        model = await self.start_remote("forging")
        placement = self.gateway.manager.kernels[model["id"]].process.placement
        self.assertEqual(model["placement"]["pid"], placement.pid)
        self.assertNotIn(victim.pid, (placement.pid, placement.pgid))
        self.assertEqual(placement.pgid, placement.pid)
        code, _ = await self.gateway.request("DELETE", f"api/kernels/{model['id']}")
        self.assertEqual(code, 204)
        self.assertIsNone(victim.poll(), "the gateway signalled the process group the payload named")
        self.assertFalse(os.path.exists(f"/proc/{model['placement']['pid']}"))


class SSHLauncherContract(LauncherContract, TestCase):
    """
    The SSH launcher against the launcher contract, on real sshd hosts.
    """

    timeout = 180

    async def setUp(self) -> None:
        require_packages(*SSH_PACKAGES)
        workdir = tempfile.mkdtemp(prefix="egw-", dir="/tmp")
        self.ssh = SSHHosts(workdir, ("h1", "h2"))
        self.ssh.up()
        self.addCleanup(self.ssh.down)
        self.names = {h.ip: h.name for h in self.ssh.hosts}
        hosts = ",".join(h.ip for h in self.ssh.hosts)
        from egateway.config import build_config
        from egateway.kernels.specs import KernelSpec

        self.config = build_config(
            {},
            {},
            {
                "response-ip": self.ssh.bridge_ip,
                "response-port": "0",
                "ssh-key-files": self.ssh.client_key_path,
                "ssh-known-hosts": self.ssh.known_hosts_path,
                "remote-user": self.ssh.user,
                "remote-hosts": hosts,
                "poll-interval": "1",
            },
        )
        self.services: dict[str, Any] = {}
        self.addCleanup(self._stop_listener)
        self.working = KernelSpec.from_json(
            "working", "/nonexistent", {"argv": launcher_argv(), "language": "python", "metadata": {"egateway": {"launcher": "ssh"}}}
        )
        self.broken = KernelSpec.from_json(
            "broken",
            "/nonexistent",
            {"argv": [sys.executable, "/nonexistent/x.py"], "language": "python", "metadata": {"egateway": {"launcher": "ssh"}}},
        )

    async def _stop_listener(self) -> None:
        listener = self.services.get("response")
        if listener is not None and listener.running:
            await listener.stopService()
        for launcher in getattr(self, "_launchers", []):
            launcher.stop()

    async def make_launcher(self) -> Any:
        from egateway.clusters.interface import LauncherContext, LaunchSettings
        from egateway.clusters.ssh import SSHLauncher

        launcher = SSHLauncher(
            LauncherContext(reactor=reactor, runtime_dir="", ports=None, section=self.config.ssh,
                            shared=LaunchSettings.from_config(self.config), services=self.services, threadpool=started_pool(self))
        )
        self._launchers = getattr(self, "_launchers", []) + [launcher]
        return launcher

    def make_request(self, kernel_id: str, spec_name: str = "working"):
        return request_for(kernel_id, self.working, timeout=30)

    def broken_request(self, kernel_id: str):
        return request_for(kernel_id, self.broken, timeout=30)

    async def leftovers(self, process: Any) -> list:
        return self.ssh.pids(self.names[process.placement.host])

    async def placed_leftovers(self, phases: list) -> list:
        return [pid for name in ("h1", "h2") for pid in self.ssh.pids(name)]
