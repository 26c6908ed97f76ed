"""
Impersonation: kernels run as the requesting user's OS account.

The checks and the commands each launcher builds, without running
anything; then real kernels as existing Debian accounts (C{nobody}, and
C{bin} where a second user is needed), never accounts created for the
test: local kernels through an in-process gateway running as root, SSH
kernels started through sudo on real sshd hosts, and a Slurm job submitted
for C{nobody} on a real Slurm cluster.

The kernels run Debian's own Python and ipykernel (C{python3-ipykernel}):
the gateway's virtualenv may live where other users cannot reach it.
"""

from __future__ import annotations

import json
import os
import pwd
import stat
import tempfile
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from egateway.clusters.impersonation import (
    Account,
    Impersonation,
    command_template,
    ids_from_id_output,
    prepare_runtime_dir_blocking,
)
from egateway.clusters.interface import LaunchError
from egateway.clusters.slurm_jobs import JobResources, sbatch_arguments
from egateway.clusters.ssh_host import START_SCRIPT, RunAs
from egateway.clusters.sshclient import shell_command
from egateway.config import ConfigError
from egateway.validation import load_config
from tests.fixtures import SlurmCluster, SSHHosts
from tests.fixtures.system import SLURM_PACKAGES, SSH_PACKAGES, require_packages, require_root
from tests.support.gateway import GatewayTestCase, InProcessGateway, pid_alive
from tests.support.remote_kernels import write_spec
from tests.support.wsclient import ChannelsClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(ROOT, "launchers", "python", "launch_ipykernel.py")
USER_PYTHON = "/usr/bin/python3"
"""
Debian's Python: every account can run it, and with python3-ipykernel it
runs kernels.
"""
USER_PACKAGES = ("python3-ipykernel", "python3-jupyter-client", "python3-cryptography", "util-linux")

WHO_AM_I = (
    "import json, os\n"
    "print(json.dumps({'uid': os.getuid(), 'euid': os.geteuid(), 'gid': os.getgid(), "
    "'groups': sorted(os.getgroups()), 'home': os.environ.get('HOME'), 'user': os.environ.get('USER'), "
    "'logname': os.environ.get('LOGNAME'), 'flag': os.environ.get('EG_IMPERSONATION_ENABLED'), "
    "'cwd': os.getcwd()}))"
)


def settings(**overrides: Any) -> Any:
    flags = {key.replace("_", "-"): str(value) for key, value in overrides.items()}
    return load_config({}, {}, flags).impersonation


def expected(name: str) -> dict[str, Any]:
    """
    What a kernel running as account C{name} should report about itself.
    """
    entry = pwd.getpwnam(name)
    return {
        "uid": entry.pw_uid,
        "euid": entry.pw_uid,
        "gid": entry.pw_gid,
        "groups": sorted(set(os.getgrouplist(name, entry.pw_gid))),
        "home": entry.pw_dir,
        "user": name,
        "logname": name,
        "flag": "True",
    }


def public_tempdir(case: Any) -> str:
    """
    A new directory under /tmp that every account may enter (a trial
    temporary directory has a private parent), removed after the test.
    """
    import shutil

    path = tempfile.mkdtemp(prefix="egw-imp-", dir="/tmp")
    os.chmod(path, 0o755)
    case.addCleanup(shutil.rmtree, path, True)
    return path


def shared_dir(path: str) -> str:
    """
    Make C{path} a directory every account may write to (sticky, as
    /tmp), for the kernels' IPython directories and job output.
    """
    os.makedirs(path, exist_ok=True)
    os.chmod(path, 0o1777)
    return path


def remote_argv() -> list[str]:
    return [
        USER_PYTHON, LAUNCHER,
        "--kernel-id", "{kernel_id}",
        "--response-address", "{response_address}",
        "--public-key", "{public_key}",
        "--port-range", "{port_range}",
    ]


async def who_is(url: str, kernel_id: str) -> dict[str, Any]:
    client = await ChannelsClient.connect(url, kernel_id)
    try:
        result = await client.execute(WHO_AM_I)
    finally:
        await client.close()
    return json.loads(result["stdout"])


# -- no kernels ---------------------------------------------------------------


