"""
Active/active: two gateway daemons share one real Redis and serve each
other's kernels, coordinate restarts and shutdowns with leases, and keep a
client's output across a drop.
"""

from __future__ import annotations

import os
import signal
import tempfile
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from egateway.store.crypto import SecretBox
from tests.fixtures import RedisServer
from tests.fixtures.system import REDIS_PACKAGES, require_packages
from tests.support.daemon import processes_mentioning, start_gateway
from tests.support.wsclient import ChannelsClient

_log = Logger()


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


def gateway_statuses(client: ChannelsClient) -> list[dict[str, Any]]:
    """
    The contents of the statuses the gateway itself sent C{client}.
    """
    return [
        m["content"]
        for m in client.messages
        if m["header"]["session"].startswith("egateway-") and m["msg_type"] == "status"
    ]



async def start_gated_cell(case: TestCase, client: ChannelsClient) -> tuple[str, str]:
    """
    Start a cell that prints C{waiting}, then runs until a file appears,
    then prints C{released}; return once it runs, with its msg_id and the
    file's path.
    """
    gate = os.path.abspath(case.mktemp())
    code = (
        "import os, time\nprint('waiting', flush=True)\n"
        f"while not os.path.exists({gate!r}): time.sleep(0.01)\nprint('released', flush=True)\n"
    )
    msg_id = client.request_execute(code)
    await client.wait_for(
        lambda m: m.get("parent_header", {}).get("msg_id") == msg_id and m.get("msg_type") == "stream",
        timeout=30,
    )
    return msg_id, gate


async def assert_answers_while_gated(case: TestCase, client: ChannelsClient, gate: str, mine: Any) -> None:
    """
    The kernel answers C{client}'s C{kernel_info_request} on control while
    the gated cell still runs (nothing of its end has come yet).
    """
    asked = client.send("kernel_info_request", {}, channel="control")
    reply = await client.wait_for(
        lambda m: m.get("parent_header", {}).get("msg_id") == asked and m.get("msg_type") == "kernel_info_reply",
        timeout=15,
    )
    case.assertEqual(reply["content"]["status"], "ok")
    case.assertFalse(os.path.exists(gate))
    case.assertEqual([m for m in client.messages if mine(m) and m.get("msg_type") == "execute_reply"], [])


async def assert_cell_ends_once(
    case: TestCase, before: list[dict[str, Any]], client: ChannelsClient, mine: Any
) -> None:
    """
    The gated cell, released, ends on C{client}: with what the connection
    before got, its output is C{waiting} then C{released}, and its
    execute_reply and its idle come once each.
    """
    idle = lambda m: mine(m) and m.get("msg_type") == "status" and m["content"]["execution_state"] == "idle"  # noqa: E731
    await client.wait_for(idle, timeout=30)
    await client.wait_for(lambda m: mine(m) and m.get("msg_type") == "execute_reply", timeout=10)
    messages = before + client.messages
    text = "".join(m["content"]["text"] for m in messages if mine(m) and m.get("msg_type") == "stream")
    case.assertEqual(text, "waiting\nreleased\n")
    replies = [m for m in messages if mine(m) and m.get("msg_type") == "execute_reply"]
    case.assertEqual([r["content"]["status"] for r in replies], ["ok"])
    case.assertEqual(len([m for m in messages if idle(m)]), 1)


MOVING_SESSION = "moving-session-" + "0123456789" * 8
"""
Longer than the 64 characters the channels route once cut session ids to
(while the WebSocket kept them whole), so a resume on another gateway looked
for another session's journal.
"""

