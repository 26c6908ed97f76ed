"""
The gateway's own secrets stay its own: kernels never inherit the
environment variables that carry them, and start-up warns about settings
that leave users less separated than they may think (the shared token as a
super-user, users sharing one account without impersonation, secret files
other users can read, checks turned off); the daemon's process is closed to
other processes of its user.
"""

from __future__ import annotations

import json
import os

from twisted.trial.unittest import SynchronousTestCase, TestCase

from egateway.api.authenticators import enabled_authenticators
from egateway.config import build_config
from egateway.ops.posture import posture_warnings
from egateway.store import SecretBox
from tests.support.daemon import start_gateway
from tests.support.wsclient import ChannelsClient

LONG_TOKEN = "x" * 40
SECRET_VARIABLES = ("EG_AUTH_TOKEN", "KG_AUTH_TOKEN", "EG_JWT_SECRET", "EG_STORE_KEY", "EG_STORE_URL")


def write(path: str, text: str, mode: int) -> str:
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    return path


class WarningTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.tokens = write(os.path.join(self.dir, "tokens.toml"), "", 0o600)

    def warnings(self, flags: dict[str, str], config_file: str = "", data_dir: str = "") -> str:
        config = build_config({}, {}, flags)
        methods = enabled_authenticators(config.auth)
        return "\n".join(posture_warnings(config, config_file, data_dir, authenticators=methods))

    def test_shared_token_and_shared_account(self) -> None:
        """
        The shared token beside per-user tokens is named a super-user, and
        per-user authentication without impersonation is said to share one
        account; the shared token alone, or impersonation on, is not.
        """
        both = self.warnings({"auth-token": LONG_TOKEN, "user-tokens-file": self.tokens})
        self.assertIn("super-user", both)
        self.assertIn("impersonation is off", both)
        self.assertIn("connection files", both)
        self.assertEqual(self.warnings({"auth-token": LONG_TOKEN}), "")
        impersonating = self.warnings({"user-tokens-file": self.tokens, "impersonation-enabled": "true"})
        self.assertEqual(impersonating, "")

    def test_weakened_checks(self) -> None:
        """
        A short shared token, JWTs of any audience and JupyterHub tokens of
        any scope are each warned about.
        """
        self.assertIn("is 6 characters long", self.warnings({"auth-token": "s3cret"}))
        jwt = self.warnings({"jwt-secret": LONG_TOKEN, "jwt-any-audience": "true"})
        self.assertIn("jwt_any_audience is on", jwt)
        hub = self.warnings({"jupyterhub-api-url": "http://hub:8081/hub/api", "jupyterhub-scope": ""})
        self.assertIn("jupyterhub_scope is empty", hub)

    def test_metrics_open_or_guessable(self) -> None:
        """
        A metrics listener on an outside interface with no token and no
        networks, and a short metrics token, are each warned about; one on
        loopback, or with networks, is not.
        """
        outside = self.warnings({"metrics-listen": "tcp:9464:interface=0.0.0.0"})
        self.assertIn("serves /metrics to whoever reaches it", outside)
        self.assertIn("serves /metrics", self.warnings({"metrics-listen": "tcp:9464"}))
        self.assertEqual(self.warnings({"metrics-listen": "tcp:9464:interface=127.0.0.1"}), "")
        self.assertEqual(self.warnings({"metrics-listen": "tcp:9464", "metrics-networks": "10.0.0.0/8"}), "")
        self.assertIn("metrics token is 5 characters long", self.warnings({"metrics-token": "short"}))
        self.assertEqual(self.warnings({"metrics-token": LONG_TOKEN}), "")

    def test_files_readable_by_others(self) -> None:
        """
        The config file, the store key, the TLS key and the token file are
        each warned about when group or others may read them, and not when
        they are private.
        """
        config = write(os.path.join(self.dir, "egateway.toml"), "", 0o644)
        write(os.path.join(self.dir, "store.key"), SecretBox.generate_key(), 0o640)
        key = write(os.path.join(self.dir, "tls.key"), "", 0o604)
        os.chmod(self.tokens, 0o644)
        flags = {"user-tokens-file": self.tokens, "impersonation-enabled": "true", "keyfile": key,
                 "certfile": key}
        text = self.warnings(flags, config, self.dir)
        for what, mode in (("config file", "0644"), ("store key file", "0640"), ("TLS private key", "0604"),
                           ("user tokens file", "0644")):
            self.assertIn(f"the {what} ", text)
            self.assertIn(f"(mode {mode})", text)
        for path in (config, key, self.tokens, os.path.join(self.dir, "store.key")):
            os.chmod(path, 0o600)
        self.assertEqual(self.warnings(flags, config, self.dir), "")


class ProcessTests(SynchronousTestCase):
    def test_gateway_process_not_dumpable(self) -> None:
        """
        protect_process makes the process non-dumpable (its memory and
        /proc/<pid>/environ closed to other processes of its user, kernels
        without impersonation among them); run in a child process, so this
        test runner stays as it was.
        """
        from tests.support.snippets import run_snippet

        script = (
            "import ctypes\n"
            "from egateway.ops.posture import protect_process\n"
            "libc = ctypes.CDLL(None)\n"
            "before = libc.prctl(3, 0, 0, 0, 0)\n"
            "done = protect_process()\n"
            "print(before, done, libc.prctl(3, 0, 0, 0, 0))\n"
        )
        result = run_snippet(script, check=False)
        self.assertEqual(result.stdout.split(), ["1", "True", "0"], result.stderr)


class DaemonTests(TestCase):
    timeout = 120

    async def test_secrets_not_inherited_and_warned(self) -> None:
        """
        A real kernel of a real daemon, whose inherited_envs names every
        secret-bearing variable, receives none of them (but the harmless
        one listed with them); the daemon's log warns about the shared
        token, the shared account and the world-readable config file.
        """
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        tokens = write(os.path.join(workdir, "tokens.toml"), "", 0o600)
        config = write(
            os.path.join(workdir, "egateway.toml"), f"[auth]\nuser_tokens_file = {json.dumps(tokens)}\n", 0o644
        )
        token = "posture-t0ken-" + "k" * 32
        env = {
            "KG_AUTH_TOKEN": token,
            "EG_JWT_SECRET": "j" * 40,
            "EG_JWT_AUDIENCE": "egateway",
            "EG_STORE_KEY": SecretBox.generate_key(),
            "EG_STORE_URL": "sqlite:///" + os.path.join(workdir, "kernels.sqlite3"),
            "EG_INHERITED_ENVS": ",".join(("PATH", "HOME", "EG_JWT_AUDIENCE") + SECRET_VARIABLES),
        }
        gateway = await start_gateway(self, token=token, flags={"config": config}, env=env)
        model = await gateway.api.call("POST", "api/kernels", {}, expect=201)
        client = await ChannelsClient.connect(gateway.url, model["id"], token=token)
        try:
            result = await client.execute(
                "import json, os; print(json.dumps(sorted(k for k in os.environ if k.startswith(('EG_', 'KG_')))))"
            )
        finally:
            await client.close()
        seen = set(json.loads(result["stdout"]))
        self.assertIn("EG_JWT_AUDIENCE", seen)
        self.assertEqual(seen & set(SECRET_VARIABLES), set())
        await gateway.api.call("DELETE", f"api/kernels/{model['id']}", expect=204)
        log = gateway.process.log_tail(100_000)
        self.assertIn("the shared token (auth_token) is accepted beside per-user credentials", log)
        self.assertIn("impersonation is off", log)
        self.assertIn(f"the config file {config} is readable by other users (mode 0644)", log)