class CheckTests(SynchronousTestCase):
    def test_account_names(self) -> None:
        """
        Only portable account names pass; names that a command would read as
        an option or a uid, or that carry shell syntax, are refused with 403.
        """
        policy = Impersonation(settings(impersonation_enabled="true"))
        for good in ("alice", "bob.smith", "_svc", "a-b_c9"):
            self.assertEqual(policy.check_name(good), good)
        for bad in ("-u", "--help", "1000", "0", "a b", "a;b", "$(id)", "a/b", "", "x" * 65, "Ünï", "a\nb"):
            with self.assertRaises(LaunchError) as caught:
                policy.check_name(bad)
            self.assertEqual(caught.exception.status, 403)
            self.assertIn("not a valid account name", str(caught.exception))

    def test_prohibited_users(self) -> None:
        """
        root is prohibited by default and the list is configurable; the
        refusal names the setting.
        """
        with self.assertRaises(LaunchError) as caught:
            Impersonation(settings(impersonation_enabled="true")).check_name("root")
        self.assertEqual(caught.exception.status, 403)
        self.assertIn("prohibited", str(caught.exception))
        policy = Impersonation(settings(impersonation_enabled="true", prohibited_users="alice,bob"))
        self.assertEqual(policy.check_name("root"), "root")
        with self.assertRaises(LaunchError):
            policy.check_name("bob")

    def test_ids(self) -> None:
        """
        uid 0 and primary gid 0 are always refused, uids below min_uid too;
        each refusal says which rule.
        """
        policy = Impersonation(settings(impersonation_enabled="true", prohibited_users="", min_uid=500))
        policy.check_ids("alice", 1000, 1000)
        policy.check_ids("nobody", 65534, 65534)
        for uid, gid, reason in ((0, 0, "uid is 0"), (1000, 0, "gid 0"), (499, 499, "below min_uid 500")):
            with self.assertRaises(LaunchError) as caught:
                policy.check_ids("x", uid, gid)
            self.assertEqual(caught.exception.status, 403)
            self.assertIn(reason, str(caught.exception))
        Impersonation(settings(min_uid=0)).check_ids("daemon", 1, 1)
        with self.assertRaises(LaunchError):
            Impersonation(settings(min_uid=0)).check_ids("root", 0, 0)

    def test_environment(self) -> None:
        """
        Every kernel gets EG_IMPERSONATION_ENABLED as Enterprise Gateway
        writes it; an impersonated local kernel's HOME, USER and LOGNAME are
        its account's, and a remote one's are left to the remote account.
        """
        env = {"HOME": "/root", "USER": "root", "LOGNAME": "root", "KERNEL_ID": "k"}
        self.assertEqual(Impersonation(settings()).exported(env)["EG_IMPERSONATION_ENABLED"], "False")
        self.assertEqual(Impersonation(settings()).remote_env(env)["HOME"], "/root")
        policy = Impersonation(settings(impersonation_enabled="true"))
        account = Account("alice", 1000, 1000, (1000, 27), "/home/alice", True)
        local = policy.local_env(env, account)
        self.assertEqual(
            {k: local[k] for k in ("HOME", "USER", "LOGNAME", "KERNEL_ID", "EG_IMPERSONATION_ENABLED")},
            {"HOME": "/home/alice", "USER": "alice", "LOGNAME": "alice", "KERNEL_ID": "k",
             "EG_IMPERSONATION_ENABLED": "True"},
        )
        remote = policy.remote_env(env)
        self.assertEqual(remote, {"KERNEL_ID": "k", "EG_IMPERSONATION_ENABLED": "True"})

    def test_sudo_command(self) -> None:
        """
        sudo_command is split like a shell would split it and the user name
        goes in as one argument; settings that cannot work stop start-up.
        """
        policy = Impersonation(settings(impersonation_enabled="true", sudo_command="sudo -n -u {user} -- nice"))
        self.assertEqual(policy.sudo_argv("alice"), ["sudo", "-n", "-u", "alice", "--", "nice"])
        self.assertEqual(command_template("runuser -u '{user}' --"), ("runuser", "-u", "{user}", "--"))
        for bad, why in (("sudo -n --", "{user}"), ("", "must name a command"), ("sudo 'x {user}", "cannot be split")):
            with self.assertRaises(ConfigError) as caught:
                settings(sudo_command=bad)
            self.assertIn("impersonation.sudo_command", str(caught.exception))
            self.assertIn(why, str(caught.exception))
        with self.assertRaises(ConfigError):
            settings(ssh_user_key_file="/etc/egateway/key")
        with self.assertRaises(ConfigError):
            settings(impersonation_runtime_dir="relative/dir")
        with self.assertRaises(ConfigError):
            settings(ssh_impersonation="su")

    def test_ssh_commands(self) -> None:
        """
        In sudo mode the whole start script runs behind sudo for the user,
        every argument quoted; in login mode the gateway logs in as the user
        and runs it directly; without impersonation nothing changes.
        """
        sudo = Impersonation(settings(impersonation_enabled="true"))
        run_as = RunAs.for_user(sudo, "alice")
        self.assertEqual(
            run_as, RunAs(login=None, prefix=("sudo", "-n", "-H", "-E", "-u", "alice", "--"), user="alice")
        )
        self.assertEqual(
            run_as.command(["sh", "-c", START_SCRIPT, "x", "/tmp/log", "env", "A=b c"]),
            "sudo -n -H -E -u alice -- " + shell_command(["sh", "-c", START_SCRIPT, "x", "/tmp/log", "env", "A=b c"]),
        )
        login = Impersonation(settings(impersonation_enabled="true", ssh_impersonation="login"))
        self.assertEqual(RunAs.for_user(login, "alice"), RunAs(login="alice", prefix=(), user="alice"))
        self.assertEqual(login.key_file("alice"), "~alice/.ssh/id_ed25519")
        self.assertEqual(RunAs.for_user(Impersonation(settings()), "root"), RunAs())
        with self.assertRaises(LaunchError):
            RunAs.for_user(sudo, "root")
        with self.assertRaises(LaunchError):
            RunAs.for_user(sudo, "-oProxyCommand=x")

    def test_id_output(self) -> None:
        """
        The uid and gid a host's C{id} reports are what its checks use.
        """
        self.assertEqual(ids_from_id_output("uid=65534(nobody) gid=65534(nogroup) groups=65534(nogroup)\n"),
                         (65534, 65534))
        self.assertIsNone(ids_from_id_output("id: 'x': no such user"))

    def test_sbatch_for_user(self) -> None:
        """
        A job for another user is submitted with its numeric uid and gid.
        """
        account = Account("alice", 1000, 1001, (1001,), "/home/alice", True)
        args = sbatch_arguments(JobResources(), "egateway-k", "/tmp/k.log", "/home/alice", ["python"], account)
        self.assertIn("--uid=1000", args)
        self.assertIn("--gid=1001", args)
        self.assertLess(args.index("--uid=1000"), args.index("/dev/stdin"))
        plain = sbatch_arguments(JobResources(), "egateway-k", "/tmp/k.log", "", ["python"])
        self.assertFalse([a for a in plain if a.startswith(("--uid", "--gid"))])


