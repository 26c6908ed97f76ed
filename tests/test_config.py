"""
Configuration: precedence of the sources, Enterprise Gateway's environment
names, and start-up errors that name the key.
"""

from __future__ import annotations

import os
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from egateway.config import ConfigError, build_config, describe, load_toml, settings
from egateway.tap import Options
from egateway.validation import load_config


def toml_file(test: SynchronousTestCase, text: str) -> str:
    fd, path = tempfile.mkstemp(suffix=".toml")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    test.addCleanup(os.unlink, path)
    return path


class PrecedenceTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """
        With no source, the documented defaults apply.
        """
        config = build_config({}, {}, {})
        self.assertEqual(config.listen_endpoint, "tcp:8888:interface=127.0.0.1")
        self.assertEqual(config.kernels.launch_timeout, 30.0)
        self.assertTrue(config.auth.list_kernels)

    def test_file_then_env_then_flags(self) -> None:
        """
        The environment overrides the file and flags override both.
        """
        path = toml_file(self, "[kernels]\nmax_kernels = 3\nlaunch_timeout = 12\n[auth]\nlist_kernels = false\n")
        values = load_toml(path)
        config = build_config(values, {}, {})
        self.assertEqual((config.kernels.max_kernels, config.kernels.launch_timeout), (3, 12.0))
        config = build_config(values, {"EG_MAX_KERNELS": "5"}, {})
        self.assertEqual(config.kernels.max_kernels, 5)
        config = build_config(values, {"EG_MAX_KERNELS": "5"}, {"max-kernels": "7"})
        self.assertEqual(config.kernels.max_kernels, 7)
        self.assertFalse(config.auth.list_kernels)

    def test_enterprise_gateway_names(self) -> None:
        """
        Enterprise Gateway's variables are honoured, with KG_ fallbacks and
        the old allow-list names.
        """
        env = {
            "EG_IP": "0.0.0.0",
            "EG_PORT": "9999",
            "EG_AUTH_TOKEN": "t",
            "EG_ALLOW_ORIGIN": "*",
            "KG_LIST_KERNELS": "False",
            "EG_DEFAULT_KERNEL_NAME": "python3",
            "EG_CULL_IDLE_TIMEOUT": "600",
            "EG_CULL_INTERVAL": "60",
            "EG_CULL_CONNECTED": "false",
            "EG_CULL_BUSY": "yes",
            "EG_KERNEL_LAUNCH_TIMEOUT": "45",
            "EG_ENV_PROCESS_WHITELIST": "PATH,SPARK_HOME",
            "EG_ENV_WHITELIST": "FOO,BAR",
        }
        config = build_config({}, env, {})
        self.assertEqual(config.listen_endpoint, "tcp:9999:interface=0.0.0.0")
        self.assertEqual(config.auth.auth_token, "t")
        self.assertEqual(config.auth.allow_origin, "*")
        self.assertFalse(config.auth.list_kernels)
        self.assertEqual(config.culling.cull_idle_timeout, 600)
        self.assertTrue(config.culling.cull_busy)
        self.assertFalse(config.culling.cull_connected)
        self.assertEqual(config.kernels.launch_timeout, 45)
        self.assertEqual(config.kernels.inherited_envs, ["PATH", "SPARK_HOME"])
        self.assertEqual(config.kernels.client_envs, ["FOO", "BAR"])
        self.assertEqual(config.kernels.default_kernel_name, "python3")

    def test_required_names_exist(self) -> None:
        """
        Every environment variable the issue lists maps to a setting.
        """
        names = {name for info in settings() for name in info.env}
        for required in (
            "EG_IP EG_PORT EG_AUTH_TOKEN EG_ALLOW_ORIGIN EG_LIST_KERNELS EG_DEFAULT_KERNEL_NAME "
            "EG_MAX_KERNELS EG_CULL_IDLE_TIMEOUT EG_CULL_INTERVAL EG_CULL_CONNECTED EG_CULL_BUSY "
            "EG_KERNEL_LAUNCH_TIMEOUT EG_ENV_PROCESS_WHITELIST EG_ENV_WHITELIST EG_INHERITED_ENVS"
        ).split():
            self.assertIn(required, names)

    def test_untaken_environment(self) -> None:
        """
        EG_*/KG_* variables no setting takes are named, with their
        replacement where there is one; taken ones, other names and those
        passed on to kernels (inherited_envs) are not.
        """
        from egateway.legacy_env import untaken_environment

        environ = {
            "EG_SSL_VERSION": "x",
            "EG_MAX_KERNELS": "3",
            "KG_SEED_URI": "nb.ipynb",
            "EG_SITE_FLAG": "1",
            "PATH": "/usr/bin",
        }
        self.assertEqual(
            untaken_environment(environ, ["EG_SITE_FLAG"]),
            ["EG_SSL_VERSION (use tls_min_version (EG_TLS_MIN_VERSION))", "KG_SEED_URI"],
        )

    def test_flags_are_unique(self) -> None:
        """
        Every setting has its own command-line flag.
        """
        flags = [info.flag for info in settings()]
        self.assertEqual(len(flags), len(set(flags)))

    def test_secrets_masked(self) -> None:
        """
        The auth token never appears in the logged configuration.
        """
        described = describe(build_config({}, {"EG_AUTH_TOKEN": "hunter2"}, {}))
        self.assertNotIn("hunter2", repr(described))

    def test_base_url_normalised(self) -> None:
        """
        A relative base URL becomes absolute with one trailing slash.
        """
        self.assertEqual(build_config({}, {"EG_BASE_URL": "fake/path"}, {}).server.base_url, "/fake/path/")


