"""
The namespaces the Kubernetes launcher makes for kernels.

With C{kubernetes_namespace_mode} C{user} each user's kernels go to a
namespace of their own (C{kubernetes_namespace_prefix} and the user name
as a DNS label), with C{kernel} each kernel's pod gets a namespace of its
own, deleted with the kernel; otherwise every kernel goes to
C{kubernetes_namespace}.  A namespace the gateway made gets a RoleBinding
of C{kubernetes_kernel_cluster_role} for its kernels' service account, and
is used once that service account has a token (pods cannot be created in it
before).

Every API call blocks, so each runs through the launcher's C{call} (its own
thread pool), never on the reactor.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from egateway.clusters.interface import LaunchError
from egateway.clusters.kube_api import api_error
from egateway.clusters.kube_pods import USER_LABEL, dns_label, label_value

_log = Logger()

NAMESPACE_READY = 20.0
"""
Seconds a new namespace's service account may take to get its token.
"""


class KernelNamespaces:
    """
    Chooses, creates, binds and deletes kernels' namespaces for one
    launcher, remembering the ones already usable.

    @ivar client: the L{egateway.clusters.kube_api.KubeClient} (its
        C{*_blocking} calls).
    """

    def __init__(
        self, reactor: IReactorTime, settings: Any, client: Any, call: Callable[..., Deferred[Any]]
    ) -> None:
        """
        @param settings: the launcher's C{kubernetes} config section.
        @param call: runs a blocking function in the launcher's thread
            pool; a Deferred of its result.
        """
        self._reactor = reactor
        self._settings = settings
        self.client = client
        self._call = call
        self._ready: set[str] = set()

    def choose(self, asked: str, username: str, pod: str) -> tuple[str, bool]:
        """
        The namespace of a kernel whose kernelspec asks for C{asked} (or
        nothing), and whether it is the kernel's own (deleted with it).
        """
        if asked:
            return asked, False
        prefix = self._settings.kubernetes_namespace_prefix
        mode = self._settings.kubernetes_namespace_mode
        if mode == "user":
            return (prefix + (dns_label(username) or "anonymous"))[:63].strip("-"), False
        if mode == "kernel":
            return (prefix + pod)[:63].strip("-"), True
        return self._settings.kubernetes_namespace, False

    async def ensure(self, namespace: str, username: str, service_account: str) -> None:
        """
        A per-user namespace, created on first use (with the RoleBinding of
        C{kubernetes_kernel_cluster_role} for its kernels' service account),
        once pods may be created in it (its service account has a token).

        @raise LaunchError: it cannot be created, or stays unusable.
        """
        if namespace in self._ready:
            return
        labels = {"app": "egateway", "component": "kernel-namespace"}
        if label_value(username):
            labels[USER_LABEL] = username
        try:
            created, ours = await self._call(self.client.ensure_namespace_blocking, namespace, labels)
            if created:
                _log.info("created namespace {namespace} for the kernels of {user}", namespace=namespace,
                          user=username)
            role = self._settings.kubernetes_kernel_cluster_role
            if ours and role:
                # Also in a namespace a gateway made earlier: one whose binding failed gets it now.
                await self._bind(namespace, role, service_account)
            deadline = self._reactor.seconds() + NAMESPACE_READY
            while not await self._call(self.client.service_account_ready_blocking, namespace, service_account):
                if self._reactor.seconds() >= deadline:
                    raise LaunchError(
                        f"service account {service_account!r} of namespace {namespace} has no token after "
                        f"{NAMESPACE_READY:.0f}s: is the controller-manager running?"
                    )
                await deferLater(self._reactor, 0.2, lambda: None)
        except (CancelledError, LaunchError):
            raise
        except Exception as e:
            raise LaunchError(f"cannot create namespace {namespace} for {username!r}: {api_error(e)}") from None
        self._ready.add(namespace)

    async def _bind(self, namespace: str, role: str, service_account: str) -> None:
        """
        The RoleBinding of ClusterRole C{role} to C{service_account} in
        C{namespace}.

        @raise LaunchError: refused, naming the right the gateway lacks.
        """
        try:
            if await self._call(self.client.bind_blocking, namespace, role, service_account):
                _log.info("bound ClusterRole {role} to service account {account} in namespace {namespace}",
                          role=role, account=service_account, namespace=namespace)
        except CancelledError:
            raise
        except Exception as e:
            raise LaunchError(
                f"cannot bind ClusterRole {role!r} to service account {service_account!r} in namespace "
                f"{namespace}: {api_error(e)}; give the gateway the bind verb on that ClusterRole "
                "(etc/kubernetes/rbac-per-user.yaml) or set kubernetes_kernel_cluster_role "
                "(EG_KERNEL_CLUSTER_ROLE) empty"
            ) from None

    async def delete(self, namespace: str) -> None:
        """
        Delete a kernel's own namespace (with everything in it); a failure
        is logged, not raised: the kernel is gone either way.
        """
        self._ready.discard(namespace)
        try:
            await self._call(self.client.delete_namespace_blocking, namespace)
        except CancelledError:
            raise
        except Exception as e:
            _log.warn("cannot delete namespace {namespace}: {error}; delete it by hand", namespace=namespace,
                      error=api_error(e))


__all__ = ["NAMESPACE_READY", "KernelNamespaces"]