class ActiveActiveTests(TestCase):
    timeout = 180

    async def setUp(self) -> None:
        require_packages(*REDIS_PACKAGES)
        self.redis = RedisServer(tempfile.mkdtemp(prefix="egw-", dir="/tmp"))
        self.redis.up()
        self.addCleanup(self.redis.down)
        self.flags = {
            "list-kernels": "true",
            "persistence": "true",
            "store-url": self.redis.url,
            "poll-interval": "0.5",
            "shutdown-wait": "2",
            "terminate-wait": "2",
        }
        self.env = {"EG_STORE_KEY": SecretBox.generate_key()}
        self.a = await start_gateway(self, flags=self.flags, env=self.env)
        self.b = await start_gateway(self, flags=self.flags, env=self.env)
        self.addCleanup(self._reap)

    async def _reap(self) -> None:
        """
        Kernels outlive gateways with a shared store: remove what is left
        through whichever gateway still runs, then check nothing remains.
        """
        for gateway in (self.b, self.a):
            if gateway.process.ended:
                continue
            for model in await gateway.api.call("GET", "api/kernels"):
                await gateway.api.request("DELETE", f"api/kernels/{model['id']}")
            break
        for gateway in (self.a, self.b):
            self.assertEqual(processes_mentioning(gateway.data_dir + "/"), [])

    async def test_kernel_from_a_runs_through_b(self) -> None:
        """
        A kernel created through A is listed by B and runs code through B;
        shut down through B, it is gone from A too.
        """
        model = await self.a.api.call("POST", "api/kernels", {}, expect=201)
        listed = [k["id"] for k in await self.b.api.call("GET", "api/kernels")]
        self.assertIn(model["id"], listed)
        through_b = await ChannelsClient.connect(self.b.url, model["id"])
        result = await through_b.execute("x = 6 * 7; x")
        self.assertEqual(result["result"]["text/plain"], "42")
        through_a = await ChannelsClient.connect(self.a.url, model["id"])
        self.assertEqual((await through_a.execute("x"))["result"]["text/plain"], "42")
        await self.b.api.call("DELETE", f"api/kernels/{model['id']}", expect=204)
        through_a.closed.addTimeout(20, reactor)
        await through_a.closed
        for _ in range(100):
            if model["id"] not in [k["id"] for k in await self.a.api.call("GET", "api/kernels")]:
                break
            await sleep(0.1)
        else:
            self.fail("A still lists the kernel B shut down")
        await through_b.close()

    async def test_restart_once(self) -> None:
        """
        A kernel killed while both gateways watch it is restarted exactly
        once, and both end up connected to the new process.
        """
        model = await self.a.api.call("POST", "api/kernels", {}, expect=201)
        client_a = await ChannelsClient.connect(self.a.url, model["id"])
        client_b = await ChannelsClient.connect(self.b.url, model["id"])
        await client_a.execute("1")
        await client_b.execute("1")
        import os

        os.kill(model["placement"]["pid"], signal.SIGKILL)
        for _ in range(200):
            models = {g: (await g.api.call("GET", f"api/kernels/{model['id']}")) for g in (self.a, self.b)}
            if all(m["restarts"] == 1 and m["state"] == "running" for m in models.values()):
                pids = {m["placement"]["pid"] for m in models.values()}
                if len(pids) == 1:
                    break
            await sleep(0.1)
        else:
            self.fail(f"not restarted once on both: {models}")
        self.assertNotEqual(pids.pop(), model["placement"]["pid"])
        self.assertEqual((await client_a.execute("2 + 2", timeout=30))["result"]["text/plain"], "4")
        self.assertEqual((await client_b.execute("3 + 3", timeout=30))["result"]["text/plain"], "6")
        for client in (client_a, client_b):
            # Both gateways' clients hear of the death, as Jupyter clients do, then that it is ready.
            told = gateway_statuses(client)
            self.assertEqual([c["execution_state"] for c in told], ["restarting", "idle"], told)
            self.assertIn("killed by signal 9", told[0]["reason"])
        await sleep(2)
        record = await self.b.api.call("GET", f"api/kernels/{model['id']}")
        self.assertEqual(record["restarts"], 1)
        await client_a.close()
        await client_b.close()

    async def test_restart_through_b_seen_on_a(self) -> None:
        """
        A restart requested through B reaches A's client as a requested
        one: 'starting' then 'idle', never 'restarting' (which Jupyter
        clients read as a death); the client keeps working on the new
        kernel.
        """
        model = await self.a.api.call("POST", "api/kernels", {}, expect=201)
        client_a = await ChannelsClient.connect(self.a.url, model["id"])
        await client_a.execute("x = 1")
        restarted = await self.b.api.call("POST", f"api/kernels/{model['id']}/restart")
        await client_a.wait_for(
            lambda m: m["header"]["session"].startswith("egateway-") and m["content"]["execution_state"] == "idle",
            timeout=30,
        )
        told = gateway_statuses(client_a)
        self.assertEqual([c["execution_state"] for c in told], ["starting", "idle"], told)
        self.assertEqual((await client_a.execute("'x' in dir()", timeout=30))["result"]["text/plain"], "False")
        on_a = await self.a.api.call("GET", f"api/kernels/{model['id']}")
        self.assertEqual(on_a["placement"]["pid"], restarted["placement"]["pid"])
        await client_a.close()

    async def kill_a(self) -> None:
        """
        Gateway A dies (SIGKILL): no graceful stop, no lease released.
        """
        self.a.process.send_signal(signal.SIGKILL)
        await self.a.process.when_ended()
        self.a.process.report = "killed by the test"
        await self.a.api.close()

    async def rest_on_b(
        self, client: ChannelsClient, kernel_id: str, session_id: str, mine: Any, timeout: float
    ) -> str:
        """
        Resume C{client}'s session on B after the last message it got, wait
        for the cell to end, and return all the cell's stream text the two
        connections received, in order.
        """
        resumed = await ChannelsClient.connect(
            self.b.url, kernel_id, session_id=session_id, resume_after=client.last_seq
        )
        await resumed.wait_for(
            lambda m: mine(m) and m.get("msg_type") == "status" and m["content"]["execution_state"] == "idle",
            timeout=timeout,
        )
        await resumed.close()
        return "".join(
            m["content"]["text"]
            for m in client.messages + resumed.messages
            if mine(m) and m.get("msg_type") == "stream"
        )

    async def test_stream_survives_a_dying_and_a_drop(self) -> None:
        """
        A is killed while B streams 10,000 numbered lines to a client, which
        drops and reconnects to B with the same session id: every line
        arrives exactly once, in order.
        """
        model = await self.a.api.call("POST", "api/kernels", {}, expect=201)
        warm = await ChannelsClient.connect(self.b.url, model["id"])
        await warm.execute("import time")
        await warm.close()
        client = await ChannelsClient.connect(self.b.url, model["id"], session_id="stream-session")
        code = "for i in range(10000):\n    print(f'line {i:05d}', flush=(i % 50 == 0))\n    if i % 500 == 0: time.sleep(0.05)\n"
        msg_id = client.request_execute(code)
        mine = lambda m: m.get("parent_header", {}).get("msg_id") == msg_id  # noqa: E731
        await client.wait_for(lambda m: mine(m) and m.get("msg_type") == "stream", timeout=30)
        await self.kill_a()
        await sleep(0.3)
        client.drop()
        await client.closed
        text = await self.rest_on_b(client, model["id"], "stream-session", mine, timeout=60)
        self.assertEqual(text.splitlines(), [f"line {i:05d}" for i in range(10000)])

    async def test_resume_on_another_gateway(self) -> None:
        """
        A client that drops off A in the middle of output and resumes its
        session on B (A meanwhile killed) gets the rest of the output, once,
        in order, from what A journaled in the shared store.
        """
        model = await self.a.api.call("POST", "api/kernels", {}, expect=201)
        client = await ChannelsClient.connect(self.a.url, model["id"], session_id=MOVING_SESSION)
        code = "import time\nfor i in range(3000):\n    print(f'line {i:05d}', flush=(i % 100 == 0))\n    if i % 500 == 0: time.sleep(0.05)\n"
        msg_id = client.request_execute(code)
        mine = lambda m: m.get("parent_header", {}).get("msg_id") == msg_id  # noqa: E731
        await client.wait_for(lambda m: mine(m) and m.get("msg_type") == "stream", timeout=30)
        client.drop()
        await client.closed
        # Let A journal the rest of the run (it keeps the parked session).
        watcher = await ChannelsClient.connect(self.a.url, model["id"])
        await watcher.wait_for(
            lambda m: mine(m) and m.get("msg_type") == "status" and m["content"]["execution_state"] == "idle",
            timeout=60,
        )
        await watcher.close()
        await sleep(1)
        await self.kill_a()
        text = await self.rest_on_b(client, model["id"], MOVING_SESSION, mine, timeout=30)
        self.assertEqual(text.splitlines(), [f"line {i:05d}" for i in range(3000)])

    async def fail_over_mid_stream(self, attach_b: bool) -> tuple[list[dict[str, Any]], dict[str, int]]:
        """
        A client on A streams 10,000 numbered lines; A is killed mid-stream
        and the client reconnects to B with its session id 0.01 s later.
        B is attached to the kernel before if C{attach_b}; if not, the
        kernel prints its second half only once A is dead, and slower (2 s),
        so that some output surely goes to no gateway and the cell surely
        ends after B attached, however slow the machine.

        @return: every message of the cell the client got, in order, and
            the figures: lines, distinct lines, duplicates, replies, idles.
        """
        model = await self.a.api.call("POST", "api/kernels", {}, expect=201)
        if attach_b:
            await self.b.api.call("GET", f"api/kernels/{model['id']}")
        client = await ChannelsClient.connect(self.a.url, model["id"], session_id="failover-session")
        await client.execute("import time")
        # Output flows steadily (10 lines every 2 ms), so some is on its way
        # whenever A dies.
        code = "for i in range(10000):\n    print(f'line {i:05d}', flush=(i % 10 == 9))\n    if i % 10 == 9: time.sleep(0.002)\n"
        gate = os.path.abspath(self.mktemp())
        if not attach_b:
            code = (
                "import os\nfor i in range(10000):\n"
                f"    if i == 5000:\n        while not os.path.exists({gate!r}): time.sleep(0.01)\n"
                "    print(f'line {i:05d}', flush=(i % 10 == 9))\n    if i % 10 == 9: time.sleep(0.004 if i > 5000 else 0.002)\n"
            )
        msg_id = client.request_execute(code)
        mine = lambda m: m.get("parent_header", {}).get("msg_id") == msg_id  # noqa: E731
        await client.wait_for(
            lambda m: mine(m) and m.get("msg_type") == "stream" and "line 01000" in m["content"]["text"], timeout=30
        )
        await self.kill_a()
        await client.closed
        if not attach_b:
            open(gate, "w").close()
        await sleep(0.01)
        resumed = await ChannelsClient.connect(
            self.b.url, model["id"], session_id="failover-session", resume_after=client.last_seq
        )
        idle = lambda m: mine(m) and m.get("msg_type") == "status" and m["content"]["execution_state"] == "idle"  # noqa: E731
        await resumed.wait_for(idle, timeout=60)
        replied = resumed.wait_for(lambda m: mine(m) and m.get("msg_type") == "execute_reply", timeout=10)
        try:
            await replied
        except defer.TimeoutError:
            pass  # counted below
        await resumed.close()
        messages = client.messages + resumed.messages
        lines = "".join(m["content"]["text"] for m in messages if mine(m) and m["msg_type"] == "stream").splitlines()
        figures = {
            "lines": len(lines),
            "distinct": len(set(lines)),
            "duplicates": len(lines) - len(set(lines)),
            "replies": len([m for m in messages if mine(m) and m["msg_type"] == "execute_reply"]),
            "idles": len([m for m in messages if idle(m)]),
        }
        _log.info("failover figures: {figures}", figures=figures)
        return [m for m in messages if mine(m) or m.get("parent_header") == {}], figures

    async def test_failover_of_the_serving_gateway(self) -> None:
        """
        A, the gateway serving a client that streams 10,000 numbered lines,
        is killed; the client reconnects to B (attached to the kernel
        before) with its session id: every line arrives exactly once, in
        order, and so do the cell's execute_reply and idle.
        """
        messages, figures = await self.fail_over_mid_stream(attach_b=True)
        lines = "".join(m["content"]["text"] for m in messages if m["msg_type"] == "stream").splitlines()
        self.assertEqual(
            (figures["duplicates"], figures["replies"], figures["idles"]), (0, 1, 1), f"figures: {figures}"
        )
        self.assertEqual(lines, [f"line {i:05d}" for i in range(10000)], f"figures: {figures}")

    async def test_failover_to_a_gateway_not_attached(self) -> None:
        """
        If B attaches to the kernel only when the client comes back, what
        the kernel printed in between cannot be known: the client is told
        so, then gets the rest once and in order.
        """
        messages, figures = await self.fail_over_mid_stream(attach_b=False)
        notices = [m for m in messages if m["msg_type"] == "stream" and m["content"]["name"] == "stderr"]
        self.assertEqual(len(notices), 1, f"figures: {figures}")
        self.assertIn("may be missing", notices[0]["content"]["text"])
        lines = "".join(
            m["content"]["text"] for m in messages if m["msg_type"] == "stream" and m["content"]["name"] == "stdout"
        ).splitlines()
        self.assertEqual(lines, sorted(set(lines)), f"figures: {figures}")
        self.assertEqual(lines[-1], "line 09999")
        self.assertEqual(figures["idles"], 1, f"figures: {figures}")

    async def test_failover_to_a_gateway_not_attached_mid_cell(self) -> None:
        """
        A is killed while the client's cell waits on a file; B, attached
        only when the client comes back, serves the kernel while the cell
        still runs: its model says busy, the session resumes and the kernel
        answers on control through it.  Released, the cell's last output,
        its execute_reply and its idle reach the client once each.
        """
        model = await self.a.api.call("POST", "api/kernels", {}, expect=201)
        kernel_id = model["id"]
        client = await ChannelsClient.connect(self.a.url, kernel_id, session_id="busy-session")
        msg_id, gate = await start_gated_cell(self, client)
        mine = lambda m: m.get("parent_header", {}).get("msg_id") == msg_id  # noqa: E731
        await self.kill_a()
        await client.closed

        on_b = await self.b.api.call("GET", f"api/kernels/{kernel_id}")
        self.assertEqual((on_b["state"], on_b["execution_state"]), ("running", "busy"), on_b)
        resumed = await ChannelsClient.connect(
            self.b.url, kernel_id, session_id="busy-session", resume_after=client.last_seq
        )
        await assert_answers_while_gated(self, resumed, gate, mine)
        self.assertEqual(
            (await self.b.api.call("GET", f"api/kernels/{kernel_id}"))["execution_state"], "busy"
        )
        # Told the state on reconnecting, and that output may be missing (B
        # attached after A died), never that the kernel is idle or starting.
        told = gateway_statuses(resumed)
        self.assertEqual({c["execution_state"] for c in told}, {"busy"}, told)
        self.assertIn("may be missing", told[-1]["reason"])

        open(gate, "w").close()
        await assert_cell_ends_once(self, client.messages, resumed, mine)
        self.assertEqual(
            (await self.b.api.call("GET", f"api/kernels/{kernel_id}"))["execution_state"], "idle"
        )
        await resumed.close()

    async def test_session_moves_between_live_gateways(self) -> None:
        """
        A client that moves its session from A to B while both run keeps
        getting its replies on B, also after the kernel restarts (A's copy
        of the session must not take its socket identity back).
        """
        model = await self.a.api.call("POST", "api/kernels", {}, expect=201)
        await self.b.api.call("GET", f"api/kernels/{model['id']}")
        on_a = await ChannelsClient.connect(self.a.url, model["id"], session_id="roaming-session")
        self.assertEqual((await on_a.execute("1 + 1"))["result"]["text/plain"], "2")
        on_a.drop()
        await on_a.closed
        on_b = await ChannelsClient.connect(
            self.b.url, model["id"], session_id="roaming-session", resume_after=on_a.last_seq
        )
        self.assertEqual((await on_b.execute("2 + 2"))["result"]["text/plain"], "4")
        await self.b.api.call("POST", f"api/kernels/{model['id']}/restart", {})
        self.assertEqual((await on_b.execute("3 + 3", timeout=60))["result"]["text/plain"], "6")
        await on_b.close()
        ids = [m["header"]["msg_id"] for m in on_a.messages + on_b.messages]
        self.assertEqual(sorted({i for i in ids if ids.count(i) > 1}), [], "messages received twice")
