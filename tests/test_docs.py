"""
The README stays true: its configuration reference is the one the code
declares, and its test command is what CI runs.
"""

from __future__ import annotations

import os
import subprocess

from twisted.trial.unittest import SynchronousTestCase

from egateway.clusters.registry import BUILTIN
from egateway.config import reference_markdown

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


class ReadmeTests(SynchronousTestCase):
    def test_configuration_reference(self) -> None:
        """
        The README's table lists every setting exactly as declared (refresh
        it with the output of `python -m egateway.config`).
        """
        text = readme()
        start = text.index("<!-- config-reference:start -->\n") + len("<!-- config-reference:start -->\n")
        end = text.index("<!-- config-reference:end -->")
        self.assertEqual(text[start:end], reference_markdown())

    def test_ci_runs_the_readme_test_command(self) -> None:
        """
        .ci/run extracts the README's test command, which runs trial.
        """
        script = open(os.path.join(ROOT, ".ci", "run")).read()
        self.assertIn("<!-- test-command -->", script)
        command = subprocess.run(
            ["awk", r"/<!-- test-command -->/{found=1; next} found && /^```bash/{getline; print; exit}", "README.md"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        self.assertIn("twisted.trial", command)
        self.assertIn("install-system-packages", command)


class ExampleFilesTests(SynchronousTestCase):
    def test_example_config_names_every_setting(self) -> None:
        """
        etc/egateway.toml shows every setting; uncommented, it is a valid
        configuration.
        """
        import re
        import tomllib

        from egateway.config import build_config, settings

        text = open(os.path.join(ROOT, "etc", "egateway.toml")).read()
        uncommented = "\n".join(
            line[2:] if re.match(r"^# \w+ = ", line) else line for line in text.splitlines()
        )
        values = tomllib.loads(uncommented)
        self.assertEqual(
            {(s, k) for s, keys in values.items() for k in keys},
            {(info.section, info.name) for info in settings()},
        )
        build_config(values, {}, {})

    def test_example_kernelspecs_load(self) -> None:
        """
        Every kernelspec in etc/kernelspecs loads and names a known launcher.
        """
        import json

        from egateway.kernels.specs import KernelSpec

        root = os.path.join(ROOT, "etc", "kernelspecs")
        names = sorted(os.listdir(root))
        self.assertTrue(names)
        for name in names:
            with open(os.path.join(root, name, "kernel.json")) as f:
                spec = KernelSpec.from_json(name, os.path.join(root, name), json.load(f))
            self.assertIn(spec.launcher_name, BUILTIN)
