"""
A real C{jupyter server} (jupyter_server 2.x) with C{--gateway-url} pointing
at a real egateway daemon: everything a notebook user does goes through the
notebook server's own REST API and WebSocket, and egateway does the kernel
work behind it.

Each test starts its own egateway (C{twistd -n egateway}, token required,
kernel listing on) and its own notebook server, and its cleanup fails the
test if either did not stop on SIGTERM or left a process behind.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tests.support.daemon import (
    GatewayDaemon,
    JupyterServer,
    pid_alive,
    processes_mentioning,
    start_gateway,
    start_jupyter_server,
)
from tests.support.wsclient import ChannelsClient

GATEWAY_TOKEN = "gateway-secret-token"
SERVER_TOKEN = "notebook-secret-token"

INTERRUPT_BOUND = 15.0
"""
Seconds within which an interrupted C{time.sleep(60)} cell must end.
"""


def status_is(state: str) -> Callable[[dict[str, Any]], bool]:
    return lambda m: m.get("msg_type") == "status" and m["content"].get("execution_state") == state


class JupyterServerThroughGatewayTests(TestCase):
    """
    The acceptance scenario for C{jupyter server --gateway-url}, one step
    per test.
    """

    timeout = 60

    gateway: GatewayDaemon
    server: JupyterServer

    async def setUp(self) -> None:
        self.gateway = await start_gateway(
            self, token=GATEWAY_TOKEN, flags={"list-kernels": "true"}, reactor=reactor
        )
        self.server = await start_jupyter_server(
            self, token=SERVER_TOKEN, gateway=self.gateway, reactor=reactor
        )

    async def start_kernel(self) -> dict[str, Any]:
        """
        Start a python3 kernel through the notebook server.
        """
        model = await self.server.api.call("POST", "api/kernels", {"name": "python3"}, expect=201)
        self.assertEqual(model["name"], "python3")
        return model

    async def connect(self, kernel_id: str) -> ChannelsClient:
        """
        Open the kernel's channels on the notebook server (not on egateway).
        """
        client = await ChannelsClient.connect(self.server.url, kernel_id, token=SERVER_TOKEN)
        self.addCleanup(client.close)
        return client

    async def test_kernelspecs_come_from_the_gateway(self) -> None:
        """
        The notebook server offers the gateway's python3 kernelspec and
        serves its logo from the gateway.
        """
        specs = await self.server.api.call("GET", "api/kernelspecs")
        self.assertEqual(specs["default"], "python3")
        self.assertIn("python3", specs["kernelspecs"])
        ours = await self.gateway.api.call("GET", "api/kernelspecs")
        self.assertEqual(
            specs["kernelspecs"]["python3"]["spec"]["display_name"],
            ours["kernelspecs"]["python3"]["spec"]["display_name"],
        )
        one = await self.server.api.call("GET", "api/kernelspecs/python3")
        self.assertEqual(one["name"], "python3")

        logo = await self.server.api.request("GET", "kernelspecs/python3/logo-64x64.png")
        direct = await self.gateway.api.request("GET", "kernelspecs/python3/logo-64x64.png")
        self.assertEqual((logo.code, direct.code), (200, 200))
        self.assertTrue(logo.body.startswith(b"\x89PNG"), logo.body[:40])
        self.assertEqual(logo.body, direct.body)

    async def test_kernel_runs_code_and_is_listed_by_the_gateway(self) -> None:
        """
        A kernel started on the notebook server lives on the gateway, runs
        code over the notebook server's WebSocket, and is gone from the
        gateway, processes included, once deleted.
        """
        model = await self.start_kernel()
        kernel_id = model["id"]
        self.assertIn(kernel_id, await self.gateway.kernel_ids())
        self.assertEqual(len(self.gateway.kernel_processes(kernel_id)), 1)

        client = await self.connect(kernel_id)
        result = await client.execute("print('hello from the kernel'); 1+1", timeout=20)
        self.assertEqual(result["reply"]["status"], "ok", result)
        self.assertEqual(result["stdout"], "hello from the kernel\n")
        self.assertEqual(result["result"]["text/plain"], "2")
        on_gateway = await self.gateway.api.call("GET", f"api/kernels/{kernel_id}")
        self.assertEqual(on_gateway["connections"], 1)

        await self.server.api.call("DELETE", f"api/kernels/{kernel_id}", expect=204)
        self.assertNotIn(kernel_id, await self.gateway.kernel_ids())
        self.assertEqual(self.gateway.kernel_processes(kernel_id), [])
        reply = await self.server.api.request("GET", f"api/kernels/{kernel_id}")
        self.assertEqual(reply.code, 404)

    async def test_outputs_larger_than_tornado_takes(self) -> None:
        """
        The notebook server's connection to the gateway takes at most
        10 MiB per message (Tornado's default; jupyter_server sets none):
        a 20 MB stream output still arrives whole, in pieces, and a 12 MB
        display is replaced by a notice on stderr; either way the cell's
        reply arrives and the kernel stays usable.  Before, the notebook
        server lost its connection at the first, reconnected, and the cell
        never finished.
        """
        model = await self.start_kernel()
        client = await self.connect(model["id"])
        text = "0123456789abcdé\n" * 1_250_000
        result = await client.execute(
            "import sys; sys.stdout.write('0123456789abcdé\\n' * 1_250_000); 'done'", timeout=120
        )
        self.assertEqual(result["reply"]["status"], "ok")
        self.assertEqual(len(result["stdout"]), len(text))
        self.assertEqual(result["stdout"], text)
        self.assertEqual(result["result"]["text/plain"], "'done'")

        result = await client.execute("display({'text/plain': 'y' * 12_000_000}, raw=True)", timeout=120)
        self.assertEqual(result["reply"]["status"], "ok")
        self.assertIn("a display_data message of 11.4 MiB was not sent", result["stderr"])
        result = await client.execute("print('still here')", timeout=20)
        self.assertEqual(result["stdout"], "still here\n")

    test_outputs_larger_than_tornado_takes.timeout = 180  # type: ignore[attr-defined]

    async def test_interrupt_ends_a_sleeping_cell(self) -> None:
        """
        Interrupting through the notebook server ends a C{time.sleep(60)}
        cell with KeyboardInterrupt within seconds, and the kernel keeps
        working.
        """
        kernel_id = (await self.start_kernel())["id"]
        client = await self.connect(kernel_id)
        code = "import time; time.sleep(60)"
        mark = len(client.messages)
        running = ensureDeferred(client.execute(code, timeout=INTERRUPT_BOUND))
        await client.wait_for(
            lambda m: m.get("msg_type") == "execute_input" and m["content"].get("code") == code,
            timeout=15,
            since=mark,
        )
        asked = reactor.seconds()
        await self.server.api.call("POST", f"api/kernels/{kernel_id}/interrupt", expect=204)
        result = await running
        elapsed = reactor.seconds() - asked

        self.assertLess(elapsed, INTERRUPT_BOUND)
        self.assertEqual(result["reply"]["status"], "error", result)
        self.assertEqual(result["error"]["ename"], "KeyboardInterrupt", result)
        after = await client.execute("1+1", timeout=15)
        self.assertEqual(after["result"]["text/plain"], "2")
        self.assertEqual(len(self.gateway.kernel_processes(kernel_id)), 1)

    async def test_restart_forgets_state_and_keeps_running(self) -> None:
        """
        Restarting through the notebook server replaces the kernel process
        under the same id: a variable set before is gone, code still runs
        on the same WebSocket, and no 'restarting' status (which JupyterLab
        reads as "the kernel died") reaches the notebook server's clients.
        """
        kernel_id = (await self.start_kernel())["id"]
        client = await self.connect(kernel_id)
        before = await client.execute("x = 'set before the restart'; x", timeout=15)
        self.assertEqual(before["result"]["text/plain"], "'set before the restart'")
        old_pids = {pid for pid, _ in self.gateway.kernel_processes(kernel_id)}
        self.assertEqual(len(old_pids), 1)

        mark = len(client.messages)
        model = await self.server.api.call("POST", f"api/kernels/{kernel_id}/restart")
        self.assertEqual(model["id"], kernel_id)
        await client.wait_for(status_is("starting"), timeout=10, since=mark)

        gone = await client.execute("x", timeout=15)
        self.assertEqual(gone["reply"]["status"], "error")
        self.assertEqual(gone["error"]["ename"], "NameError", gone)
        works = await client.execute("print(6 * 7)", timeout=15)
        self.assertEqual(works["stdout"], "42\n")
        self.assertFalse(any(status_is("restarting")(m) for m in client.messages[mark:]))

        self.assertEqual(await self.gateway.kernel_ids(), [kernel_id])
        new_pids = {pid for pid, _ in self.gateway.kernel_processes(kernel_id)}
        self.assertEqual(len(new_pids), 1)
        self.assertFalse(new_pids & old_pids, "the restart kept the old kernel process")
        self.assertFalse(any(pid_alive(pid) for pid in old_pids))

    async def test_session_lifecycle(self) -> None:
        """
        A notebook session created on the notebook server gets a gateway
        kernel that runs code; deleting the session removes the kernel from
        both servers.
        """
        body = {
            "path": "analysis.ipynb",
            "name": "analysis.ipynb",
            "type": "notebook",
            "kernel": {"name": "python3"},
        }
        session = await self.server.api.call("POST", "api/sessions", body, expect=201)
        kernel = session["kernel"]
        self.assertEqual(kernel["name"], "python3")
        self.assertEqual(session["path"], "analysis.ipynb")
        self.assertIn(kernel["id"], await self.gateway.kernel_ids())
        listed = await self.server.api.call("GET", "api/sessions")
        self.assertEqual([s["id"] for s in listed], [session["id"]])

        client = await self.connect(kernel["id"])
        result = await client.execute("import os; os.getpid() > 0", timeout=15)
        self.assertEqual(result["result"]["text/plain"], "True")
        await client.close()

        await self.server.api.call("DELETE", f"api/sessions/{session['id']}", expect=204)
        self.assertEqual(await self.server.api.call("GET", "api/sessions"), [])
        self.assertEqual(await self.server.api.call("GET", "api/kernels"), [])
        self.assertEqual(await self.gateway.kernel_ids(), [])
        self.assertEqual(self.gateway.kernel_processes(), [])
        missing = await self.server.api.request("DELETE", f"api/kernels/{kernel['id']}")
        self.assertEqual(missing.code, 404)

    async def test_stopping_leaves_nothing_behind(self) -> None:
        """
        Stopping the notebook server shuts its gateway kernels down, and
        stopping the gateway leaves no kernel, notebook server or gateway
        process.
        """
        first = await self.start_kernel()
        second = await self.start_kernel()
        client = await self.connect(first["id"])
        await client.execute("1", timeout=15)
        kernel_pids = {pid for pid, _ in self.gateway.kernel_processes()}
        self.assertEqual(len(kernel_pids), 2)
        self.assertEqual(
            sorted(await self.gateway.kernel_ids()), sorted([first["id"], second["id"]])
        )
        await client.close()

        server_report = await self.server.stop()
        self.assertTrue(server_report.graceful, server_report.describe())
        self.assertEqual(await self.gateway.kernel_ids(), [])

        gateway_report = await self.gateway.stop()
        self.assertTrue(gateway_report.graceful, gateway_report.describe())
        for pid in [self.server.pid, self.gateway.pid, *kernel_pids]:
            self.assertFalse(pid_alive(pid), f"process {pid} is still running")
        self.assertEqual(processes_mentioning(self.gateway.workdir), [])
        self.assertEqual(processes_mentioning(self.server.workdir), [])
        # No connection file or kernel output file is left behind.
        self.assertEqual(os.listdir(os.path.join(self.gateway.data_dir, "runtime")), [])


class DefaultListingTests(TestCase):
    timeout = 60

    async def test_notebook_server_lists_kernels_by_default(self) -> None:
        """
        With egateway's defaults, the notebook server's GET /api/kernels
        (which JupyterLab polls) answers with the kernel started through it,
        not jupyter_server's garbled "Error from Gateway: [%s] %s".
        """
        gateway = await start_gateway(self, token=GATEWAY_TOKEN, reactor=reactor)
        server = await start_jupyter_server(self, token=SERVER_TOKEN, gateway=gateway, reactor=reactor)
        model = await server.api.call("POST", "api/kernels", {"name": "python3"}, expect=201)
        reply = await server.api.request("GET", "api/kernels")
        self.assertEqual(reply.code, 200, reply.json())
        self.assertEqual([kernel["id"] for kernel in reply.json()], [model["id"]])
        await server.api.call("DELETE", f"api/kernels/{model['id']}", expect=204)


class AcknowledgedThroughJupyterServerTests(TestCase):
    """
    The notebook server's own WebSocket client (Tornado's) answers the
    gateway's acknowledgement pings (L{egateway.api.ws_acks}).
    """

    timeout = 90

    async def test_gateway_holds_nothing_the_notebook_server_has(self) -> None:
        """
        Output that reached the notebook server is held by the gateway's
        session (for a resume) only until the next acknowledgement ping is
        answered: C{egateway_journal_held_bytes} is above 0 right after a
        cell and falls back to 0 while the notebook server stays connected.
        """
        from tests.test_metrics import METRICS_TOKEN, Samples

        gateway = await start_gateway(
            self,
            token=GATEWAY_TOKEN,
            flags={"ws-ack-delay": "10"},
            env={"EG_METRICS_TOKEN": METRICS_TOKEN},
            reactor=reactor,
        )
        server = await start_jupyter_server(self, token=SERVER_TOKEN, gateway=gateway, reactor=reactor)

        async def held() -> float:
            reply = await gateway.api.request("GET", "metrics", token=METRICS_TOKEN)
            self.assertEqual(reply.code, 200, reply.body[:300])
            return Samples.parse(reply.body.decode()).get_("egateway_journal_held_bytes")

        model = await server.api.call("POST", "api/kernels", {"name": "python3"}, expect=201)
        client = await ChannelsClient.connect(server.url, model["id"], token=SERVER_TOKEN)
        self.addCleanup(client.close)
        result = await client.execute("for i in range(200):\n    print(i, flush=True)", timeout=30)
        self.assertEqual(result["stdout"], "".join(f"{i}\n" for i in range(200)))
        # Within the 10 s from the first message (the notebook server's
        # kernel_info) to the first ping, the cell's output is still held.
        self.assertGreater(await held(), 0)
        for _ in range(120):
            if await held() == 0:
                break
            await deferLater(reactor, 0.25)
        self.assertEqual(await held(), 0)
        result = await client.execute("print('still connected')", timeout=20)
        self.assertEqual(result["stdout"], "still connected\n")
        await server.api.call("DELETE", f"api/kernels/{model['id']}", expect=204)
