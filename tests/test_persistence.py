"""
Kernels outlive the gateway: restarts (graceful and kill -9) restore every
kernel with its state, report the ones that died meanwhile, and the store
being down is survivable.
"""

from __future__ import annotations

import os
import signal
import tempfile

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.trial.unittest import TestCase

from tests.fixtures import RedisServer
from tests.fixtures.system import REDIS_PACKAGES, require_packages
from tests.support.daemon import processes_mentioning, start_gateway
from tests.support.gateway import InProcessGateway, pid_alive
from tests.support.wsclient import ChannelsClient


async def set_x(url: str, kernel_id: str, value: int) -> None:
    client = await ChannelsClient.connect(url, kernel_id)
    result = await client.execute(f"x = {value}")
    assert result["reply"]["status"] == "ok", result
    await client.close()


async def get_x(url: str, kernel_id: str, token: str | None = None) -> str:
    client = await ChannelsClient.connect(url, kernel_id, token=token)
    result = await client.execute("x")
    await client.close()
    return result["result"]["text/plain"] if result["result"] else repr(result["error"])


class GracefulRestartTests(TestCase):
    timeout = 120

    def gateway(self, data_dir: str, **flags: str) -> InProcessGateway:
        return InProcessGateway(persistence="true", data_dir=data_dir, list_kernels="true", **flags)

    async def test_kernels_survive_a_restart(self) -> None:
        """
        With on_stop=keep, a gateway that stops leaves its kernels running; the
        next one restores them with the same ids and their state.
        """
        data_dir = os.path.abspath(self.mktemp())
        first = await self.gateway(data_dir).start()
        models = await gatherResults([ensureDeferred(first.start_kernel()) for _ in range(3)])
        for model in models:
            await set_x(first.url, model["id"], 42)
        await first.stop()
        pids = [m["placement"]["pid"] for m in models]
        self.assertTrue(all(pid_alive(pid) for pid in pids), "kernels stopped with the gateway")

        second = self.gateway(data_dir, on_stop="shutdown")
        await second.start()
        self.addCleanup(self._stop_and_check, second, pids)
        listed = await self._wait_listed(second, 3)
        self.assertEqual({k["id"] for k in listed}, {m["id"] for m in models})
        for model in models:
            self.assertEqual(await get_x(second.url, model["id"]), "42")
        code, restored = await second.request("GET", f"api/kernels/{models[0]['id']}")
        self.assertEqual(restored["placement"]["pid"], models[0]["placement"]["pid"])
        self.assertEqual(restored["state"], "running")

    async def test_kernel_that_died_while_away(self) -> None:
        """
        A kernel that died while no gateway ran is listed as dead with the
        reason; its files are cleaned up; the others are restored.
        """
        data_dir = os.path.abspath(self.mktemp())
        first = await self.gateway(data_dir).start()
        alive = await first.start_kernel()
        doomed = await first.start_kernel()
        await first.stop()
        os.kill(doomed["placement"]["pid"], signal.SIGKILL)
        second = self.gateway(data_dir, on_stop="shutdown")
        await second.start()
        self.addCleanup(self._stop_and_check, second, [alive["placement"]["pid"], doomed["placement"]["pid"]])
        listed = {k["id"]: k for k in await self._wait_listed(second, 2)}
        for _ in range(100):
            listed = {k["id"]: k for k in (await second.request("GET", "api/kernels"))[1]}
            if listed[doomed["id"]]["state"] != "launching":
                break
            await ensureDeferred(_sleep(0.1))
        self.assertEqual(listed[doomed["id"]]["execution_state"], "dead")
        self.assertIn("while the gateway was away", listed[doomed["id"]]["reason"])
        self.assertEqual(listed[alive["id"]]["state"], "running")
        runtime = os.path.join(data_dir, "runtime")
        self.assertFalse(any(doomed["id"] in name for name in os.listdir(runtime)))
        code, _ = await second.request("DELETE", f"api/kernels/{doomed['id']}")
        self.assertEqual(code, 204)

    async def test_sessions_survive(self) -> None:
        """
        Sessions are restored with their kernels.
        """
        data_dir = os.path.abspath(self.mktemp())
        first = await self.gateway(data_dir).start()
        code, session = await first.request("POST", "api/sessions", {"path": "a.ipynb", "type": "notebook"})
        self.assertEqual(code, 201)
        pid = session["kernel"]["placement"]["pid"]
        await first.stop()
        second = self.gateway(data_dir, on_stop="shutdown")
        await second.start()
        self.addCleanup(self._stop_and_check, second, [pid])
        await self._wait_listed(second, 1)
        code, again = await second.request("GET", f"api/sessions/{session['id']}")
        self.assertEqual(code, 200, again)
        self.assertEqual((again["path"], again["kernel"]["id"]), ("a.ipynb", session["kernel"]["id"]))

    async def _wait_listed(self, gateway: InProcessGateway, count: int) -> list:
        for _ in range(100):
            code, listed = await gateway.request("GET", "api/kernels")
            if code == 200 and len(listed) == count and all(k["state"] != "launching" for k in listed):
                return listed
            await ensureDeferred(_sleep(0.1))
        self.fail(f"expected {count} restored kernels, got {listed}")

    async def _stop_and_check(self, gateway: InProcessGateway, pids: list[int]) -> None:
        await gateway.stop()
        self.assertEqual([pid for pid in pids if pid_alive(pid)], [])


