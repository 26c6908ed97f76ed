"""
The daemon as an operator runs it: C{twistd -n egateway} as a child process,
its start-up errors, its listener, and its graceful stop.
"""

from __future__ import annotations

import os
import signal
import socket
import sys

from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from tests.support.daemon import REPO_ROOT, start_gateway
from tests.support.polling import eventually
from tests.support.wsclient import ChannelsClient


def twistd_argv(*args: str) -> list[str]:
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    return [twistd, "--nodaemon", "--pidfile=", "egateway", *args]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EG_", "KG_"))}
    env["PYTHONPATH"] = REPO_ROOT
    env.update(extra)
    return env


class StartupTests(TestCase):
    timeout = 60

    async def run_twistd(self, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
        out, err, code = await getProcessOutputAndValue(
            sys.executable, twistd_argv(*args), env=env or clean_env(), path=REPO_ROOT, reactor=reactor
        )
        return code, (out + err).decode("utf-8", "replace")

    async def test_bad_flag_value(self) -> None:
        """
        A malformed setting stops start-up with a message naming the key.
        """
        code, output = await self.run_twistd("--launch-timeout=soon")
        self.assertNotEqual(code, 0)
        self.assertIn("kernels.launch_timeout", output)

    async def test_bad_environment_value(self) -> None:
        """
        A malformed EG_* variable is named too.
        """
        code, output = await self.run_twistd(env=clean_env(EG_MAX_KERNELS="many"))
        self.assertNotEqual(code, 0)
        self.assertIn("EG_MAX_KERNELS", output)

    async def test_unknown_config_key(self) -> None:
        """
        An unknown key in the TOML file stops start-up, naming it.
        """
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("[kernels]\nmax_kernelz = 2\n")
        code, output = await self.run_twistd(f"--config={path}")
        self.assertNotEqual(code, 0)
        self.assertIn("kernels.max_kernelz", output)

    async def test_busy_port(self) -> None:
        """
        A port already in use stops start-up instead of running without a
        listener.
        """
        holder = socket.socket()
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        self.addCleanup(holder.close)
        port = holder.getsockname()[1]
        code, output = await self.run_twistd(f"--listen=tcp:{port}:interface=127.0.0.1")
        self.assertNotEqual(code, 0)
        self.assertIn("Address already in use", output)


class RunningDaemonTests(TestCase):
    timeout = 90

    async def test_default_kernelspec_and_kernel(self) -> None:
        """
        With no configuration the daemon offers python3, runs a kernel, and
        answers with no version banner.
        """
        gateway = await start_gateway(self)
        reply = await gateway.api.request("GET", "api/kernelspecs")
        self.assertEqual(reply.code, 200)
        self.assertIn("python3", reply.json()["kernelspecs"])
        self.assertNotIn("server", reply.headers)
        model = await gateway.api.call("POST", "api/kernels", {}, expect=201)
        client = await ChannelsClient.connect(gateway.url, model["id"])
        result = await client.execute("6 * 7")
        self.assertEqual(result["result"]["text/plain"], "42")
        await client.close()
        await gateway.api.call("DELETE", f"api/kernels/{model['id']}", expect=204)
        self.assertEqual(gateway.kernel_processes(), [])

    async def test_untaken_environment_named_once(self) -> None:
        """
        Every EG_*/KG_* variable the gateway does not take is named in one
        warning at start-up, with the setting that replaces it where there is
        one; the variables it takes are not.
        """
        env = {
            "EG_SSL_VERSION": "PROTOCOL_TLSv1_2",
            "EG_YARN_ENDPOINT_SECURITY_ENABLED": "true",
            "KG_PRESPAWN_COUNT": "2",
            "EG_MAX_KERNELS": "3",
        }
        gateway = await start_gateway(self, env=env)
        marker = "does not take these environment variables"

        def warnings() -> list[str]:
            return [line for line in open(gateway.process.log_path).read().splitlines() if marker in line]

        (line,) = await eventually(warnings, "the warning")
        self.assertIn("EG_SSL_VERSION (use tls_min_version (EG_TLS_MIN_VERSION))", line)
        self.assertIn("EG_YARN_ENDPOINT_SECURITY_ENABLED", line)
        self.assertIn("KG_PRESPAWN_COUNT", line)
        self.assertNotIn("EG_MAX_KERNELS", line)

    async def test_token_and_body_limit(self) -> None:
        """
        With a token, requests and the WebSocket handshake without it are
        JSON 401s; an oversize body is a 413.
        """
        gateway = await start_gateway(self, token="s3cret", flags={"max-request-body": "2048"})
        reply = await gateway.api.request("GET", "api/kernelspecs", token=None)
        self.assertEqual(reply.code, 401)
        self.assertEqual(set(reply.json()), {"reason", "message"})
        reply = await gateway.api.request("POST", "api/kernels", {"env": {"KERNEL_X": "x" * 4000}})
        self.assertEqual(reply.code, 413)
        model = await gateway.api.call("POST", "api/kernels", {}, expect=201)
        with self.assertRaises(ConnectionError):
            await ChannelsClient.connect(gateway.url, model["id"])
        client = await ChannelsClient.connect(gateway.url, model["id"], token="s3cret")
        await client.close()

    async def test_environment_and_flag_precedence(self) -> None:
        """
        A flag overrides the EG_* variable for the same setting.
        """
        gateway = await start_gateway(
            self, flags={"max-kernels": "2", "list-kernels": "true"}, env={"EG_MAX_KERNELS": "1"}
        )
        first = await gateway.api.request("POST", "api/kernels", {})
        second = await gateway.api.request("POST", "api/kernels", {})
        third = await gateway.api.request("POST", "api/kernels", {})
        self.assertEqual((first.code, second.code, third.code), (201, 201, 403))

    async def test_sigterm_stops_kernels(self) -> None:
        """
        SIGTERM stops the daemon gracefully, shutting its kernels down first.
        """
        gateway = await start_gateway(self, flags={"list-kernels": "true"})
        for _ in range(2):
            await gateway.api.call("POST", "api/kernels", {}, expect=201)
        self.assertEqual(len(gateway.kernel_processes()), 2)
        report = await gateway.stop()
        self.assertTrue(report.graceful, report.describe())
        self.assertEqual(gateway.kernel_processes(), [])
        log = open(gateway.process.log_path).read()
        self.assertIn("the gateway is stopping", log)
        self.assertEqual(report.signal or 0, signal.SIGTERM if report.signal else 0)