class ErrorTests(SynchronousTestCase):
    def test_unknown_key(self) -> None:
        """
        An unknown key in the file stops start-up, naming it.
        """
        path = toml_file(self, "[kernels]\nmax_kernel = 3\n")
        error = self.assertRaises(ConfigError, load_toml, path)
        self.assertIn("kernels.max_kernel", str(error))

    def test_unknown_section(self) -> None:
        """
        An unknown section is named too.
        """
        path = toml_file(self, "[kernel]\nmax_kernels = 3\n")
        self.assertIn("[kernel]", str(self.assertRaises(ConfigError, load_toml, path)))

    def test_bad_values(self) -> None:
        """
        Values of the wrong type or out of range name the key and the source.
        """
        error = self.assertRaises(ConfigError, build_config, {}, {"EG_MAX_KERNELS": "lots"}, {})
        self.assertIn("kernels.max_kernels (EG_MAX_KERNELS)", str(error))
        error = self.assertRaises(ConfigError, build_config, {}, {"EG_LIST_KERNELS": "maybe"}, {})
        self.assertIn("auth.list_kernels", str(error))
        error = self.assertRaises(ConfigError, build_config, {"kernels": {"launch_timeout": "x"}}, {}, {})
        self.assertIn("kernels.launch_timeout (config file)", str(error))
        error = self.assertRaises(ConfigError, build_config, {}, {}, {"max-kernels": "-1"})
        self.assertIn("--max-kernels", str(error))
        error = self.assertRaises(ConfigError, load_config, {}, {"EG_PORT_RANGE": "10..20"}, {})
        self.assertIn("kernels.port_range", str(error))

    def test_malformed_toml(self) -> None:
        """
        A file that is not TOML is reported with its path.
        """
        path = toml_file(self, "[kernels\n")
        self.assertIn(path, str(self.assertRaises(ConfigError, load_toml, path)))

    def test_options_report_errors(self) -> None:
        """
        The twistd options print a configuration error naming the key and
        exit with status 2.
        """
        import io
        import sys

        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        error = self.assertRaises(SystemExit, Options().parseOptions, ["--launch-timeout", "soon"])
        self.assertEqual(error.code, 2)
        self.assertIn("kernels.launch_timeout", stderr.getvalue())

    def test_options_run_the_layers_checks(self) -> None:
        """
        The twistd options run each layer's check of its section (here the
        clusters layer's of the port range, the store's of its URL), so a
        value the layer would refuse stops start-up with the key named.
        """
        import io
        import sys

        refused = ((["--port-range", "10..20"], "kernels.port_range"), (["--store-url", "mongodb://h/x"], "store.store_url"))
        for flags, key in refused:
            stderr = io.StringIO()
            self.patch(sys, "stderr", stderr)
            error = self.assertRaises(SystemExit, Options().parseOptions, flags)
            self.assertEqual(error.code, 2)
            self.assertIn(key, stderr.getvalue())


class LeafTests(SynchronousTestCase):
    def test_loading_imports_no_layer(self) -> None:
        """
        Reading, building and describing a configuration imports no other
        part of the gateway: the configuration is a leaf every layer may
        use, and its values' meanings are checked by their layers.
        """
        import json

        from tests.support.snippets import run_snippet

        script = (
            "import json, sys\n"
            "from egateway.config import build_config, describe, help_text, reference_markdown\n"
            "config = build_config({'store': {'store_url': 'redis://h/0'}, 'profiles': {'p': {}}},"
            " {'EG_PORT_RANGE': '20000..20100'}, {'authenticators': 'token', 'auth-token': 'x' * 32})\n"
            "describe(config); help_text(); reference_markdown()\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('egateway.'))))\n"
        )
        loaded = json.loads(run_snippet(script).stdout)
        self.assertEqual([m for m in loaded if not m.startswith("egateway.config")], [])