def kernel_pids(pids: list[int]) -> list[int]:
    """
    The kernels' processes among C{pids} (their environment names a
    kernel), not the gateway's passing commands on the host (liveness
    checks, the reconciler's inventory).
    """
    found = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if any(entry.startswith(b"KERNEL_ID=") for entry in f.read().split(b"\0")):
                    found.append(pid)
        except OSError:
            continue
    return sorted(found)


async def _sleep(seconds: float) -> None:
    from twisted.internet.task import deferLater

    await deferLater(reactor, seconds, lambda: None)


class KillNineTests(TestCase):
    timeout = 240

    async def test_kill_9_and_restart(self) -> None:
        """
        A daemon with 10 local kernels and 4 on SSH hosts, each holding
        x = 42, is killed with SIGKILL and started again on the same data
        directory: all 14 are listed with the same ids, x is still 42 through
        a new WebSocket, and no kernel process is duplicated or leaked.
        """
        import json
        import sys

        from tests.fixtures import SSHHosts
        from tests.fixtures.system import SSH_PACKAGES
        from tests.support.remote_kernels import launcher_argv, write_spec

        require_packages(*SSH_PACKAGES)
        hosts = SSHHosts(tempfile.mkdtemp(prefix="egw-", dir="/tmp"), ("h1", "h2"))
        hosts.up()
        self.addCleanup(hosts.down)
        self.addCleanup(lambda: self.assertEqual([p for h in ("h1", "h2") for p in hosts.pids(h)], []))
        specs = os.path.abspath(self.mktemp())
        os.makedirs(specs)
        write_spec(specs, "remote", launcher_argv(), "ssh", {"remote_hosts": ",".join(h.ip for h in hosts.hosts)})
        flags = {
            "list-kernels": "true",
            "persistence": "true",
            "kernelspec-path": specs,
            "response-ip": hosts.bridge_ip,
            "ssh-key-files": hosts.client_key_path,
            "ssh-known-hosts": hosts.known_hosts_path,
            "remote-user": hosts.user,
        }
        first = await start_gateway(self, flags={**flags, "on-stop": "keep"})
        local = [first.api.call("POST", "api/kernels", {}, expect=201) for _ in range(10)]
        remote = [first.api.call("POST", "api/kernels", {"name": "remote"}, expect=201) for _ in range(4)]
        models = await gatherResults([ensureDeferred(d) for d in local + remote])
        await gatherResults([ensureDeferred(set_x(first.url, m["id"], 42)) for m in models])
        before_local = sorted(pid for pid, _ in first.kernel_processes())
        before_remote = {h: kernel_pids(hosts.pids(h)) for h in ("h1", "h2")}
        self.assertEqual(len(before_local), 10)
        self.assertEqual(sum(len(p) for p in before_remote.values()), 4 * 2)  # kernel + comm listener
        first.process.send_signal(signal.SIGKILL)
        await first.process.when_ended()
        # The test judges this exit itself: its kernels must stay.
        first.process.report = "killed"
        await first.api.close()

        second = await start_gateway(
            self, flags={**flags, "on-stop": "shutdown", "data-dir": first.data_dir}
        )
        second.data_dir = first.data_dir
        for _ in range(200):
            listed = await second.api.call("GET", "api/kernels")
            if len(listed) == 14 and all(k["state"] == "running" for k in listed):
                break
            await _sleep(0.1)
        self.assertEqual({k["id"] for k in listed}, {m["id"] for m in models}, json.dumps(listed)[:2000])
        values = await gatherResults([ensureDeferred(get_x(second.url, m["id"])) for m in models])
        self.assertEqual(values, ["42"] * 14)
        self.assertEqual(sorted(pid for pid, _ in second.kernel_processes()), before_local)
        self.assertEqual({h: kernel_pids(hosts.pids(h)) for h in ("h1", "h2")}, before_remote)
        for model in models:
            await second.api.call("DELETE", f"api/kernels/{model['id']}", expect=204)
        self.assertEqual(second.kernel_processes(), [])