class RuntimeDirTests(SynchronousTestCase):
    def setUp(self) -> None:
        require_root()
        self.base = public_tempdir(self)

    def test_created_searchable_not_listable(self) -> None:
        """
        The directory for impersonated kernels' files is created with mode
        0711 (parents included), and an existing one is put back to 0711.
        """
        target = os.path.join(self.base, "a", "kernels")
        self.assertEqual(prepare_runtime_dir_blocking(target), os.path.realpath(target))
        for path in (target, os.path.dirname(target)):
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o711)
        os.chmod(target, 0o755)
        prepare_runtime_dir_blocking(target)
        self.assertEqual(stat.S_IMODE(os.stat(target).st_mode), 0o711)

    def test_unreachable_or_foreign(self) -> None:
        """
        A directory under one that others cannot search, or owned by
        someone else, is refused with the reason.
        """
        os.chmod(self.base, 0o700)
        with self.assertRaises(LaunchError) as caught:
            prepare_runtime_dir_blocking(os.path.join(self.base, "kernels"))
        self.assertIn("not searchable by others", str(caught.exception))
        os.chmod(self.base, 0o755)
        foreign = os.path.join(self.base, "foreign")
        os.mkdir(foreign)
        os.chown(foreign, 65534, 65534)
        with self.assertRaises(LaunchError) as caught:
            prepare_runtime_dir_blocking(foreign)
        self.assertIn("belongs to uid 65534", str(caught.exception))
        with self.assertRaises(LaunchError) as caught:
            prepare_runtime_dir_blocking(os.path.join(foreign, "below"))
        self.assertIn("belongs to uid 65534", str(caught.exception))


