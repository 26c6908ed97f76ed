"""
Which host an SSH kernel goes to: the hosts a kernelspec allows (a
client's C{KERNEL_REMOTE_HOST} may pin one of them, never another host),
the load balancer's choice among those that are not backed off
(L{egateway.clusters.balancing}), the next host when one cannot start the
kernel (at most once per host), the addresses the hosts resolve to, and
the hosts this launcher has used, where the inventory looks for leftovers.
Nothing here opens a connection: the launcher's start step is handed in.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Mapping, Sequence, TypeVar

from twisted.internet.error import DNSLookupError

from egateway.clusters.balancing import HostHealth, balancer
from egateway.clusters.interface import LaunchError, LaunchRequest
from egateway.clusters.remote import resolve_address
from egateway.clusters.sshclient import SSHError

T = TypeVar("T")


def split_hosts(value: Any) -> list[str]:
    """
    A kernelspec's C{remote_hosts}: a comma-separated string or a list.
    """
    if isinstance(value, str):
        return [h.strip() for h in value.split(",") if h.strip()]
    if isinstance(value, list):
        return [str(h).strip() for h in value if str(h).strip()]
    return []


class HostPlacement:
    """
    The SSH launcher's hosts: the configured pool (C{remote_hosts}), their
    health and back-off, the balancer's count of kernels per host.
    """

    def __init__(self, reactor: Any, settings: Any) -> None:
        self._reactor = reactor
        self._configured = list(settings.remote_hosts)
        self.balancer = balancer(settings.load_balancing_algorithm)
        self.health = HostHealth(reactor, settings.host_backoff, settings.host_backoff_max)
        self._used: set[str] = set()
        self._addresses: dict[str, str] = {}

    def hosts_for(self, request: LaunchRequest) -> list[str]:
        """
        The spec's C{remote_hosts}, else the configured ones; a client's
        C{KERNEL_REMOTE_HOST} may pin one of them (never another host).

        @raise LaunchError: a pinned host outside the allowed list.
        """
        hosts = split_hosts(request.config.get("remote_hosts")) or list(self._configured)
        pinned = request.env.get("KERNEL_REMOTE_HOST")
        if pinned:
            if pinned not in hosts:
                raise LaunchError(
                    f"KERNEL_REMOTE_HOST {pinned!r} is not one of this kernelspec's hosts", status=400
                )
            hosts = [pinned]
        if not hosts:
            raise LaunchError("no remote hosts are configured (remote_hosts, EG_REMOTE_HOSTS)")
        return hosts

    def inventory_hosts(self, hints: Sequence[Mapping[str, Any]] = ()) -> list[str]:
        """
        Where kernels of this gateway may run: the hosts of each kernelspec
        (C{hints}; the configured ones for a kernelspec naming none, or
        when no kernelspec names this launcher), and any this launcher has
        used.
        """
        hosts: list[str] = []
        for config in hints or [{}]:
            hosts += split_hosts(config.get("remote_hosts")) or list(self._configured)
        hosts += sorted(self._used)
        return list(dict.fromkeys(hosts))

    async def address(self, host: str) -> str:
        """
        The address C{host} resolves to (resolved once).
        """
        address = self._addresses.get(host)
        if address is None:
            address = self._addresses[host] = await resolve_address(self._reactor, host)
        return address

    def used(self, host: str) -> None:
        """
        A kernel of this gateway may run on C{host}: the inventory looks there.
        """
        self._used.add(host)

    def placed(self, host: str) -> None:
        self.used(host)
        self.balancer.placed(host)

    def released(self, host: str) -> None:
        self.balancer.released(host)

    async def first_working(self, hosts: list[str], start: Callable[[str], Awaitable[T]]) -> tuple[str, T]:
        """
        C{start} on the balancer's choice of C{hosts}, then on the next one
        while a host cannot be reached (it is marked down), each at most once.

        @raise LaunchError: 503, no host could start it.
        """
        tried: list[str] = []
        failures: list[str] = []
        while True:
            candidates = [h for h in self.health.up(hosts) if h not in tried]
            if not candidates:
                down = [h for h in hosts if h not in tried and self.health.is_down(h)]
                detail = "; ".join(failures + [f"{h}: backed off after earlier failures" for h in down])
                raise LaunchError(f"no remote host could start the kernel ({detail})", status=503)
            host = self.balancer.choose(candidates)
            tried.append(host)
            try:
                started = await start(host)
            except (SSHError, DNSLookupError) as e:
                failures.append(f"{host}: {e}")
                self.health.failed(host, str(e))
                continue
            self.health.succeeded(host)
            return host, started


__all__ = ["HostPlacement", "split_hosts"]
