"""
What the kernel manager needs of persistence and of sharing.

The manager is given both through its constructor and uses only what these
protocols name, so it can be tested with small fakes and neither part can
come to depend on the manager's insides.  Both are built from the manager
(they follow its kernels), hence the factories: the manager calls them once,
while it is constructed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Protocol

if TYPE_CHECKING:
    from egateway.kernels.kernel import Kernel
    from egateway.kernels.manager import KernelManager
    from egateway.store.interface import KernelRecord


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


PersistenceFactory = Callable[["KernelManager"], IKernelPersistence]
"""
Builds the persistence of a manager (it listens to the manager's events).
"""

SharingFactory = Callable[["KernelManager", IKernelPersistence], "IKernelSharing | None"]
"""
Builds the sharing of a manager over its persistence; C{None} when the
store is this gateway's alone.
"""