# -- local kernels --------------------------------------------------------------


class LocalImpersonationTestCase(GatewayTestCase):
    """
    An in-process gateway (running as root) with impersonation on, and a
    kernelspec running Debian's ipykernel; min_uid 2 lets C{bin} (uid 2)
    and C{nobody} in and keeps C{daemon} (uid 1) out.
    """

    timeout = 120
    impersonation = "true"

    async def setUp(self) -> None:
        require_root()
        require_packages(*USER_PACKAGES)
        base = public_tempdir(self)
        self.specs = os.path.join(base, "specs")
        homes = shared_dir(os.path.join(base, "homes"))
        self.files = os.path.join(base, "kernels")
        write_spec(
            self.specs,
            "user",
            [USER_PYTHON, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "local",
            env={"IPYTHONDIR": os.path.join(homes, "ipython-${KERNEL_USERNAME}")},
        )
        self.gateway_settings = {
            "kernelspec_path": self.specs,
            "default_kernel_name": "user",
            "impersonation_enabled": self.impersonation,
            "impersonation_runtime_dir": self.files,
            "min_uid": 2,
            "list_kernels": "true",
            "shutdown_wait": 3,
            "terminate_wait": 3,
        }
        self.addCleanup(self._no_files_left)
        await super().setUp()

    def _no_files_left(self) -> None:
        if os.path.isdir(self.files):
            self.assertEqual(os.listdir(self.files), [], "kernel files outlived the test")

    def process_of(self, kernel_id: str) -> Any:
        return self.gateway.manager.kernels[kernel_id].process

    async def start(self, user: str | None, name: str = "user") -> dict[str, Any]:
        return await self.gateway.start_kernel(name, {"KERNEL_USERNAME": user} if user else None)

    async def refused(self, user: str, gateway: InProcessGateway | None = None) -> str:
        """
        Starting a kernel for C{user} is refused with 403; returns the message.
        """
        gateway = gateway or self.gateway
        code, body = await gateway.request("POST", "api/kernels", {"env": {"KERNEL_USERNAME": user}})
        self.assertEqual(code, 403, body)
        return body["message"]


class LocalKernelTests(LocalImpersonationTestCase):
    async def test_kernel_runs_as_user(self) -> None:
        """
        A kernel for nobody reports nobody's uid, gid and groups (root's
        group is gone), HOME, USER and LOGNAME, and starts in / since
        nobody's home does not exist; its connection and output files are
        nobody's alone, in a directory nobody cannot list.
        """
        model = await self.start("nobody")
        me = await who_is(self.gateway.url, model["id"])
        self.assertEqual({k: v for k, v in me.items() if k != "cwd"}, expected("nobody"))
        self.assertNotIn(0, me["groups"])
        self.assertEqual(me["cwd"], "/")
        process = self.process_of(model["id"])
        self.assertEqual(os.path.dirname(process.connection_file), os.path.realpath(self.files))
        for path in (process.connection_file, process.log.path):
            info = os.stat(path)
            self.assertEqual((info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)), (65534, 65534, 0o600))
        info = os.stat(self.files)
        self.assertEqual((info.st_uid, stat.S_IMODE(info.st_mode)), (0, 0o711))
        self.assertEqual(process.placement.pid, model["placement"]["pid"])
        self.assertEqual(os.stat(f"/proc/{model['placement']['pid']}").st_uid, 65534)

        code, _ = await self.gateway.request("DELETE", f"api/kernels/{model['id']}")
        self.assertEqual(code, 204)
        self.assertFalse(pid_alive(model["placement"]["pid"]))
        self.assertFalse(os.path.exists(process.connection_file))

    async def test_users_cannot_reach_each_other(self) -> None:
        """
        A kernel of nobody can read its own connection file but neither
        list the directory nor read the connection file of bin's kernel.
        """
        mine = await self.start("nobody")
        theirs = await self.start("bin")
        self.assertEqual((await who_is(self.gateway.url, theirs["id"]))["uid"], 2)
        own = self.process_of(mine["id"]).connection_file
        other = self.process_of(theirs["id"]).connection_file
        client = await ChannelsClient.connect(self.gateway.url, mine["id"])
        try:
            result = await client.execute(
                "import json, os\n"
                "def attempt(f):\n"
                "    try:\n"
                "        f(); return 'ok'\n"
                "    except PermissionError:\n"
                "        return 'denied'\n"
                f"print(json.dumps([attempt(lambda: open({own!r}).read()), "
                f"attempt(lambda: os.listdir({os.path.dirname(own)!r})), "
                f"attempt(lambda: open({other!r}).read())]))"
            )
        finally:
            await client.close()
        self.assertEqual(json.loads(result["stdout"]), ["ok", "denied", "denied"])

    async def test_refused_users(self) -> None:
        """
        root (prohibited), daemon (uid 1, below min_uid), an unknown user and
        a name that is no account name are refused with 403 and the reason;
        root stays refused when nobody is prohibited (uid 0); no kernel
        starts.
        """
        self.assertIn("prohibited", await self.refused("root"))
        self.assertIn("below min_uid 2", await self.refused("daemon"))
        self.assertIn("no such account", await self.refused("egw-no-such-user"))
        self.assertIn("not a valid account name", await self.refused("-n"))
        self.assertIn("not a valid account name", await self.refused("0"))
        lax = InProcessGateway(
            kernelspec_path=self.specs, default_kernel_name="user", impersonation_enabled="true",
            impersonation_runtime_dir=self.files, prohibited_users="", min_uid=0,
        )
        await lax.start()
        try:
            self.assertIn("uid is 0", await self.refused("root", lax))
            self.assertEqual(lax.manager.kernels, {})
        finally:
            await lax.stop()
        code, listed = await self.gateway.request("GET", "api/kernels")
        self.assertEqual((code, listed), (200, []))

    async def test_restart_keeps_user(self) -> None:
        """
        A restarted kernel runs as the same user, in a new process.
        """
        model = await self.start("nobody")
        code, restarted = await self.gateway.request("POST", f"api/kernels/{model['id']}/restart")
        self.assertEqual(code, 200, restarted)
        self.assertNotEqual(restarted["placement"]["pid"], model["placement"]["pid"])
        self.gateway.pids.add(restarted["placement"]["pid"])
        self.assertEqual((await who_is(self.gateway.url, model["id"]))["uid"], 65534)