def kill_processes_mentioning(marker: str) -> None:
    """
    Kill what a failed test left running that names C{marker}.
    """
    for pid, _ in processes_mentioning(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


async def restart_mid_cell(case: TestCase, spec: str = "", flags: dict[str, str] | None = None) -> None:
    """
    Restart a gateway (on_stop = "keep") while a kernel of kernelspec
    C{spec} (default: the default one) runs a cell that waits on a file:
    the next gateway serves the kernel again before the cell ends, running
    and busy, and answering on control through the client's session;
    released, the cell's last output, execute_reply and idle reach the
    reconnected client once each.

    @param flags: more gateway settings (both gateways').
    """
    from tests.test_sharing import assert_answers_while_gated, assert_cell_ends_once, start_gated_cell

    # Outside the first gateway's directory, whose stop kills every process
    # naming it.
    data_dir = os.path.abspath(case.mktemp())
    os.makedirs(data_dir)
    case.addCleanup(kill_processes_mentioning, data_dir + os.sep)
    flags = {"list-kernels": "true", "persistence": "true", "on-stop": "keep", "data-dir": data_dir, **(flags or {})}
    first = await start_gateway(case, flags=flags)
    model = await first.api.call("POST", "api/kernels", {"name": spec} if spec else {}, expect=201)
    kernel_id = model["id"]
    client = await ChannelsClient.connect(first.url, kernel_id, session_id="busy-session")
    msg_id, gate = await start_gated_cell(case, client)
    mine = lambda m: m.get("parent_header", {}).get("msg_id") == msg_id  # noqa: E731
    report = await first.stop()
    case.assertTrue(report.graceful, report.describe())
    await client.closed
    case.assertTrue(pid_alive(model["placement"]["pid"]))

    second = await start_gateway(case, flags={**flags, "on-stop": "shutdown"})
    # A lookup and a listing wait (10 s at most) until the store's kernels
    # are restored.
    restored = await second.api.call("GET", f"api/kernels/{kernel_id}")
    case.assertEqual((restored["state"], restored["execution_state"]), ("running", "busy"), restored)
    listed = await second.api.call("GET", "api/kernels")
    case.assertEqual(
        [(k["id"], k["state"], k["execution_state"]) for k in listed], [(kernel_id, "running", "busy")], listed
    )
    again = await ChannelsClient.connect(second.url, kernel_id, session_id="busy-session")
    await assert_answers_while_gated(case, again, gate, mine)

    open(gate, "w").close()
    await assert_cell_ends_once(case, client.messages, again, mine)
    await again.close()
    await second.api.call("DELETE", f"api/kernels/{kernel_id}", expect=204)
    case.assertFalse(pid_alive(model["placement"]["pid"]))


class BusyRestartTests(TestCase):
    timeout = 120

    async def test_restart_during_a_cell(self) -> None:
        """
        A gateway restarted while a kernel runs a cell serves the kernel
        again before the cell ends (see L{restart_mid_cell}).
        """
        await restart_mid_cell(self)


class RedisOutageTests(TestCase):
    timeout = 120

    async def setUp(self) -> None:
        require_packages(*REDIS_PACKAGES)
        self.redis = RedisServer(tempfile.mkdtemp(prefix="egw-", dir="/tmp"))
        self.redis.up()
        self.addCleanup(self.redis.down)

    async def test_outage_is_survivable(self) -> None:
        """
        With Redis stopped, starting a kernel fails clearly (503) while a
        running kernel keeps working; once Redis is back, starts work again
        without restarting the gateway.
        """
        from egateway.store.crypto import SecretBox

        gateway = InProcessGateway(
            persistence="true",
            on_stop="shutdown",
            data_dir=os.path.abspath(self.mktemp()),
            store_url=self.redis.url,
            store_key=SecretBox.generate_key(),
        )
        await gateway.start()
        self.addCleanup(self._remove_all, gateway)
        for _ in range(100):
            if gateway.manager.persistence.store.__class__.__name__ == "RedisStore":
                break
            await _sleep(0.05)
        model = await gateway.start_kernel()
        await set_x(gateway.url, model["id"], 42)
        self.redis.stop()
        code, body = await gateway.request("POST", "api/kernels", {})
        self.assertEqual(code, 503, body)
        self.assertIn("store", body["message"])
        self.assertEqual(await get_x(gateway.url, model["id"]), "42")
        self.redis.start()
        for _ in range(100):
            code, body = await gateway.request("POST", "api/kernels", {})
            if code == 201:
                gateway.pids.add(body["placement"]["pid"])
                break
            await _sleep(0.2)
        self.assertEqual(code, 201, body)

    async def _remove_all(self, gateway: InProcessGateway) -> None:
        """
        With a shared store kernels outlive a gateway's stop: delete them,
        then check none is left.
        """
        for kernel_id in list(gateway.manager.kernels):
            await gateway.request("DELETE", f"api/kernels/{kernel_id}")
        await gateway.stop()
        self.assertEqual([pid for pid in gateway.pids if pid_alive(pid)], [])


class DefaultPersistenceTests(TestCase):
    timeout = 120

    async def test_readme_command_persists(self) -> None:
        """
        With no configuration at all (the README's run command), a kernel
        outlives a graceful restart: the store is SQLite in the default data
        directory.
        """
        home = os.path.abspath(self.mktemp())
        os.makedirs(home)
        env = {"HOME": home, "XDG_DATA_HOME": os.path.join(home, ".local", "share")}
        flags = {"data-dir": "", "on-stop": "keep", "list-kernels": "true"}
        first = await start_gateway(self, flags=flags, env=env)
        model = await first.api.call("POST", "api/kernels", {}, expect=201)
        await set_x(first.url, model["id"], 42)
        report = await first.stop()
        self.assertTrue(report.graceful, report.describe())
        self.assertTrue(pid_alive(model["placement"]["pid"]))
        self.assertTrue(os.path.exists(os.path.join(home, ".local", "share", "egateway", "kernels.sqlite3")))
        second = await start_gateway(self, flags={**flags, "on-stop": "shutdown"}, env=env)
        for _ in range(100):
            listed = await second.api.call("GET", "api/kernels")
            if listed and listed[0]["state"] == "running":
                break
            await _sleep(0.1)
        self.assertEqual([k["id"] for k in listed], [model["id"]])
        self.assertEqual(await get_x(second.url, model["id"]), "42")
        await second.api.call("DELETE", f"api/kernels/{model['id']}", expect=204)
        self.assertFalse(pid_alive(model["placement"]["pid"]))
