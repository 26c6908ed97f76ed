"""
The back-end fixtures bring up real SSH hosts, a real Slurm cluster and a real Redis, and leave nothing behind.

These tests block (subprocesses, sockets): they check the fixtures themselves, not gateway code, and every wait in
them is bounded. Fixtures come up per test because trial does not call setUpClass/tearDownClass.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from twisted.trial import unittest

from tests.fixtures import system
from tests.fixtures._network import link_exists, netns_exists
from tests.fixtures._processes import is_alive
from tests.fixtures.redis import RedisSentinelGroup, RedisServer
from tests.fixtures.slurm import SlurmCluster
from tests.fixtures.sshhosts import SSHHosts


def _workdir() -> str:
    # Short and absolute: unix sockets live below it. The fixture's down() removes it.
    return tempfile.mkdtemp(prefix="egw-", dir="/tmp")


def _poll(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def _read_line(host: str, port: int) -> str | None:
    try:
        with socket.create_connection((host, port), timeout=2) as s:
            s.settimeout(2)
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(256)
                if not chunk:
                    break
                data += chunk
            return data.decode().strip() or None
    except OSError:
        return None


def _refused(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


# A one-shot TCP server: binds the given address (or this namespace's first non-loopback address), answers
# "<label> <address> <hostname>" to each connection.
SERVER = r"""
import socket, subprocess, sys
label, addr, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if addr == "auto":
    addr = subprocess.check_output(["hostname", "-I"], text=True).split()[0]
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((addr, port))
s.listen(8)
while True:
    c, _ = s.accept()
    c.sendall(f"{label} {addr} {socket.gethostname()}\n".encode())
    c.close()
"""


class SSHHostsTests(unittest.TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.hosts = SSHHosts(_workdir(), names=("h1", "h2"))
        # Cleanups run last-in first-out: down() first, then the check that it left nothing.
        self.addCleanup(lambda: self.assertEqual(self.hosts.leftovers(), []))
        self.addCleanup(self.hosts.down)
        self.hosts.up()

    def _ssh(self, ip: str, command: str, known_hosts: str | None = None) -> subprocess.CompletedProcess[str]:
        """
        The OpenSSH client with explicit options (no config file), as a gateway would call it.
        """
        return subprocess.run(
            ["ssh", "-i", self.hosts.client_key_path, "-o", "IdentitiesOnly=yes",
             "-o", f"UserKnownHostsFile={known_hosts or self.hosts.known_hosts_path}",
             "-o", "GlobalKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=yes",
             "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "-F", "/dev/null",
             f"{self.hosts.user}@{ip}", command],
            capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL,
        )

    def test_ssh_reaches_each_host(self) -> None:
        """
        Each host answers ssh with the fixture's key under strict host-key checking, with its own hostname and
        address.
        """
        self.assertEqual([h.name for h in self.hosts.hosts], ["h1", "h2"])
        self.assertEqual(len({h.ip for h in self.hosts.hosts}), 2)
        for host in self.hosts.hosts:
            result = self._ssh(host.ip, "hostname; echo $SSH_CONNECTION; ip -4 -o addr show dev eth0")
            self.assertEqual(result.returncode, 0, result.stderr)
            hostname, connection, addr = result.stdout.splitlines()
            self.assertEqual(hostname, host.hostname)
            self.assertEqual(connection.split()[0], self.hosts.bridge_ip)
            self.assertEqual(connection.split()[2], host.ip)
            self.assertIn(f" {host.ip}/24 ", addr)
            via_config = subprocess.run(self.hosts.ssh_argv(host.name, "hostname"), capture_output=True,
                                        text=True, timeout=20, stdin=subprocess.DEVNULL)
            self.assertEqual((via_config.returncode, via_config.stdout.strip()), (0, host.hostname))

    def test_strict_host_key_checking_rejects_wrong_key(self) -> None:
        """A known_hosts entry with another host's key makes ssh refuse, so the keys in known_hosts are real."""
        h1, h2 = self.hosts.hosts
        with open(self.hosts.known_hosts_path) as f:
            h2_key = next(line for line in f if line.startswith(h2.ip + ",")).split(" ", 1)[1]
        wrong = os.path.abspath(self.mktemp())
        with open(wrong, "w") as f:
            f.write(f"{h1.ip} {h2_key}")
        result = self._ssh(h1.ip, "true", known_hosts=wrong)
        self.assertEqual(result.returncode, 255)
        self.assertIn("Host key verification failed", result.stderr)
        self.assertEqual(self._ssh(h1.ip, "true").returncode, 0)

    def test_server_in_namespace_reachable_from_root_namespace(self) -> None:
        """A TCP server bound to a host's address inside its namespace is reachable from the gateway's namespace."""
        h1, h2 = self.hosts.hosts
        # Same port on both hosts: each namespace has its own port space.
        servers = [self.hosts.popen(h.name, [sys.executable, "-c", SERVER, h.name, h.ip, "52001"]) for h in (h1, h2)]
        for host in (h1, h2):
            reply = _poll(lambda: _read_line(host.ip, 52001), 10, f"server on {host.name}")
            self.assertEqual(reply, f"{host.name} {host.ip} {host.hostname}")
        self.assertIn(servers[0].pid, self.hosts.pids("h1"))
        self.assertNotIn(servers[0].pid, self.hosts.pids("h2"))
        self.assertEqual(self.hosts.run("h1", ["hostname"]).stdout.strip(), "h1")

    def test_stop_and_start_sshd(self) -> None:
        """
        Stopping a host's sshd refuses connections on that host only; starting it again restores ssh with the same
        host key.
        """
        h1, h2 = self.hosts.hosts
        self.hosts.stop_sshd("h1")
        self.assertTrue(_refused(h1.ip, 22))
        self.assertEqual(self._ssh(h2.ip, "true").returncode, 0)
        self.hosts.start_sshd("h1")
        result = self._ssh(h1.ip, "hostname")
        self.assertEqual((result.returncode, result.stdout.strip()), (0, "h1"), result.stderr)

    def test_down_removes_everything(self) -> None:
        """
        down() kills processes started over ssh, removes namespaces, veths, bridge and work directory, and can run
        twice.
        """
        h1 = self.hosts.hosts[0]
        result = self._ssh(h1.ip, "nohup sleep 300 >/dev/null 2>&1 </dev/null & echo $!")
        sleeper = int(result.stdout.strip())
        self.assertIn(sleeper, self.hosts.pids("h1"))
        names = [h.netns for h in self.hosts.hosts]
        bridge = self.hosts.bridge
        self.assertTrue(self.hosts.leftovers())  # while up, everything is still there
        self.hosts.down()
        self.assertEqual(self.hosts.leftovers(), [])
        self.assertFalse(is_alive(sleeper))
        self.assertFalse(any(netns_exists(n) for n in names))
        self.assertFalse(link_exists(bridge))
        self.assertFalse(os.path.exists(self.hosts.workdir))
        self.hosts.down()
        self.assertEqual(self.hosts.leftovers(), [])

    def test_two_sets_of_hosts_coexist(self) -> None:
        """A second fixture at the same time gets its own subnet, bridge and namespaces, and both work."""
        other = SSHHosts(_workdir(), names=("h1",))
        self.addCleanup(other.down)
        other.up()
        self.assertNotEqual(other.bridge_ip, self.hosts.bridge_ip)
        self.assertNotEqual(other.hosts[0].netns, self.hosts.hosts[0].netns)
        for hosts in (other, self.hosts):
            result = subprocess.run(hosts.ssh_argv("h1", "hostname"), capture_output=True, text=True,
                                    timeout=20, stdin=subprocess.DEVNULL)
            self.assertEqual((result.returncode, result.stdout.strip()), (0, "h1"), result.stderr)
        other.down()
        self.assertEqual(other.leftovers(), [])
        self.assertEqual(self.hosts.run("h1", ["true"]).returncode, 0)