class NoImpersonationTests(LocalImpersonationTestCase):
    impersonation = "false"

    async def test_username_does_not_change_uid(self) -> None:
        """
        Without impersonation, KERNEL_USERNAME=nobody still runs the kernel
        as the gateway's user, with the gateway's HOME, its files in the
        gateway's runtime directory, and EG_IMPERSONATION_ENABLED=False.
        """
        model = await self.start("nobody")
        me = await who_is(self.gateway.url, model["id"])
        self.assertEqual((me["uid"], me["gid"]), (os.getuid(), os.getgid()))
        self.assertEqual(me["home"], os.environ.get("HOME"))
        self.assertEqual(me["flag"], "False")
        process = self.process_of(model["id"])
        self.assertNotEqual(os.path.dirname(process.connection_file), os.path.realpath(self.files))
        self.assertEqual(os.stat(process.connection_file).st_uid, os.getuid())
        self.assertFalse(os.path.exists(self.files))


# -- SSH kernels --------------------------------------------------------------


class SSHImpersonationTestCase(GatewayTestCase):
    """
    One real SSH host (sshd in a network namespace, sharing this machine's
    files and accounts) and a gateway with impersonation on whose
    kernelspec runs launch_ipykernel.py there with Debian's Python.
    """

    timeout = 180
    mode = "sudo"

    async def setUp(self) -> None:
        require_root()
        require_packages(*SSH_PACKAGES, "sudo", *USER_PACKAGES)
        self.ssh = SSHHosts(tempfile.mkdtemp(prefix="egw-", dir="/tmp"), ("h1",))
        self.ssh.up()
        self.addCleanup(self.ssh.down)
        self.addCleanup(self._host_clean)
        self.host = self.ssh.host("h1")
        self.base = public_tempdir(self)
        specs = os.path.join(self.base, "specs")
        homes = shared_dir(os.path.join(self.base, "homes"))
        self.logs = shared_dir(os.path.join(self.base, "logs"))
        write_spec(
            specs, "remote", remote_argv(), "ssh", {"remote_hosts": self.host.ip},
            env={"IPYTHONDIR": os.path.join(homes, "ipython-${KERNEL_USERNAME}")},
        )
        self.gateway_settings = {
            "kernelspec_path": specs,
            "default_kernel_name": "remote",
            "response_ip": self.ssh.bridge_ip,
            "ssh_key_files": self.ssh.client_key_path,
            "ssh_known_hosts": self.ssh.known_hosts_path,
            "remote_user": self.ssh.user,
            "kernel_log_dir": self.logs,
            "impersonation_enabled": "true",
            "ssh_impersonation": self.mode,
            "min_uid": 2,
            "list_kernels": "true",
            "shutdown_wait": 3,
            "terminate_wait": 3,
            "poll_interval": 1,
            **self.more_settings(),
        }
        await super().setUp()

    def more_settings(self) -> dict[str, Any]:
        return {}

    def _host_clean(self) -> None:
        self.assertEqual(self.ssh.pids("h1"), [], "processes left on the host")

    def process_of(self, kernel_id: str) -> Any:
        return self.gateway.manager.kernels[kernel_id].process

    async def check_runs_as_nobody(self, model: dict[str, Any]) -> None:
        """
        The kernel reports nobody's identity and its host's name; its log
        is nobody's alone; an interrupt delivered without the comm port (by
        kill on the host, as the kernel's user) stops a running cell; it
        shuts down leaving nothing on the host.
        """
        me = await who_is(self.gateway.url, model["id"])
        self.assertEqual({k: v for k, v in me.items() if k != "cwd"}, expected("nobody"))
        self.assertIn("as nobody", model["phases"][2]["detail"])
        self.assertEqual(os.stat(f"/proc/{model['placement']['pid']}").st_uid, 65534)
        log = os.stat(os.path.join(self.logs, f"kernel-{model['id']}.log"))
        self.assertEqual((log.st_uid, stat.S_IMODE(log.st_mode)), (65534, 0o600))

        process = self.process_of(model["id"])
        self.assertEqual((await process._check_alive()).alive, True)
        client = await ChannelsClient.connect(self.gateway.url, model["id"])
        try:
            async def interrupt() -> None:
                import signal

                await process._signal_directly(signal.SIGINT)

            reply = await client.interrupted_sleep(interrupt)
            self.assertEqual(reply["ename"], "KeyboardInterrupt")
            self.assertEqual((await client.execute("1 + 1"))["result"]["text/plain"], "2")
        finally:
            await client.close()
        code, _ = await self.gateway.request("DELETE", f"api/kernels/{model['id']}")
        self.assertEqual(code, 204)
        self.assertEqual(self.ssh.pids("h1"), [])


