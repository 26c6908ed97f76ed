"""
The processes the SSH launcher starts on its hosts, over its SSH pool:
starting the kernel-side launcher (L{START_SCRIPT}), checking that it still
runs and signalling it, telling how it died (the end of its log), and the
inventory's part, finding what of this gateway runs on a host and reaping
it.  The scripts are in L{egateway.clusters.ssh_host}; which host to use
is L{egateway.clusters.ssh_placement}'s business.

The gateway signals only what it started: the process the start script
reports (detached with C{setsid}, so it leads its own session and process
group), whose start time (C{/proc/<pid>/stat}) the script reports too.
Every signal, liveness check and group check first checks on the host that
the process under that pid still has that start time (a record without one:
that its environment carries the kernel's C{KERNEL_ID}), so a pid reused
after the kernel ended is never signalled.  The C{pid} and C{pgid} a
launcher puts in its connection info are not used for any of this: anyone
who can forge a payload could name another process group (or C{-1}).

Every kernel started here carries the gateway installation's id in its
environment (C{EGATEWAY_ID}).  The inventory runs one fixed Python script
on each host (the gateway id its only argument, checked first) that lists
the processes in the login's network namespace whose environment carries
that id, by C{KERNEL_ID}.  What it finds can be reaped (its process groups
are killed, its log removed) but not adopted: the kernel's connection key
is known only to the gateway that started it.  It sees the processes the
login user may read: with impersonation, only a root login sees the users'
kernels.
"""

from __future__ import annotations

import signal as signals
from typing import Any, Callable, Mapping

from twisted.logger import Logger

from egateway.clusters.impersonation import Impersonation, ids_from_id_output
from egateway.clusters.interface import LaunchError
from egateway.clusters.remote import kernel_log, wait_until, with_log_tail
from egateway.clusters.ssh_host import (
    INVENTORY_SCRIPT,
    START_SCRIPT,
    RemoteKernelFound,
    RunAs,
    StartedProcess,
    checked_kill_argv,
    kill_argv,
    parse_inventory,
    start_input,
)
from egateway.clusters.sshclient import CommandResult, SSHAuthError, SSHError, SSHPool, shell_command

_log = Logger()


