"""
Several gateways sharing one store (Redis): any of them serves any kernel.

A gateway that gets a request for a kernel it does not hold reads the
kernel's record and attaches on demand (its own ZMQ link; the kernel runs
wherever it runs).  Every gateway attached to a kernel watches it, but only
one at a time may change it: restart, automatic restart, culling and
shutdown each take the kernel's lease in the store first.  A gateway that
loses the race for an automatic restart follows instead: it rereads the
record until the winner has relaunched the kernel (then relinks to the new
process), removed it, or declared it dead.  A gateway that dies releases its
leases by expiry.

With a shared store a gateway's graceful stop always keeps kernels: other
gateways may be serving them.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from egateway.errors import Conflict, NotFound, Unavailable
from egateway.kernels.kernel import Kernel
from egateway.kernels.state import KernelState
from egateway.store.interface import KernelRecord, StoreError

_log = Logger()

LEASED_OPERATIONS = frozenset({"restart", "auto-restart", "shutdown"})
"""
Operations that change a kernel for every gateway, so need its lease.
"""

LEASE_WAIT = 10.0
"""
Seconds an explicit request waits for another gateway's lease to end.
"""

FOLLOW_INTERVAL = 0.5


class Lease:
    """
    A held lease, renewed every third of its ttl until released.
    """

    def __init__(self, store: Any, kernel_id: str, holder: str, ttl: float, clock: Any) -> None:
        self._store = store
        self.kernel_id = kernel_id
        self._holder = holder
        self._ttl = ttl
        self._renew = LoopingCall(self._renew_once)
        self._renew.clock = clock
        self._renew.start(ttl / 3, now=False)

    async def _renew_once(self) -> None:
        try:
            if not await self._store.acquire_lease(self.kernel_id, self._holder, self._ttl):
                _log.warn("lost the lease of kernel {kernel_id}", kernel_id=self.kernel_id)
        except StoreError as e:
            _log.warn("renewing the lease of kernel {kernel_id}: {error}", kernel_id=self.kernel_id, error=str(e))

    async def release(self) -> None:
        if self._renew.running:
            self._renew.stop()
        try:
            await self._store.release_lease(self.kernel_id, self._holder)
        except StoreError:
            pass


class SharedKernels:
    """
    The on-demand attachment, leases and following for one gateway.
    """

    def __init__(self, manager: Any, persistence: Any, clock: Any, lease_ttl: float) -> None:
        self._manager = manager
        self._persistence = persistence
        self._clock = clock
        self.lease_ttl = lease_ttl

    @property
    def _store(self) -> Any:
        return self._persistence.store

    @property
    def holder(self) -> str:
        return self._persistence.gateway_id

    # -- attaching ---------------------------------------------------------

    async def attach(self, kernel_id: str) -> Kernel:
        """
        Attach to a kernel another gateway started.

        @raise NotFound: no such kernel in the store.
        @raise Unavailable: the store cannot be reached.
        """
        try:
            record = await self._store.load_kernel(kernel_id)
        except StoreError as e:
            raise Unavailable(f"cannot look kernel {kernel_id} up: the kernel store is unavailable ({e})") from None
        if record is None:
            raise NotFound(f"Kernel does not exist: {kernel_id}")
        existing = self._manager.kernels.get(kernel_id)
        if existing is not None:
            return existing
        _log.info("attaching to kernel {kernel_id} on demand", kernel_id=kernel_id)
        kernel = await self._persistence.restore(record)
        if kernel is None:
            raise NotFound(f"Kernel does not exist: {kernel_id}")
        return kernel

    async def records(self) -> list[KernelRecord]:
        try:
            return await self._store.load_kernels()
        except StoreError as e:
            raise Unavailable(f"cannot list kernels: the kernel store is unavailable ({e})") from None

    # -- leases ------------------------------------------------------------

    async def acquire(self, kernel: Kernel, wait: float = LEASE_WAIT) -> Lease | None:
        """
        Take C{kernel}'s lease, waiting up to C{wait} seconds for another
        gateway to finish with it.

        @return: the lease, or C{None} if another gateway kept it.
        @raise Unavailable: the store cannot be reached.
        """
        deadline = self._clock.seconds() + wait
        while True:
            try:
                if await self._store.acquire_lease(kernel.id, self.holder, self.lease_ttl):
                    return Lease(self._store, kernel.id, self.holder, self.lease_ttl, self._clock)
            except StoreError as e:
                raise Unavailable(f"cannot change kernel {kernel.id}: the kernel store is unavailable ({e})") from None
            if self._clock.seconds() >= deadline:
                return None
            await deferLater(self._clock, FOLLOW_INTERVAL, lambda: None)

    async def leased(self, name: str, kernel: Kernel, step: Any, *args: Any) -> Any:
        """
        Run operation C{name}'s step holding the kernel's lease.  An
        automatic restart that another gateway is already doing is followed
        instead.
        """
        lease = await self.acquire(kernel, wait=0 if name == "auto-restart" else LEASE_WAIT)
        if lease is None:
            if name == "auto-restart":
                return await self.follow(kernel)
            raise Conflict(f"another gateway is changing kernel {kernel.id}; try again")
        try:
            if name == "auto-restart" and await self._changed_elsewhere(kernel):
                return await self.follow(kernel)
            return await step(kernel, *args)
        finally:
            await lease.release()

    async def _changed_elsewhere(self, kernel: Kernel) -> bool:
        record = await self._store.load_kernel(kernel.id)
        return record is None or self._differs(kernel, record)

    def _differs(self, kernel: Kernel, record: KernelRecord) -> bool:
        process = kernel.process
        return (
            record.restarts != kernel.restart_count
            or record.state == KernelState.DEAD.value
            or (process is not None and record.snapshot != process.snapshot())
        )

    # -- following ---------------------------------------------------------

    async def follow(self, kernel: Kernel) -> None:
        """
        Another gateway holds the kernel's lease while it died: wait for that
        gateway's outcome and adopt it.
        """
        manager = self._manager
        deadline = self._clock.seconds() + manager.settings.launch_timeout * 2 + 10
        while self._clock.seconds() < deadline:
            try:
                record = await self._store.load_kernel(kernel.id)
            except StoreError:
                record = kernel  # unknown: keep waiting
            if record is None:
                manager.forget_elsewhere(kernel, "shut down through another gateway")
                return
            if isinstance(record, KernelRecord) and self._differs(kernel, record):
                await manager.relink(kernel, record)
                return
            lease = await self.acquire(kernel, wait=0)
            if lease is not None:
                # The other gateway is gone: restart here.
                try:
                    return await manager._auto_restart(kernel, manager.last_exit.get(kernel.id))
                finally:
                    await lease.release()
            await deferLater(self._clock, FOLLOW_INTERVAL, lambda: None)
        _log.warn("kernel {kernel_id}: no gateway relaunched it in time", kernel_id=kernel.id)