class SSHSudoTests(SSHImpersonationTestCase):
    async def test_kernel_runs_as_user_through_sudo(self) -> None:
        """
        Logged in as root, the gateway starts a kernel for nobody through
        sudo; it runs as nobody on the host (see check_runs_as_nobody).
        """
        model = await self.gateway.start_kernel("remote", {"KERNEL_USERNAME": "nobody"})
        self.assertEqual(model["placement"]["host"], self.host.ip)
        await self.check_runs_as_nobody(model)

    async def test_refused_users(self) -> None:
        """
        root (prohibited) is refused before anything runs; daemon (uid 1 on
        the host, below min_uid) and a user the host does not know are
        refused after the host's id says so; all with 403, nothing starts.
        """
        for user, reason in (
            ("root", "prohibited"),
            ("daemon", f"uid 1 on {self.host.ip} is below min_uid 2"),
            ("egw-no-such-user", f"on {self.host.ip}: the host has no such account"),
        ):
            code, body = await self.gateway.request("POST", "api/kernels", {"env": {"KERNEL_USERNAME": user}})
            self.assertEqual(code, 403, body)
            self.assertIn(reason, body["message"])
        self.assertEqual(self.gateway.manager.kernels, {})
        self.assertEqual(os.listdir(self.logs), [])


