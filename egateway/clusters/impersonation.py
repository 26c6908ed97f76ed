"""
Running kernels as the user who asked for them (impersonation).

With C{impersonation_enabled}, a kernel runs as its user's OS account
instead of the gateway's:

  - a local kernel is started by the gateway (which must then run as root)
    with the account's uid, primary gid and supplementary groups, and
    C{HOME}, C{USER} and C{LOGNAME} from the account; its connection and
    output files are the user's alone (see L{prepare_runtime_dir_blocking});
  - an SSH kernel starts through C{sudo_command} after the gateway logs in
    as its service account, or after logging in as the user with the
    user's key (C{ssh_impersonation}); its host supplies the account's
    environment;
  - a Slurm job is submitted for the user (C{sbatch --uid --gid}, the
    gateway running as root).

Before any of that, the same checks refuse a launch with 403 and say why:
the name must be a portable POSIX account name (it becomes one argument
of sudo, ssh or sbatch, so no leading dash and no all-digit name that
tools would read as a uid); names in C{prohibited_users} never run; uid 0
and primary gid 0 never run; uids below C{min_uid} (system accounts)
never run.  Account lookups go through NSS, which may ask LDAP or SSSD
over the network, so they run in a thread.

Every kernel, impersonated or not, gets C{EG_IMPERSONATION_ENABLED}
(C{"True"} or C{"False"}) as Enterprise Gateway exports it, for
kernelspecs whose own scripts act on it.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shlex
import stat
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from twisted.internet.defer import Deferred

from egateway.clusters.interface import LaunchError

USERNAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}\Z")
"""
A portable account name: letters, digits, C{_ . -}, starting with a
letter or underscore (never a dash, never all digits), at most 64
characters.
"""

ACCOUNT_ENV = ("HOME", "USER", "LOGNAME")
"""
Variables that describe the account a process runs as; an impersonated
kernel takes them from its user's account, never from the gateway.
"""

EXPORTED = "EG_IMPERSONATION_ENABLED"


class ImpersonationSetupError(ValueError):
    """
    An impersonation setting cannot work (the message says why).
    """


def command_template(text: str) -> tuple[str, ...]:
    """
    The argv of a command prefix such as C{sudo -n -H -E -u {user} --},
    split as a shell would split it (it is never run by one).

    @raise ImpersonationSetupError: empty, unbalanced quotes, or no
        C{{user}} placeholder.
    """
    try:
        argv = tuple(shlex.split(text))
    except ValueError as e:
        raise ImpersonationSetupError(f"{text!r} cannot be split into arguments: {e}") from None
    if not argv:
        raise ImpersonationSetupError("must name a command, e.g. sudo -n -H -E -u {user} --")
    if not any("{user}" in arg for arg in argv):
        raise ImpersonationSetupError(f"{text!r} does not contain {{user}}")
    return argv


@dataclass(frozen=True)
class Account:
    """
    A local OS account, as NSS reported it.

    @ivar groups: every group id the account's processes carry, the
        primary one included (as C{initgroups(3)} sets them).
    @ivar home_exists: whether C{home} is a directory (C{/nonexistent} is
        a common home of service accounts).
    """

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str
    home_exists: bool


def lookup_account_blocking(name: str) -> Account:
    """
    Resolve C{name} through NSS (blocking: may ask a directory service).

    @raise LaunchError: 403, no such account.
    """
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise LaunchError(
            f"cannot run the kernel as {name!r}: there is no such account on the gateway host", status=403
        ) from None
    try:
        groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
    except OSError as e:
        raise LaunchError(f"cannot look up the groups of {name!r}: {e}") from None
    return Account(
        name=entry.pw_name,
        uid=entry.pw_uid,
        gid=entry.pw_gid,
        groups=groups,
        home=entry.pw_dir,
        home_exists=os.path.isdir(entry.pw_dir),
    )


def group_name_blocking(gid: int) -> str:
    """
    The name of group C{gid}, or the number when it has none.
    """
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


class Impersonation:
    """
    The impersonation settings and the checks every launcher applies.
    """

    def __init__(self, settings: Any = None) -> None:
        """
        @param settings: an L{egateway.config.ImpersonationConfig}, or
            C{None} (impersonation off).
        """
        self.enabled: bool = bool(settings is not None and settings.impersonation_enabled)
        self.prohibited: frozenset[str] = frozenset(settings.prohibited_users if settings is not None else ("root",))
        self.min_uid: int = settings.min_uid if settings is not None else 1000
        self.ssh_mode: str = settings.ssh_impersonation if settings is not None else "sudo"
        self.sudo_template: tuple[str, ...] = command_template(
            settings.sudo_command if settings is not None else "sudo -n -H -E -u {user} --"
        )
        self.user_key_file: str = settings.ssh_user_key_file if settings is not None else "~{user}/.ssh/id_ed25519"
        self.runtime_dir: str = settings.impersonation_runtime_dir if settings is not None else "/run/egateway/kernels"

    # -- checks -------------------------------------------------------------

    def check_name(self, username: str) -> str:
        """
        @return: C{username}, which may be impersonated as far as its name
            tells.
        @raise LaunchError: 403, not an account name or a prohibited user.
        """
        if not isinstance(username, str) or not USERNAME.match(username):
            raise LaunchError(
                f"cannot run the kernel as {str(username)[:64]!r}: not a valid account name (letters, digits, "
                "_ . -, starting with a letter or _)",
                status=403,
            )
        if username in self.prohibited:
            raise LaunchError(
                f"cannot run the kernel as {username!r}: the user is prohibited (prohibited_users)", status=403
            )
        return username

    def check_ids(self, username: str, uid: int, gid: int, where: str = "") -> None:
        """
        @param where: C{" on host"} to say whose account database spoke.
        @raise LaunchError: 403, uid 0, gid 0 or a uid below C{min_uid}.
        """
        if uid == 0:
            reason = "its uid is 0 (root)"
        elif gid == 0:
            reason = "its primary group is gid 0 (root)"
        elif uid < self.min_uid:
            reason = f"its uid {uid}{where} is below min_uid {self.min_uid} (a system account)"
        else:
            return
        raise LaunchError(f"cannot run the kernel as {username!r}: {reason}", status=403)

    async def local_account(self, run_blocking: Callable[..., Deferred[Any]], username: str) -> Account:
        """
        The checked local account of C{username}.

        @param run_blocking: runs the passwd lookup in the gateway's pool
            (L{egateway.clusters.interface.LauncherContext.run_blocking}).

        @raise LaunchError: 403, refused (see the module docstring).
        """
        self.check_name(username)
        account: Account = await run_blocking(lookup_account_blocking, username)
        self.check_ids(account.name, account.uid, account.gid)
        return account

    # -- what launchers build -------------------------------------------------

    def sudo_argv(self, username: str) -> list[str]:
        """
        C{sudo_command} for C{username} (already checked): each element
        stays one argument.
        """
        return [arg.replace("{user}", username) for arg in self.sudo_template]

    def key_file(self, username: str) -> str:
        """
        The path of C{username}'s SSH key, C{~user} not yet expanded.
        """
        return self.user_key_file.replace("{user}", username)

    def exported(self, env: Mapping[str, str]) -> dict[str, str]:
        """
        C{env} with C{EG_IMPERSONATION_ENABLED}, as every kernel gets it.
        """
        return {**env, EXPORTED: "True" if self.enabled else "False"}

    def local_env(self, env: Mapping[str, str], account: Account) -> dict[str, str]:
        """
        An impersonated kernel's environment on this host: the account's
        C{HOME}, C{USER} and C{LOGNAME} replace the gateway's.
        """
        return {**self.exported(env), "HOME": account.home, "USER": account.name, "LOGNAME": account.name}

    def remote_env(self, env: Mapping[str, str]) -> dict[str, str]:
        """
        A kernel's environment for another host: without the gateway's
        account variables when impersonating, so the remote account's own
        (set by sshd or sudo) apply.
        """
        exported = self.exported(env)
        if self.enabled:
            for name in ACCOUNT_ENV:
                exported.pop(name, None)
        return exported


def prepare_runtime_dir_blocking(path: str) -> str:
    """
    Make C{path} ready to hold impersonated kernels' files: a directory of
    the gateway's user with mode 0711, so each kernel's user reaches the
    files it is given by name (each its own, mode 0600) but can neither
    list the directory nor create, replace or remove anything in it.

    Missing directories are created (mode 0711).  Every directory above
    must be searchable by all, and none may be writable by others (unless
    sticky), or a user could swap the path under the gateway.

    @return: the resolved path.
    @raise LaunchError: the path cannot serve (the message says which part
        and why).
    """
    target = os.path.realpath(path)
    parts = target.strip("/").split("/") if target != "/" else []
    current = "/"
    for index, part in enumerate([""] + parts):
        if part:
            current = os.path.join(current, part)
        last = index == len(parts)
        try:
            info = os.lstat(current)
        except FileNotFoundError:
            try:
                os.mkdir(current, 0o711)
                os.chmod(current, 0o711)
            except OSError as e:
                raise LaunchError(f"cannot create impersonation_runtime_dir {current}: {e.strerror}") from None
            info = os.lstat(current)
        if not stat.S_ISDIR(info.st_mode):
            raise LaunchError(f"impersonation_runtime_dir: {current} is not a directory")
        mode = stat.S_IMODE(info.st_mode)
        if last:
            if info.st_uid != os.geteuid():
                raise LaunchError(
                    f"impersonation_runtime_dir {current} belongs to uid {info.st_uid}, not to the gateway's "
                    f"uid {os.geteuid()}; remove it or choose another directory"
                )
            if mode != 0o711:
                os.chmod(current, 0o711)
            break
        if not mode & stat.S_IXOTH:
            raise LaunchError(
                f"impersonation_runtime_dir {target}: users cannot reach it because {current} (mode "
                f"{mode:04o}) is not searchable by others; choose a directory whose parents are"
            )
        if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
            raise LaunchError(f"impersonation_runtime_dir {target}: {current} is writable by everyone")
        if info.st_uid not in (0, os.geteuid()):
            raise LaunchError(
                f"impersonation_runtime_dir {target}: {current} belongs to uid {info.st_uid}, who could "
                "replace what lies below it"
            )
    return target


def open_private_blocking(path: str, flags: int, account: Account) -> int:
    """
    Open (creating) C{path} for the gateway and give it to C{account}
    alone: owner C{account}, mode 0600.  Symbolic links are not followed.

    @return: the file descriptor.
    @raise OSError: as C{os.open}.
    """
    fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchown(fd, account.uid, account.gid)
        os.fchmod(fd, 0o600)
    except OSError:
        os.close(fd)
        raise
    return fd


def ids_from_id_output(text: str) -> tuple[int, int] | None:
    """
    The uid and gid in the output of C{id} (C{uid=65534(nobody)
    gid=65534(nogroup) groups=...}), or C{None}.
    """
    uid = re.search(r"\buid=(\d+)", text)
    gid = re.search(r"\bgid=(\d+)", text)
    if uid is None or gid is None:
        return None
    return int(uid.group(1)), int(gid.group(1))


__all__ = [
    "ACCOUNT_ENV",
    "Account",
    "EXPORTED",
    "Impersonation",
    "ImpersonationSetupError",
    "USERNAME",
    "command_template",
    "group_name_blocking",
    "ids_from_id_output",
    "lookup_account_blocking",
    "open_private_blocking",
    "prepare_runtime_dir_blocking",
]
