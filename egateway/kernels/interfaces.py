"""
What the kernel manager needs of persistence and of sharing, and what its
parts (admission, launching, restarts, shutdown) need of it.

The manager is given both through its constructor and uses only what these
protocols name, so it can be tested with small fakes and neither part can
come to depend on the manager's insides.  Both are built from the manager
(they follow its kernels), hence the factories: the manager calls them once,
while it is constructed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Protocol

if TYPE_CHECKING:
    from egateway.clusters.interface import IKernelProcess
    from egateway.clusters.registry import LauncherRegistry
    from egateway.config import KernelsConfig
    from egateway.kernels.kernel import Kernel
    from egateway.kernels.policy import TenancyPolicy
    from egateway.kernels.specs import KernelSpecCatalog
    from egateway.store.interface import KernelRecord
    from egateway.wire.channels import IChannelFactory


class IKernelPersistence(Protocol):
    """
    Kernels recorded in a store (L{egateway.kernels.persistence.KernelPersistence}).
    """

    store: Any
    """
    The L{egateway.store.interface.IKernelStore}; its C{shared} says whether
    other gateways use it too.
    """

    shared: bool

    @property
    def keeps_kernels(self) -> bool:
        """
        Whether a graceful stop leaves kernels running for the next gateway.
        """

    async def start(self) -> None:
        """
        Open the store and restore the kernels it records.
        """

    async def stop(self) -> None:
        """
        Write what is unsaved and close the store.
        """

    async def keep_all(self) -> None:
        """
        Save every kernel's record for the next gateway.
        """

    async def admit(self, kernel: Kernel) -> None:
        """
        Write a new kernel's first record; raises if it cannot be written
        (the kernel is then not launched).
        """


class IKernelSharing(Protocol):
    """
    Kernels shared with other gateways through one store
    (L{egateway.kernels.sharing.SharedKernels}).
    """

    async def attach(self, kernel_id: str) -> Kernel:
        """
        Attach to a kernel another gateway started.
        """

    async def records(self) -> list[KernelRecord]:
        """
        Every kernel's record, other gateways' included.
        """

    def equip(self, kernel: Kernel) -> None:
        """
        Give a kernel held here what failover needs.
        """

    async def leased(self, name: str, kernel: Kernel, step: Callable[..., Any], *args: Any) -> Any:
        """
        Run C{step(kernel, *args)}, operation C{name}, holding the kernel's
        lease, so two gateways never act on one kernel at once.
        """


class IKernelPools(Protocol):
    """
    Warm pools (L{egateway.kernels.pools.KernelPools}): kernels started
    ahead that a start request can take.
    """

    async def serve(self, request: Any, spec: Any, caller: Any, profile: Any) -> Kernel | None:
        """
        A pooled kernel bound to C{request}'s caller, or C{None} when no
        pool can serve it (the request is then started fresh).
        """

    async def drain(self) -> None:
        """
        Stop refilling and shut every pooled kernel down (the gateway is
        stopping: pooled kernels are never kept for the next one).
        """


class IProcessWatch(Protocol):
    """
    What launching tells the restart policy: a kernel has a (new) process.
    """

    def watch(self, kernel: Kernel, process: IKernelProcess) -> None:
        """
        Follow C{process}, the running process of C{kernel}, until it ends.
        """


class IKernelTable(Protocol):
    """
    The manager as its parts see it: the kernels, what they are launched
    with, and the two events a part may cause.  The parts take this rather
    than L{egateway.kernels.manager.KernelManager}, which imports them.
    """

    kernels: dict[str, Kernel]
    launchers: LauncherRegistry
    settings: KernelsConfig
    policy: TenancyPolicy
    specs: KernelSpecCatalog
    restarts: IProcessWatch

    @property
    def channels(self) -> IChannelFactory:
        """
        The transport to kernels' ZMQ channels.
        """

    def emit(self, event: str, kernel: Kernel) -> None:
        """
        Tell the manager's listeners of C{event} ("started", "removed", ...).
        """

    def remove(self, kernel: Kernel) -> None:
        """
        Forget C{kernel}: it is gone.
        """


# The factories are given the manager itself, typed loosely: naming its class
# here would make the manager's module import cycle through this one.
PersistenceFactory = Callable[[Any], IKernelPersistence]
"""
Builds the persistence of a manager (it listens to the manager's events).
"""

SharingFactory = Callable[[Any, IKernelPersistence], "IKernelSharing | None"]
"""
Builds the sharing of a manager over its persistence; C{None} when the
store is this gateway's alone.
"""