class SSHLoginTests(SSHImpersonationTestCase):
    """
    "login" mode: the gateway logs in as the user.  No Debian account but
    root can log in (the others have nologin as their shell), and accounts
    must not be changed on this machine; so a second sshd on the host runs
    in a private mount namespace where /etc/passwd is a copy giving nobody
    /bin/sh.  Only that sshd (and what it starts) sees the copy.  It
    accepts the fixture's client key for every user (from a copy of the
    fixture's authorized_keys that users can read: sshd reads it as the
    user), and that key is nobody's here (ssh_user_key_file).
    """

    mode = "login"
    port = 2222

    def more_settings(self) -> dict[str, Any]:
        keys = os.path.join(self.base, "keys")
        os.makedirs(keys, mode=0o700)
        with open(self.ssh.client_key_path, "rb") as src, open(os.path.join(keys, "nobody"), "wb") as dst:
            dst.write(src.read())
        os.chmod(os.path.join(keys, "nobody"), 0o600)
        self._start_login_sshd()
        return {"ssh_user_key_file": os.path.join(keys, "{user}"), "ssh_port": self.port,
                "ssh_known_hosts": self.known_hosts}

    def _start_login_sshd(self) -> None:
        from tests.fixtures._support import wait_until
        from tests.fixtures.sshhosts import SSHD, _ssh_banner

        host_dir = os.path.join(self.ssh.workdir, "h1")
        passwd = os.path.join(self.base, "passwd")
        with open("/etc/passwd") as f, open(passwd, "w") as out:
            for line in f:
                fields = line.rstrip("\n").split(":")
                if fields[0] == "nobody":
                    fields[6] = "/bin/sh"
                out.write(":".join(fields) + "\n")
        os.chmod(passwd, 0o644)
        authorized = os.path.join(self.base, "authorized_keys")
        with open(self.ssh.client_key_path + ".pub") as src, open(authorized, "w") as dst:
            dst.write(src.read())
        os.chmod(authorized, 0o644)
        config = os.path.join(self.base, "sshd_config")
        with open(os.path.join(host_dir, "sshd_config")) as f, open(config, "w") as out:
            for line in f:
                if line.startswith("AuthorizedKeysFile "):
                    line = f"AuthorizedKeysFile {authorized}\n"
                elif line.startswith("ListenAddress "):
                    line = f"ListenAddress {self.host.ip}:{self.port}\n"
                elif line.startswith("PidFile "):
                    line = f"PidFile {os.path.join(self.base, 'sshd.pid')}\n"
                out.write(line)
        with open(os.path.join(host_dir, "host_ed25519.pub")) as f:
            keytype, key = f.read().split()[:2]
        self.known_hosts = os.path.join(self.base, "known_hosts")
        with open(self.known_hosts, "w") as f:
            f.write(f"[{self.host.ip}]:{self.port} {keytype} {key}\n")
        log = open(os.path.join(self.base, "sshd.log"), "ab")
        self.addCleanup(log.close)
        self.ssh.popen(
            "h1",
            ["unshare", "--mount", "--propagation", "private", "--",
             "sh", "-c", 'mount --bind "$0" /etc/passwd && exec "$1" -D -f "$2" -E "$3"',
             passwd, SSHD, config, os.path.join(self.base, "sshd.log")],
            stdout=log, stderr=log,
        )
        wait_until(lambda: _ssh_banner(self.host.ip, self.port), timeout=10, what="the login sshd",
                   logs=[os.path.join(self.base, "sshd.log")])

    async def test_kernel_runs_as_logged_in_user(self) -> None:
        """
        The gateway logs in as nobody with nobody's key and starts the
        kernel; it runs as nobody (see check_runs_as_nobody), over its own
        pooled connection.
        """
        with open("/etc/passwd") as f:
            self.assertIn("nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin", f.read())
        model = await self.gateway.start_kernel("remote", {"KERNEL_USERNAME": "nobody"})
        launcher = self.gateway.manager.launchers.get("ssh")
        self.assertIn((self.host.ip, "nobody"), launcher.pool._connections)
        self.assertNotIn((self.host.ip, "root"), launcher.pool._connections)
        await self.check_runs_as_nobody(model)

    async def test_user_without_key(self) -> None:
        """
        A user with no key file is refused with 403 naming the user, and
        the host is not held against other users.
        """
        code, body = await self.gateway.request("POST", "api/kernels", {"env": {"KERNEL_USERNAME": "bin"}})
        self.assertEqual(code, 403, body)
        self.assertIn("as bin", body["message"])
        launcher = self.gateway.manager.launchers.get("ssh")
        self.assertFalse(launcher.health.is_down(self.host.ip))
        model = await self.gateway.start_kernel("remote", {"KERNEL_USERNAME": "nobody"})
        self.assertEqual((await who_is(self.gateway.url, model["id"]))["uid"], 65534)