class SlurmClusterTests(unittest.TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.out = tempfile.mkdtemp(prefix="egw-out-", dir="/tmp")  # job output files
        self.addCleanup(shutil.rmtree, self.out)
        self.slurm = SlurmCluster(_workdir(), nodes=2, cpus=2)
        self.addCleanup(lambda: self.assertEqual(self.slurm.leftovers(), []))
        self.addCleanup(self.slurm.down)
        self.slurm.up()

    def _sbatch(self, *args: str) -> str:
        result = self.slurm.run(["sbatch", "--parsable", "-o", f"{self.out}/%j.out", *args])
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout.strip().split(";")[0]

    def test_jobs_run_on_each_node_and_scancel_stops_them(self) -> None:
        """
        Two full-node jobs land on different nodes, each binds its node's address reachably from the root namespace,
        and scancel ends them.
        """
        self.assertEqual(self.slurm.partition, "debug")
        wrap = f'exec {shlex.quote(sys.executable)} -c {shlex.quote(SERVER)} "$SLURMD_NODENAME" auto 52001'
        jobs = [self._sbatch("-c", "2", "--wrap", wrap) for _ in range(2)]
        placed = {job: self.slurm.wait_for_job(job, ["RUNNING"])[1] for job in jobs}
        self.assertEqual(sorted(placed.values()), ["n1", "n2"])
        for job, node_name in placed.items():
            node = self.slurm.node(node_name)
            reply = _poll(lambda: _read_line(node.ip, 52001), 10, f"job {job} on {node_name}")
            self.assertEqual(reply.split()[:2], [node_name, node.ip])
        self.slurm.run(["scancel", *jobs], check=True)
        for job, node_name in placed.items():
            self.assertEqual(self.slurm.wait_for_job(job, ["CANCELLED"])[0], "CANCELLED")
            node = self.slurm.node(node_name)
            _poll(lambda: _refused(node.ip, 52001), 10, f"job {job}'s server to go")

    def test_down_cancels_jobs_and_leaves_nothing(self) -> None:
        """
        down() cancels a running job, waits for its processes, stops all daemons and removes namespaces and files;
        twice is fine.
        """
        job = self._sbatch("--wrap", "sleep 300")
        self.slurm.wait_for_job(job, ["RUNNING"])
        names = [n.netns for n in self.slurm.nodes]
        bridge = self.slurm.bridge
        # RUNNING comes a moment before the batch script has started its child.
        _poll(lambda: any("sleep 300" in item for item in self.slurm.leftovers()), 10, "the job's sleep to start")
        self.slurm.down()
        self.assertEqual(self.slurm.leftovers(), [])
        self.assertFalse(any(netns_exists(n) for n in names))
        self.assertFalse(link_exists(bridge))
        self.slurm.down()
        self.assertEqual(self.slurm.leftovers(), [])


def _redis(port: int, *args: str) -> bytes:
    """
    Send one command in RESP and return the raw reply (simple and bulk replies only).
    """
    request = f"*{len(args)}\r\n".encode() + b"".join(f"${len(a)}\r\n{a}\r\n".encode() for a in args)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.settimeout(5)
        s.sendall(request)
        data = b""
        while True:
            chunk = s.recv(4096)
            data += chunk
            if not chunk or (data.endswith(b"\r\n") and (not data.startswith(b"$") or data.count(b"\r\n") >= 2
                                                         or data.startswith(b"$-1"))):
                return data


class RedisServerTests(unittest.TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.redis = RedisServer(_workdir())
        self.addCleanup(lambda: self.assertEqual(self.redis.leftovers(), []))
        self.addCleanup(self.redis.down)
        self.redis.up()

    def test_ping_set_get(self) -> None:
        """The server answers PING, SET and GET on its loopback port."""
        self.assertEqual(self.redis.url, f"redis://127.0.0.1:{self.redis.port}/0")
        self.assertEqual(_redis(self.redis.port, "PING"), b"+PONG\r\n")
        self.assertEqual(_redis(self.redis.port, "SET", "k", "v1"), b"+OK\r\n")
        self.assertEqual(_redis(self.redis.port, "GET", "k"), b"$2\r\nv1\r\n")

    def test_stop_and_start_keep_the_port(self) -> None:
        """stop() makes the port refuse connections; start() serves again on the same port, empty (no persistence)."""
        port = self.redis.port
        _redis(port, "SET", "k", "v1")
        self.redis.stop()
        self.assertTrue(_refused("127.0.0.1", port))
        self.redis.start()
        self.assertEqual(self.redis.port, port)
        self.assertEqual(_redis(port, "GET", "k"), b"$-1\r\n")
        self.redis.stop(kill=True)
        self.assertTrue(_refused("127.0.0.1", port))
        self.redis.start()
        self.assertEqual(_redis(port, "PING"), b"+PONG\r\n")

    def test_down_leaves_nothing(self) -> None:
        """down() stops the server and removes its directory; twice is fine."""
        pid = self.redis.pid
        self.assertTrue(self.redis.leftovers())
        self.redis.down()
        self.assertEqual(self.redis.leftovers(), [])
        self.assertFalse(is_alive(pid))
        self.redis.down()


class RedisSentinelGroupTests(unittest.TestCase):
    timeout = 60

    def test_up_and_down(self) -> None:
        """A primary with a replica in sync and three sentinels naming it; down() leaves nothing behind."""
        group = RedisSentinelGroup(_workdir())
        self.addCleanup(group.down)
        group.up()
        primary = group.primary()
        self.assertIs(primary, group.servers[0])
        self.assertEqual(primary.command("ROLE")[0], b"master")
        self.assertEqual(group.servers[1].command("ROLE")[0], b"slave")
        self.assertTrue(group.url.startswith("redis+sentinel://127.0.0.1:"))
        self.assertTrue(group.leftovers())
        group.down()
        self.assertEqual(group.leftovers(), [])
        self.assertFalse(os.path.exists(group.workdir))


class SystemPackagesTests(unittest.SynchronousTestCase):
    def test_missing_package_names_the_install_line(self) -> None:
        """A missing package is an error naming the apt-get line that installs it, not a skip."""
        with self.assertRaises(system.MissingSystemPackages) as caught:
            system.require_packages("openssh-client", "egw-no-such-package")
        self.assertEqual(caught.exception.missing, ["egw-no-such-package"])
        self.assertIn("apt-get install -y --no-install-recommends egw-no-such-package", str(caught.exception))

    def test_fixture_packages_are_installed(self) -> None:
        """Every package the fixtures need is installed on this machine (CI runs .ci/install-system-packages)."""
        system.require_packages(*system.SSH_PACKAGES, *system.SLURM_PACKAGES, *system.REDIS_PACKAGES)
