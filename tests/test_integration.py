"""
The gateway with real ipykernel kernels over loopback: both WebSocket
protocols, routing between several clients, interrupt, restart, shutdown,
automatic restart after a kill, culling and limits under concurrency.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import DeferredList, ensureDeferred, gatherResults
from twisted.internet.task import deferLater

from egateway.kernels.journal import KernelSession
from tests.support.gateway import GatewayTestCase, pid_alive
from tests.support.wsclient import ChannelsClient


def is_status(state: str):
    return lambda m: m.get("msg_type") == "status" and m["content"].get("execution_state") == state


class ChannelTests(GatewayTestCase):
    async def test_legacy_protocol(self) -> None:
        """
        A legacy JSON client runs code and gets its output and result.
        """
        kernel = await self.gateway.start_kernel()
        client = await ChannelsClient.connect(self.gateway.url, kernel["id"])
        result = await client.execute("print('hello'); 6*7")
        self.assertEqual(result["reply"]["status"], "ok")
        self.assertEqual(result["stdout"], "hello\n")
        self.assertEqual(result["result"]["text/plain"], "42")
        await client.close()

    async def test_v1_protocol(self) -> None:
        """
        A v1.kernel.websocket.jupyter.org client runs code the same way.
        """
        kernel = await self.gateway.start_kernel()
        client = await ChannelsClient.connect(self.gateway.url, kernel["id"], v1=True)
        self.assertEqual(client._proto.websocket_protocol_in_use, "v1.kernel.websocket.jupyter.org")
        result = await client.execute("print('hello'); 6*7")
        self.assertEqual(result["stdout"], "hello\n")
        self.assertEqual(result["result"]["text/plain"], "42")
        await client.close()

    async def test_large_outputs(self) -> None:
        """
        A 5 MB output written in one go arrives intact over both protocols
        (large frames are written without being joined first).
        """
        kernel = await self.gateway.start_kernel()
        for v1 in (False, True):
            client = await ChannelsClient.connect(self.gateway.url, kernel["id"], v1=v1)
            result = await client.execute("import sys; sys.stdout.write('é' + 'x' * 5_000_000 + 'end')")
            self.assertEqual(result["stdout"], "é" + "x" * 5_000_000 + "end")
            await client.close()

    async def test_binary_buffers(self) -> None:
        """
        A comm message with binary buffers reaches the client as a legacy
        binary frame with its buffers intact.
        """
        kernel = await self.gateway.start_kernel()
        client = await ChannelsClient.connect(self.gateway.url, kernel["id"])
        code = (
            "from ipykernel.comm import Comm\n"
            "c = Comm(target_name='t', data={})\n"
            "c.send(data={'n': 1}, buffers=[b'\\x00\\x01binary'])\n"
        )
        result = await client.execute(code)
        self.assertEqual(result["reply"]["status"], "ok", result)
        msg = await client.wait_for(lambda m: m.get("msg_type") == "comm_msg")
        self.assertEqual(msg["buffers"], [b"\x00\x01binary"])
        self.assertEqual(msg["content"]["data"], {"n": 1})
        await client.close()

    async def test_routing_between_clients(self) -> None:
        """
        With two clients on one kernel, iopub output reaches both, but the
        execute_reply and the stdin input_request reach only the client that
        asked.
        """
        kernel = await self.gateway.start_kernel()
        a = await ChannelsClient.connect(self.gateway.url, kernel["id"])
        b = await ChannelsClient.connect(self.gateway.url, kernel["id"], v1=True)
        result = await a.execute("print('shared')")
        await b.wait_for(lambda m: m.get("msg_type") == "stream" and m["content"]["text"] == "shared\n")
        self.assertEqual(
            [m for m in b.replies_to(result["msg_id"]) if m["msg_type"] == "execute_reply"], []
        )
        since = len(a.messages)
        msg_id = a.send(
            "execute_request",
            {"code": "x = input('name? ')", "silent": False, "allow_stdin": True, "store_history": False, "user_expressions": {}},
        )
        request = await a.wait_for(lambda m: m.get("msg_type") == "input_request", since=since)
        self.assertEqual(request["content"]["prompt"], "name? ")
        a.send("input_reply", {"value": "ada"}, channel="stdin", parent=request["header"])
        await a.wait_for(
            lambda m: m.get("msg_type") == "execute_reply" and m["parent_header"].get("msg_id") == msg_id
        )
        self.assertEqual([m for m in b.messages if m.get("msg_type") == "input_request"], [])
        check = await b.execute("print(x)")
        self.assertEqual(check["stdout"], "ada\n")
        kernel_model = (await self.gateway.request("GET", f"api/kernels/{kernel['id']}"))[1]
        self.assertEqual(kernel_model["connections"], 2)
        await a.close()
        await b.close()

    async def test_unknown_kernel_channels(self) -> None:
        """
        Connecting to the channels of a kernel that does not exist is refused
        before the upgrade.
        """
        with self.assertRaises(Exception):
            await ChannelsClient.connect(self.gateway.url, "0b5e3a0c-1d8e-4f55-9b9e-3f0e6c1a2b3c")


class ClearTextChannelTests(GatewayTestCase):
    """
    Kernel channels in clear text, where the gateway checks every
    message's signature.
    """

    gateway_settings = {"kernel_encryption": "off"}

    async def test_large_output_checked_while_relayed(self) -> None:
        """
        A 3 MB output, relayed to a legacy and a v1 client while its
        signature is checked, reaches both whole, before the cell's reply
        and the output that follows it.
        """
        from egateway.wire.link import KernelLink

        ahead: list[str] = []
        check_ahead = KernelLink._check_ahead

        def counted(link: KernelLink, message: Any, check: Any) -> None:
            ahead.append(message.msg_id)
            check_ahead(link, message, check)

        self.patch(KernelLink, "_check_ahead", counted)
        kernel = await self.gateway.start_kernel()
        model = (await self.gateway.request("GET", f"api/kernels/{kernel['id']}"))[1]
        self.assertFalse(model["encrypted"], model)
        legacy = await ChannelsClient.connect(self.gateway.url, kernel["id"])
        v1 = await ChannelsClient.connect(self.gateway.url, kernel["id"], v1=True)
        code = "import sys; sys.stdout.write('é' + 'x' * 3_000_000 + 'end'); sys.stdout.flush(); print('after')"
        since = len(v1.messages)
        result = await legacy.execute(code)
        self.assertEqual(result["stdout"], "é" + "x" * 3_000_000 + "end" + "after\n")
        await v1.wait_for(is_status("idle"), since=since)
        texts = [m["content"]["text"] for m in v1.messages[since:] if m.get("msg_type") == "stream"]
        self.assertEqual(texts, ["é" + "x" * 3_000_000 + "end", "after\n"])
        self.assertEqual(len(ahead), 1)
        await legacy.close()
        await v1.close()


class LifecycleTests(GatewayTestCase):
    gateway_settings = {"shutdown_wait": 3, "terminate_wait": 3}

    async def test_interrupt(self) -> None:
        """
        Interrupting a cell stuck in time.sleep(60) ends it with
        KeyboardInterrupt; the kernel and its state survive.
        """
        kernel = await self.gateway.start_kernel()
        client = await ChannelsClient.connect(self.gateway.url, kernel["id"])
        await client.execute("x = 5")

        async def interrupt() -> None:
            code, _ = await self.gateway.request("POST", f"api/kernels/{kernel['id']}/interrupt")
            self.assertEqual(code, 204)

        reply = await client.interrupted_sleep(interrupt)
        self.assertEqual(reply["ename"], "KeyboardInterrupt")
        result = await client.execute("x + 1")
        self.assertEqual(result["result"]["text/plain"], "6")
        await client.close()

    async def test_restart_with_connected_client(self) -> None:
        """
        A restart keeps the kernel id and the WebSocket: the client sees
        'starting', then the new kernel's states (never 'restarting', which
        Jupyter clients read as a death), and the old state is gone.
        """
        kernel = await self.gateway.start_kernel()
        client = await ChannelsClient.connect(self.gateway.url, kernel["id"])
        await client.execute("x = 5")
        since = len(client.messages)
        code, model = await self.gateway.request("POST", f"api/kernels/{kernel['id']}/restart")
        self.assertEqual(code, 200)
        self.assertEqual(model["id"], kernel["id"])
        self.assertEqual(model["restarts"], 1)
        self.assertNotEqual(model["placement"]["pid"], kernel["placement"]["pid"])
        self.gateway.pids.add(model["placement"]["pid"])
        await client.wait_for(is_status("starting"), since=since)
        result = await client.execute("'x' in dir()")
        self.assertEqual(result["result"]["text/plain"], "False")
        self.assertFalse(any(is_status("restarting")(m) for m in client.messages[since:]))
        self.assertFalse(pid_alive(kernel["placement"]["pid"]))
        await client.close()

    async def test_shutdown_closes_clients_and_process(self) -> None:
        """
        DELETE shuts the kernel down, closes its WebSockets and leaves no
        process.
        """
        kernel = await self.gateway.start_kernel()
        client = await ChannelsClient.connect(self.gateway.url, kernel["id"])
        code, _ = await self.gateway.request("DELETE", f"api/kernels/{kernel['id']}")
        self.assertEqual(code, 204)
        client.closed.addTimeout(10, reactor)
        await client.closed
        self.assertFalse(pid_alive(kernel["placement"]["pid"]))
        code, body = await self.gateway.request("GET", f"api/kernels/{kernel['id']}")
        self.assertEqual(code, 404)

    async def test_auto_restart_after_kill(self) -> None:
        """
        kill -9 of a kernel process restarts it under the same id; the client
        is told why and keeps working.
        """
        kernel = await self.gateway.start_kernel()
        client = await ChannelsClient.connect(self.gateway.url, kernel["id"])
        since = len(client.messages)
        os.kill(kernel["placement"]["pid"], signal.SIGKILL)
        status = await client.wait_for(is_status("restarting"), since=since)
        self.assertIn("killed by signal 9", status["content"]["reason"])
        await client.wait_for(is_status("idle"), since=since)
        result = await client.execute("1 + 1", timeout=30)
        self.assertEqual(result["result"]["text/plain"], "2")
        code, model = await self.gateway.request("GET", f"api/kernels/{kernel['id']}")
        self.assertEqual(model["restarts"], 1)
        self.gateway.pids.add(model["placement"]["pid"])
        await client.close()


class CullingTests(GatewayTestCase):
    gateway_settings = {"cull_idle_timeout": 1, "cull_interval": 1, "cull_connected": "true"}

    async def test_idle_kernel_is_culled(self) -> None:
        """
        A real kernel left idle is shut down by the culler and its client is
        told why.
        """
        kernel = await self.gateway.start_kernel()
        client = await ChannelsClient.connect(self.gateway.url, kernel["id"])
        status = await client.wait_for(
            lambda m: is_status("dead")(m) and "culled" in m["content"].get("reason", ""), timeout=15
        )
        self.assertIn("idle for", status["content"]["reason"])
        client.closed.addTimeout(10, reactor)
        await client.closed
        for _ in range(100):
            if kernel["id"] not in self.gateway.manager.kernels:
                break
            await deferLater(reactor, 0.1)
        self.assertNotIn(kernel["id"], self.gateway.manager.kernels)


class ConcurrencyTests(GatewayTestCase):
    gateway_settings = {"max_kernels": 3, "list_kernels": "true"}

    async def test_limit_under_concurrent_starts(self) -> None:
        """
        Six concurrent starts against max_kernels=3: exactly three start and
        three are refused with 403; never more than three kernels exist.
        """
        results = await gatherResults(
            [ensureDeferred(self.gateway.request("POST", "api/kernels", {})) for _ in range(6)]
        )
        codes = sorted(code for code, _ in results)
        self.assertEqual(codes, [201, 201, 201, 403, 403, 403])
        for code, body in results:
            if code == 201:
                self.gateway.pids.add(body["placement"]["pid"])
            else:
                self.assertEqual(body["reason"], "Forbidden")
                self.assertIn("max kernels limit of 3", body["message"])
        code, listed = await self.gateway.request("GET", "api/kernels")
        self.assertEqual(len(listed), 3)


class ManyKernelsTests(GatewayTestCase):
    async def test_concurrent_starts_all_ready(self) -> None:
        """
        Twelve concurrent starts all become ready, on distinct ports, and each
        runs code.
        """
        models = await gatherResults([ensureDeferred(self.gateway.start_kernel()) for _ in range(12)])
        ports = [self.gateway.manager.get(m["id"]).process.connection_info.shell_port for m in models]
        self.assertEqual(len(set(ports)), 12)
        clients = await gatherResults(
            [ensureDeferred(ChannelsClient.connect(self.gateway.url, m["id"])) for m in models]
        )
        results = await gatherResults([ensureDeferred(c.execute("2 ** 10")) for c in clients])
        self.assertEqual({r["result"]["text/plain"] for r in results}, {"1024"})
        await DeferredList([ensureDeferred(c.close()) for c in clients])


class ResumeTests(GatewayTestCase):
    async def run_and_drop(self, v1: bool) -> None:
        kernel = await self.gateway.start_kernel()
        session = f"session-{v1}"
        client = await ChannelsClient.connect(self.gateway.url, kernel["id"], session_id=session, v1=v1)
        code = "for i in range(100000):\n    print(f'{i:07d}' + 'x' * 93)\n"
        msg_id = client.send(
            "execute_request",
            {"code": code, "silent": False, "store_history": False, "user_expressions": {}, "allow_stdin": False},
        )
        mine = lambda m: m.get("parent_header", {}).get("msg_id") == msg_id  # noqa: E731
        await client.wait_for(lambda m: mine(m) and m.get("msg_type") == "stream", timeout=30)
        while sum(len(m["content"]["text"]) for m in client.messages if mine(m) and m["msg_type"] == "stream") < 3_000_000:
            await client.wait_for(lambda m: False, timeout=0.05).addErrback(lambda f: None)
        client.drop()
        await client.closed
        first_part = [m for m in client.messages if mine(m)]
        resumed = await ChannelsClient.connect(
            self.gateway.url, kernel["id"], session_id=session, v1=v1, resume_after=client.last_seq
        )
        await resumed.wait_for(
            lambda m: mine(m) and m.get("msg_type") == "status" and m["content"]["execution_state"] == "idle",
            timeout=60,
        )
        second_part = [m for m in resumed.messages if mine(m)]
        seqs = [m["egateway_seq"] for m in first_part + second_part]
        self.assertEqual(seqs, sorted(set(seqs)), "messages repeated or out of order")
        text = "".join(m["content"]["text"] for m in first_part + second_part if m["msg_type"] == "stream")
        lines = text.splitlines()
        self.assertEqual(len(lines), 100000)
        self.assertEqual([int(line[:7]) for line in lines], list(range(100000)))
        self.assertGreater(len(text), 10_000_000)
        await resumed.close()

    async def test_resume_legacy(self) -> None:
        """
        A legacy client whose WebSocket drops in the middle of 10 MB of output
        and reconnects with its session id and last message number gets all
        of it exactly once, in order.
        """
        await self.run_and_drop(v1=False)

    async def test_resume_v1(self) -> None:
        """
        The same for a v1 client.
        """
        await self.run_and_drop(v1=True)

    async def test_output_while_away(self) -> None:
        """
        Output produced while no client is connected is delivered on
        reconnection with the same session id (no resume point needed).
        """
        kernel = await self.gateway.start_kernel()
        client = await ChannelsClient.connect(self.gateway.url, kernel["id"], session_id="s1")
        msg_id = client.send(
            "execute_request",
            {"code": "import time; time.sleep(1); print('while you were away')", "silent": False, "store_history": False, "user_expressions": {}, "allow_stdin": False},
        )
        await client.close()
        again = await ChannelsClient.connect(self.gateway.url, kernel["id"], session_id="s1")
        msg = await again.wait_for(
            lambda m: m.get("msg_type") == "stream" and m["parent_header"].get("msg_id") == msg_id, timeout=15
        )
        self.assertEqual(msg["content"]["text"], "while you were away\n")
        reply = await again.wait_for(
            lambda m: m.get("msg_type") == "execute_reply" and m["parent_header"].get("msg_id") == msg_id
        )
        self.assertEqual(reply["content"]["status"], "ok")
        await again.close()

    async def test_stale_connection_replaced(self) -> None:
        """
        A second connection with the same session id takes over; the first is
        closed.
        """
        kernel = await self.gateway.start_kernel()
        first = await ChannelsClient.connect(self.gateway.url, kernel["id"], session_id="same")
        second = await ChannelsClient.connect(self.gateway.url, kernel["id"], session_id="same")
        first.closed.addTimeout(10, reactor)
        await first.closed
        self.assertEqual(first.close_code, 4001)
        result = await second.execute("1 + 1")
        self.assertEqual(result["result"]["text/plain"], "2")
        await second.close()


async def output_while_parked(gateway: Any, code: str) -> tuple[Any, dict[str, Any]]:
    """
    Park session C{s} of a new kernel, run C{code} from another session
    meanwhile, and reconnect C{s} from where it left off.

    @return: the reconnected client, and the first message it got: the
        notice of what was dropped, if anything was.
    """
    kernel = await gateway.start_kernel()
    client = await ChannelsClient.connect(gateway.url, kernel["id"], session_id="s")
    await client.execute("1")
    seen = client.last_seq
    await client.close()
    other = await ChannelsClient.connect(gateway.url, kernel["id"], session_id="other")
    await other.execute(code)
    await other.close()
    again = await ChannelsClient.connect(gateway.url, kernel["id"], session_id="s", resume_after=seen)
    notice = await again.wait_for(
        lambda m: m.get("msg_type") == "stream" and m["content"]["text"].startswith("[egateway]")
    )
    return again, notice


class AcknowledgedResumeTests(GatewayTestCase):
    gateway_settings = {"ws_ack_delay": 0.05}
    run_and_drop = ResumeTests.run_and_drop

    async def test_resume_after_acknowledgements(self) -> None:
        """
        The same drop with the gateway pinging every 0.05 s to learn what
        the client has (L{egateway.api.ws_acks}): the session drops what
        the pongs acknowledge while the output flows, and the client still
        gets all of it exactly once.
        """
        acknowledged: list[int] = []
        original = KernelSession.acknowledge

        def recorded(session: KernelSession, client: Any, upto: int) -> None:
            acknowledged.append(upto)
            original(session, client, upto)

        self.patch(KernelSession, "acknowledge", recorded)
        await self.run_and_drop(v1=True)
        self.assertTrue(acknowledged, "no pong acknowledged anything while the output flowed")
        self.assertEqual(acknowledged, sorted(acknowledged))


class JournalBoundTests(GatewayTestCase):
    gateway_settings = {"journal_entries": 50}

    async def test_dropped_output_is_announced(self) -> None:
        """
        A client that missed more than the journal holds is told how much
        was dropped, then gets the rest.
        """
        again, notice = await output_while_parked(
            self.gateway, "import sys\nfor i in range(200):\n    print(i, flush=True)\n"
        )
        self.assertIn("dropped", notice["content"]["text"])
        await again.close()


class TotalBoundTests(GatewayTestCase):
    gateway_settings = {"journal_total_bytes": 1 << 20}

    async def test_parked_flood_is_bounded(self) -> None:
        """
        A parked session's journal, with a real kernel printing 3 MB while
        its client is away, is held to journal_total_bytes with everything
        else the gateway holds; the returning client is told what was
        dropped and gets the newest output.
        """
        again, notice = await output_while_parked(
            self.gateway, "for i in range(300):\n    print(f'<{i:04d}>' + 'x' * 10_000, flush=True)\n"
        )
        held = self.gateway.manager.journal_limits.held
        self.assertGreater(held.shed, 0)
        self.assertLessEqual(held.total, 1 << 20)
        self.assertIn("dropped", notice["content"]["text"])
        await again.wait_for(lambda m: m.get("msg_type") == "stream" and "<0299>" in m["content"]["text"])
        await again.close()
