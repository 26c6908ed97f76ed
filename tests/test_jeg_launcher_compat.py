"""
Enterprise Gateway's own Python kernel launcher, unmodified, works against
egateway's response listener and comm-port client.

The launcher is taken from the C{jupyter-enterprise-gateway} source
distribution on PyPI (pinned by version and checksum, cached under
C{$EG_TEST_CACHE} or C{~/.cache/egateway-tests}).  It imports PyCryptodome
(C{Cryptodome}), so C{pycryptodomex} must be installed in the test
environment: it is part of the test extras.  If the distribution cannot be
downloaded the test fails and says so; it never skips.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tarfile

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.internet.defer import TimeoutError
from twisted.trial.unittest import TestCase

from egateway.clusters.comm import CommClient
from egateway.observe import detached
from tests.test_kernel_launcher import KernelHarness, LauncherProcess, group_members, wait_until

JEG_VERSION = "3.3.0"
SDIST = f"jupyter_enterprise_gateway-{JEG_VERSION}.tar.gz"
SDIST_SHA256 = "58d61fef0f30d8010553bf3755c7d205c072383849c416916b37d3ef940725b7"
MEMBER = f"jupyter_enterprise_gateway-{JEG_VERSION}/etc/kernel-launchers/python/scripts/launch_ipykernel.py"
DOWNLOAD_TIMEOUT = 300


class Unavailable(Exception):
    """
    The launcher could not be obtained; the message says why and what to do.
    """


def cache_dir() -> str:
    return os.environ.get("EG_TEST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "egateway-tests")


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 16), b""):
            digest.update(block)
    return digest.hexdigest()


def _extract_blocking(sdist: str, destination: str) -> str:
    """
    Check the distribution's checksum and extract the launcher.
    """
    actual = _sha256(sdist)
    if actual != SDIST_SHA256:
        os.unlink(sdist)
        raise Unavailable(f"{sdist} has sha256 {actual}, expected {SDIST_SHA256}; removed it")
    with tarfile.open(sdist) as archive:
        member = archive.getmember(MEMBER)
        source = archive.extractfile(member)
        assert source is not None
        target = os.path.join(destination, "launch_ipykernel.py")
        with source, open(target, "wb") as out:
            shutil.copyfileobj(source, out)
    return target


async def jeg_launcher(destination: str) -> str:
    """
    The path of Enterprise Gateway's unmodified launch_ipykernel.py, copied
    into C{destination}; downloads the source distribution if not cached.
    """
    cache = cache_dir()
    sdist = os.path.join(cache, SDIST)
    if not os.path.exists(sdist):
        os.makedirs(cache, exist_ok=True)
        staging = os.path.join(cache, f"download-{os.getpid()}")
        os.makedirs(staging, exist_ok=True)
        try:
            argv = [
                "-m", "pip", "download", f"jupyter-enterprise-gateway=={JEG_VERSION}",
                "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check", "-d", staging,
            ]
            pip = LauncherProcess()
            reactor.spawnProcess(pip, sys.executable, [sys.executable, *argv], env=dict(os.environ))
            try:
                code, _ = await detached(pip.ended).addTimeout(DOWNLOAD_TIMEOUT, reactor)
            except TimeoutError:
                pip.transport.signalProcess("KILL")
                await pip.ended
                raise Unavailable(
                    f"downloading {SDIST} from PyPI took over {DOWNLOAD_TIMEOUT}s; this test "
                    f"needs network access to PyPI or the file in {cache}"
                ) from None
            downloaded = os.path.join(staging, SDIST)
            if code != 0 or not os.path.exists(downloaded):
                raise Unavailable(
                    f"could not download {SDIST} from PyPI (pip exited {code}); this test needs "
                    f"network access to PyPI or the file in {cache}:\n" + pip.tail()[-2000:]
                )
            os.replace(downloaded, sdist)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return await deferToThread(_extract_blocking, sdist, destination)


class EnterpriseGatewayLauncherTests(TestCase):
    timeout = DOWNLOAD_TIMEOUT + 180

    async def test_unmodified_launcher(self) -> None:
        """
        Enterprise Gateway's launch_ipykernel.py, launched with the
        arguments of its sample kernelspecs, reports version 1 connection
        info to our listener; the kernel executes code, is interrupted
        through our comm client, and shuts down leaving nothing behind.
        """
        try:
            import Cryptodome  # noqa: F401
        except ImportError:
            self.fail("pycryptodomex is not installed: Enterprise Gateway's launcher needs it (test extras)")
        harness = KernelHarness(self)
        try:
            script = await jeg_launcher(harness.workdir)
        except Unavailable as e:
            self.fail(str(e))
        with open(script, encoding="utf-8") as f:
            self.assertIn("from Cryptodome.Cipher import AES, PKCS1_v1_5", f.read())
        kernel_id = "6c6f3e2a-1111-4d3c-9f00-0a0b0c0d0e0f"
        # The operator turned version 1 on (KernelHarness's listener) and the
        # kernelspec runs Enterprise Gateway's launcher; it reports from here.
        pending = harness.listener.expect(kernel_id, accept_v1=True, hosts=["127.0.0.1"])
        argv = [
            shutil.which("setsid") or "setsid",  # its own process group, as a remote shell gives it
            sys.executable,
            script,
            "--RemoteProcessProxy.kernel-id", kernel_id,
            "--RemoteProcessProxy.response-address", harness.listener.response_address,
            "--RemoteProcessProxy.public-key", harness.listener.public_key,
            "--RemoteProcessProxy.port-range", "0..0",
            "--RemoteProcessProxy.spark-context-initialization-mode", "none",
        ]
        harness.spawn(argv, token=pending.token)  # a token in the env must not confuse it
        info = await harness.receive(pending)
        self.assertEqual(pending.version, 1)
        self.assertEqual(info["kernel_id"], kernel_id)
        self.assertEqual(info["ip"], "0.0.0.0")  # the gateway substitutes the host's address
        self.assertEqual(info["pid"], harness.process.pid)

        await harness.connect("127.0.0.1")
        reply, outputs = await harness.execute("import os\nos.getpid(), sum(range(10))")
        self.assertEqual(reply["status"], "ok")
        self.assertEqual(outputs, [f"({info['pid']}, 45)"])

        comm = CommClient(reactor, "127.0.0.1", info["comm_port"], kernel_id=kernel_id, token=pending.comm_token)
        self.assertEqual(comm.version, 1)
        self.assertTrue(await comm.alive())
        reply = await harness.interrupt_sleep(comm)
        self.assertEqual((reply["status"], reply.get("ename")), ("error", "KeyboardInterrupt"))

        pgid = info["pgid"]
        self.assertEqual(pgid, info["pid"])
        code, signum = await harness.shut_down(comm, timeout=90)
        self.assertEqual((code, signum), (0, None), harness.process.tail())
        await wait_until(lambda: not group_members(pgid), 10, f"process group {pgid} to empty")
        self.assertFalse(await comm.alive())
        self.assertEqual(sorted(os.listdir(harness.workdir)), ["ipython", "launch_ipykernel.py"])