# -- Slurm jobs ---------------------------------------------------------------


class SlurmImpersonationTests(GatewayTestCase):
    """
    A real two-node Slurm cluster (slurmd runs as root, so it can start a
    job as any account) and a gateway submitting kernel jobs for their
    users.
    """

    timeout = 120

    async def setUp(self) -> None:
        require_root()
        require_packages(*SLURM_PACKAGES, *USER_PACKAGES)
        self.slurm = SlurmCluster(tempfile.mkdtemp(prefix="egw-", dir="/tmp"), nodes=2, cpus=2)
        self.slurm.up()
        self.addCleanup(self._slurm_down)
        base = public_tempdir(self)
        specs = os.path.join(base, "specs")
        homes = shared_dir(os.path.join(base, "homes"))
        self.logs = shared_dir(os.path.join(base, "logs"))
        write_spec(
            specs, "slurm", remote_argv(), "slurm", {},
            env={"IPYTHONDIR": os.path.join(homes, "ipython-${KERNEL_USERNAME}")},
        )
        self.gateway_settings = {
            "kernelspec_path": specs,
            "default_kernel_name": "slurm",
            "response_ip": self.slurm.controller_ip,
            "slurm_conf": self.slurm.conf_path,
            "slurm_log_dir": self.logs,
            "slurm_poll_interval": 0.2,
            "impersonation_enabled": "true",
            "min_uid": 2,
            "shutdown_wait": 3,
            "terminate_wait": 3,
            "poll_interval": 0.5,
        }
        await super().setUp()

    def _slurm_down(self) -> None:
        self.slurm.down()
        self.assertEqual(self.slurm.leftovers(), [])

    def jobs(self) -> dict[str, tuple[str, str]]:
        """
        Kernel jobs in any state: C{{job id: (state, user)}}.
        """
        out = self.slurm.run(["squeue", "-h", "-t", "all", "-o", "%i|%T|%u|%j"], check=True).stdout
        rows = [line.split("|") for line in out.splitlines()]
        return {row[0]: (row[1], row[2]) for row in rows if row[3].startswith("egateway-")}

    async def test_job_runs_as_user(self) -> None:
        """
        A kernel for nobody is a Slurm job of nobody's and runs as nobody,
        with nobody's HOME; shutting it down (scancel as root) ends the job.
        """
        model = await self.gateway.start_kernel("slurm", {"KERNEL_USERNAME": "nobody"})
        job_id = model["placement"]["job_id"]
        self.assertEqual(self.jobs()[job_id], ("RUNNING", "nobody"))
        me = await who_is(self.gateway.url, model["id"])
        self.assertEqual({k: v for k, v in me.items() if k != "cwd"}, expected("nobody"))
        self.assertEqual(os.stat(os.path.join(self.logs, f"kernel-{model['id']}.log")).st_uid, 65534)
        code, _ = await self.gateway.request("DELETE", f"api/kernels/{model['id']}")
        self.assertEqual(code, 204)
        from tests.test_slurm import eventually

        await eventually(lambda: self.jobs().get(job_id, ("",))[0] in ("COMPLETED", "CANCELLED", "FAILED", ""),
                         "the job to end", timeout=20)
        self.assertFalse(pid_alive(model["placement"]["pid"]))

    async def test_refused_users(self) -> None:
        """
        root and daemon are refused with 403 and nothing is submitted.
        """
        for user, reason in (("root", "prohibited"), ("daemon", "below min_uid 2")):
            code, body = await self.gateway.request("POST", "api/kernels", {"env": {"KERNEL_USERNAME": user}})
            self.assertEqual(code, 403, body)
            self.assertIn(reason, body["message"])
        self.assertEqual(self.jobs(), {})