class HostProcesses:
    """
    Kernel-side launchers on SSH hosts, reached through C{pool}, their
    output in C{log_dir} on each host.
    """

    def __init__(self, pool: SSHPool, clock: Any, impersonation: Impersonation, log_dir: str) -> None:
        self.pool = pool
        self._clock = clock
        self._impersonation = impersonation
        self._log_dir = log_dir

    def log(self, kernel_id: str) -> str:
        return kernel_log(self._log_dir, kernel_id)

    async def start(
        self, host: str, run_as: RunAs, kernel_id: str, argv: list[str], token: str, env: Mapping[str, str]
    ) -> StartedProcess:
        """
        Start C{argv} detached on C{host} with the token and C{env} on the
        start script's stdin.

        @raise LaunchError: 403, the user's key is refused or the user may
            not run a kernel there.
        @raise SSHError: the host cannot start it (try another one).
        """
        try:
            if run_as.user:
                await self._check_account(host, run_as)
            command = run_as.command(["sh", "-c", START_SCRIPT, "egateway-launch", self.log(kernel_id), *argv])
            result = await self.pool.run(
                host, command, stdin=start_input(token, env), timeout=30, user=run_as.login
            )
        except SSHAuthError as e:
            if run_as.login is None:
                raise
            # The user's key is at fault, not the host.
            raise LaunchError(f"cannot log in to {host} as {run_as.login}: {e}", status=403) from None
        if not result.ok:
            raise SSHError(f"starting the kernel failed: {result.describe()}")
        try:
            return StartedProcess.parse(result.stdout)
        except (ValueError, IndexError):
            raise SSHError(f"the host did not report a pid: {result.describe()}") from None

    async def _check_account(self, host: str, run_as: RunAs) -> None:
        """
        The kernel's user must have an account on C{host} that may be
        impersonated.

        @raise LaunchError: 403, no such account or a refused uid/gid.
        @raise SSHError: the host cannot be asked.
        """
        result = await self.pool.run(
            host, shell_command(["id", "--", run_as.user]), timeout=15, user=run_as.login
        )
        ids = ids_from_id_output(result.stdout.decode("utf-8", "replace")) if result.ok else None
        if ids is None:
            raise LaunchError(
                f"cannot run the kernel as {run_as.user!r} on {host}: the host has no such account "
                f"({result.describe()})",
                status=403,
            )
        self._impersonation.check_ids(run_as.user, ids[0], ids[1], where=f" on {host}")

    async def kill(
        self,
        host: str,
        run_as: RunAs,
        kernel_id: str,
        pid: int,
        start_time: str,
        signum: int,
        group: bool = True,
        timeout: float = 15,
    ) -> CommandResult:
        """
        The checked kill (L{checked_kill_argv}) on C{host}: signal 0 checks.
        """
        argv = checked_kill_argv(signum, pid, kernel_id, start_time, group)
        return await self.pool.run(host, run_as.command(argv), timeout=timeout, user=run_as.login)

    async def exited(self, host: str, run_as: RunAs, kernel_id: str, process: StartedProcess) -> str | None:
        """
        C{None} while the launcher runs on C{host} (or the host cannot be
        asked); otherwise how it ended, with the end of its log.
        """
        try:
            result = await self.kill(host, run_as, kernel_id, process.pid, process.start_time, 0, group=False)
        except SSHError:
            return None
        if result.ok:
            return None
        log = self.log(kernel_id)
        tail = await self.pool.run(host, run_as.command(["tail", "-n", "5", log]), timeout=15, user=run_as.login)
        explanation = f"the kernel launcher on {host} exited before sending connection info"
        return with_log_tail(explanation, f"log {host}:{log}", tail.stdout.decode("utf-8", "replace"))

    async def kill_quietly(self, host: str, run_as: RunAs, kernel_id: str, process: StartedProcess) -> None:
        """
        SIGTERM, then SIGKILL, to what a failed launch started.
        """
        for signum in (signals.SIGTERM, signals.SIGKILL):
            try:
                await self.kill(host, run_as, kernel_id, process.pid, process.start_time, signum, timeout=10)
            except SSHError:
                return

    # -- the inventory's part ---------------------------------------------

    async def find(
        self, hosts: list[str], gateway_id: str, python: str, stopped: Callable[[], bool]
    ) -> list[RemoteKernelFound]:
        """
        The kernels of C{gateway_id} (checked) running on C{hosts}; a host
        that cannot be asked is skipped (the next reconciliation asks again).
        """
        command = shell_command([python, "-c", INVENTORY_SCRIPT, gateway_id])
        found: list[RemoteKernelFound] = []
        for host in hosts:
            if stopped():
                # The pool is closed: asking would open a connection again.
                break
            try:
                result = await self.pool.run(host, command, timeout=30)
            except SSHError as e:
                _log.warn(
                    "cannot list this gateway's kernels on {host}: {error}; trying again at the next reconciliation",
                    host=host,
                    error=str(e),
                )
                continue
            if not result.ok:
                _log.warn(
                    "cannot list this gateway's kernels on {host}: {error}", host=host, error=result.describe()
                )
                continue
            found += parse_inventory(host, result.stdout)
        return found

    async def reap(self, kernel: RemoteKernelFound, terminate_wait: float) -> None:
        """
        SIGTERM to the kernel's process groups, SIGKILL after
        C{terminate_wait} to what is left, then its log file goes.

        @raise LaunchError: the host could not be reached, or processes
            outlived SIGKILL.
        """
        host = kernel.host
        remaining = list(kernel.pgids)

        async def gone() -> bool:
            nonlocal remaining
            remaining = [pgid for pgid in remaining if await self._group_alive(host, pgid)]
            return not remaining

        try:
            for signum, wait in ((signals.SIGTERM, terminate_wait), (signals.SIGKILL, 5.0)):
                for pgid in remaining:
                    await self.pool.run(host, shell_command(kill_argv(signum, f"-{pgid}")), timeout=15)
                if await wait_until(self._clock, gone, wait, 0.25):
                    break
            if remaining:
                raise LaunchError(
                    f"processes of kernel {kernel.kernel_id} on {host} outlived SIGKILL (groups {remaining})"
                )
            await self.pool.run(host, shell_command(["rm", "-f", "--", self.log(kernel.kernel_id)]), timeout=15)
        except SSHError as e:
            raise LaunchError(f"cannot reach {host} to stop kernel {kernel.kernel_id}: {e}") from None

    async def _group_alive(self, host: str, pgid: int) -> bool:
        result = await self.pool.run(host, shell_command(kill_argv(0, f"-{pgid}")), timeout=15)
        return result.ok


__all__ = ["HostProcesses"]
