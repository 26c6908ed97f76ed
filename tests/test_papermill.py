"""
papermill running a notebook on a real egateway daemon, the way its users
can today: papermill's nbclient engine given jupyter_server's
C{GatewayKernelManager} as its kernel manager, with the gateway's address in
C{JUPYTER_GATEWAY_URL}.

papermill runs in a child process: it drives its own asyncio loop and
blocks while it does.
"""

from __future__ import annotations

import json
import os
import sys

from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from tests.support.daemon import start_gateway

RUN_PAPERMILL = """
import sys

import papermill
from jupyter_server.gateway.managers import GatewayKernelManager

papermill.execute_notebook(
    sys.argv[1], sys.argv[2], parameters={"x": 21}, kernel_manager_class=GatewayKernelManager
)
"""


def write_notebook(path: str) -> None:
    import nbformat

    parameters = nbformat.v4.new_code_cell("x = 1")
    parameters.metadata["tags"] = ["parameters"]
    notebook = nbformat.v4.new_notebook(
        cells=[
            parameters,
            nbformat.v4.new_code_cell("import os\nprint(x * 2, os.environ.get('KERNEL_GATEWAY'))"),
        ],
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
    )
    nbformat.write(notebook, path)


class PapermillTests(TestCase):
    timeout = 120

    async def test_papermill_runs_a_notebook_on_the_gateway(self) -> None:
        """
        papermill injects its parameters, runs every cell on a kernel the
        gateway starts (KERNEL_GATEWAY=1 in its environment), writes the
        outputs, and the kernel is shut down afterwards.
        """
        gateway = await start_gateway(self)
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        source, result = os.path.join(workdir, "in.ipynb"), os.path.join(workdir, "out.ipynb")
        write_notebook(source)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER_", "JPY_", "KERNEL_"))}
        env.update(
            JUPYTER_GATEWAY_URL=gateway.url,
            JUPYTER_PLATFORM_DIRS="1",
            JUPYTER_CONFIG_DIR=os.path.join(workdir, "config"),
            JUPYTER_DATA_DIR=os.path.join(workdir, "data"),
            JUPYTER_RUNTIME_DIR=os.path.join(workdir, "runtime"),
        )
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-c", RUN_PAPERMILL, source, result], env=env, path=workdir, reactor=reactor
        )
        self.assertEqual(code, 0, (out + err).decode("utf-8", "replace")[-3000:])
        with open(result) as f:
            executed = json.load(f)
        outputs = [output for cell in executed["cells"] for output in cell.get("outputs", [])]
        self.assertEqual(["".join(o["text"]) for o in outputs if o["output_type"] == "stream"], ["42 1\n"])
        self.assertEqual(executed["metadata"]["papermill"]["parameters"], {"x": 21})
        launched = [line for line in open(gateway.process.log_path) if "audit kernel.launch" in line]
        self.assertEqual(len(launched), 1)
        self.assertEqual(await gateway.api.call("GET", "api/kernels"), [])
        self.assertEqual(gateway.kernel_processes(), [])
