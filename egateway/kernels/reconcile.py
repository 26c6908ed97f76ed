"""
The reconciler: kernels running for this gateway that its store does not
know.

A kernel's record is written before its process starts and deleted only
after the process has stopped, so a kernel that runs, tagged with this
installation's gateway id, without a record is an orphan: its record was
lost (the store file deleted or replaced by an old copy, a record removed
by hand, a different store configured).  Nothing else would ever see it:
no culler, no listing; it would hold its memory, cores or Slurm node until
someone noticed.

Once the store's kernels have been restored, and then every
C{reconcile_interval} seconds, the L{Reconciler} asks every launcher that
can list what it runs (L{ILauncherInventory}: local processes, processes
on the SSH hosts, Slurm jobs) for the kernels tagged with this gateway's
id, and per the C{reconcile} setting reaps each orphan (stops it, removes
its files), adopts it (reattaches through the launcher's C{restore} and
lists it; only launchers that can reattach offer that, the others' orphans
are reaped) or only reports it.  One log line per orphan says what was
done.

What it never touches:
  - anything tagged with another gateway id (launchers filter by the tag);
  - a kernel the manager holds, launching and restoring ones included;
  - a kernel the store has a record of, readable or not: right before it
    acts on a kernel, the reconciler asks the store for that kernel's
    record, and does nothing more in this pass if the store cannot answer.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Container, Iterable

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from egateway.clusters.interface import Found, ILauncherInventory, LaunchError, check_gateway_id
from egateway.kernels.state import KernelState
from egateway.observe import Operation
from egateway.store.interface import KernelRecord, RecordUnreadable, StoreError

_log = Logger()


class Action(str, enum.Enum):
    REAP = "reap"
    ADOPT = "adopt"
    REPORT = "report"


MODES = tuple(action.value for action in Action)


@dataclass(frozen=True)
class Decision:
    found: Found
    action: Action


def decide(found: Iterable[Found], known: Container[str], mode: str) -> list[Decision]:
    """
    What to do with each kernel found: nothing for one in C{known} (the
    store's and the manager's), and, per C{mode}, reap, adopt (where the
    launcher can reattach, else reap) or report the others.  A kernel
    found twice (by two launchers looking at one machine) is decided once,
    as the first finder found it.

    @raise ValueError: an unknown mode.
    """
    if mode not in MODES:
        raise ValueError(f"reconcile mode {mode!r} is not one of {', '.join(MODES)}")
    decisions: list[Decision] = []
    seen: set[str] = set()
    for item in found:
        if item.kernel_id in seen or item.kernel_id in known:
            continue
        seen.add(item.kernel_id)
        if mode == "report":
            action = Action.REPORT
        elif mode == "adopt" and item.adoptable:
            action = Action.ADOPT
        else:
            action = Action.REAP
        decisions.append(Decision(item, action))
    return decisions


@dataclass(frozen=True)
class Outcome:
    """
    What one pass did with one orphan: C{done} is C{"reaped"},
    C{"adopted"}, C{"reported"}, C{"gone"} (it ended before it could be
    adopted), C{"skipped"} (the store or the manager knew it after all) or
    C{"failed"}.
    """

    kernel_id: str
    action: Action
    done: str
    detail: str = ""


def _store_unavailable(error: StoreError) -> None:
    _log.warn(
        "reconciler: the kernel store is unavailable ({error}); orphaned kernels are looked for again at the "
        "next pass",
        error=str(error),
    )


class Reconciler(Service):
    """
    See the module docstring.

    @ivar passes: passes completed (the first one ends after the restore).
    @ivar last: the outcomes of the last completed pass.
    """

    name = "reconciler"

    def __init__(
        self,
        *,
        manager: Any,
        persistence: Any,
        gateway_id: str,
        mode: str,
        interval: float,
        clock: Any,
    ) -> None:
        """
        @param manager: the L{KernelManager} (its kernels, operations,
            launchers and kernelspecs).
        @param persistence: the L{KernelPersistence}; the first pass runs
            once it has restored the store's kernels.
        @param interval: seconds between passes after the first (0: none).
        @raise ValueError: a malformed gateway id or an unknown mode.
        """
        check_gateway_id(gateway_id)
        if mode not in MODES:
            raise ValueError(f"reconcile mode {mode!r} is not one of {', '.join(MODES)}")
        self._manager = manager
        self._persistence = persistence
        self.gateway_id = gateway_id
        self.mode = mode
        self.interval = interval
        self._clock = clock
        self._loop: LoopingCall | None = None
        self._pass: Operation[list[Outcome]] | None = None
        self.passes = 0
        self.last: list[Outcome] = []
        self._stopping = False
        persistence.restored.append(self._store_restored)

    # -- service ------------------------------------------------------------

    async def _store_restored(self) -> None:
        """
        The store's kernels are back: the first pass starts now (not
        awaited: what else waits on the restore need not wait on it), then
        one every C{interval}.
        """
        if not self.running or self._stopping:
            return
        if self.interval > 0:
            self._loop = LoopingCall(self._periodic)
            self._loop.clock = self._clock
            self._loop.start(self.interval, now=True).addErrback(
                lambda f: _log.failure("reconciler: periodic passes stopped", f)
            )
        else:
            self._periodic()

    def _periodic(self) -> Deferred[None]:
        def failed(failure: Any) -> None:
            _log.failure("reconciling kernels failed; trying again at the next pass", failure)

        return self.reconcile().addCallbacks(lambda _: None, failed)

    def stopService(self) -> Deferred[None]:
        """
        No new pass starts; one in progress asks no more launchers and
        starts no new action, but finishes the one it is doing (a reap
        would stop half-way otherwise), within the gateway's stop timeout.
        """
        super().stopService()
        self._stopping = True
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._pass is not None and not self._pass.done:
            return self._pass.observe().addCallbacks(lambda _: None, lambda _: None)
        return succeed(None)

    # -- one pass -------------------------------------------------------------

    def reconcile(self) -> Deferred[list[Outcome]]:
        """
        One pass now, or the one in progress.  Fires with its outcomes, one
        per orphan.
        """
        if self._pass is None or self._pass.done:
            self._pass = Operation("reconcile", self._reconcile())
        return self._pass.observe()

    async def _reconcile(self) -> list[Outcome]:
        found = await self._inventory()
        if self._stopping:
            return []
        try:
            records = await self._persistence.store.load_kernels()
        except StoreError as e:
            _store_unavailable(e)
            return []
        known = {record.kernel_id for record in records}
        outcomes: list[Outcome] = []
        for decision in decide(found, known | self._held(), self.mode):
            if self._stopping:
                break
            try:
                outcome = await self._act(decision)
            except StoreError as e:
                _store_unavailable(e)
                break
            outcomes.append(outcome)
        self.passes += 1
        self.last = outcomes
        return outcomes

    def _held(self) -> set[str]:
        """
        The kernels the manager holds: a launch or a restore registers its
        kernel before anything starts, and a shutdown forgets it only once
        it has stopped.
        """
        return set(self._manager.kernels)

    async def _inventory(self) -> list[Found]:
        found: list[Found] = []
        for name, launcher, hints in await self._launchers():
            if self._stopping:
                break
            try:
                found += await launcher.inventory(self.gateway_id, hints)
            except CancelledError:
                raise
            except Exception as e:
                _log.warn(
                    "reconciler: cannot list the kernels of launcher {launcher}: {error}",
                    launcher=name,
                    error=str(e),
                )
        return found

    async def _launchers(self) -> list[tuple[str, Any, list[Any]]]:
        """
        The launchers that can list their kernels, among those the
        kernelspecs name and those already in use, local first; each with
        the launcher configs of the kernelspecs naming it.
        """
        hints: dict[str, list[Any]] = {"local": []}
        try:
            specs = await self._manager.specs.all()
        except Exception as e:
            _log.warn("reconciler: cannot read the kernelspecs: {error}", error=str(e))
            specs = {}
        for spec in specs.values():
            hints.setdefault(spec.launcher_name, []).append(spec.launcher_config)
        for launcher in self._manager.launchers.built():
            hints.setdefault(launcher.name, [])
        chosen = []
        for name, configs in hints.items():
            try:
                launcher = self._manager.launchers.get(name)
            except LaunchError as e:
                _log.debug("reconciler: launcher {launcher} unavailable: {error}", launcher=name, error=str(e))
                continue
            if ILauncherInventory.providedBy(launcher):
                chosen.append((name, launcher, configs))
        return chosen

    async def _act(self, decision: Decision) -> Outcome:
        """
        @raise StoreError: the store cannot say whether it knows the kernel.
        """
        found = decision.found
        kernel_id = found.kernel_id
        if kernel_id in self._held() or not await self._unknown_to_store(kernel_id):
            return Outcome(kernel_id, decision.action, "skipped", "known after all")
        what = (
            "reconciler: kernel {kernel_id} ({description}, launcher {launcher}) runs for this gateway but the store has "
            "no record of it: {outcome}"
        )
        if decision.action == Action.REPORT:
            _log.warn(what, kernel_id=kernel_id, description=found.description, launcher=found.launcher,
                      outcome="left running (reconcile = report); stop it, or set reconcile to reap or adopt")
            return Outcome(kernel_id, decision.action, "reported")
        if decision.action == Action.ADOPT:
            return await self._adopt(found, what)
        try:
            await found.reap()
        except CancelledError:
            raise
        except Exception as e:
            _log.error(what, kernel_id=kernel_id, description=found.description, launcher=found.launcher,
                       outcome=f"reaping it failed ({e}); trying again at the next pass")
            return Outcome(kernel_id, decision.action, "failed", str(e))
        _log.warn(what, kernel_id=kernel_id, description=found.description, launcher=found.launcher,
                  outcome="reaped (stopped, and what it left behind removed)")
        return Outcome(kernel_id, decision.action, "reaped")

    async def _unknown_to_store(self, kernel_id: str) -> bool:
        try:
            record = await self._persistence.store.load_kernel(kernel_id)
        except RecordUnreadable:
            return False
        return record is None

    async def _adopt(self, found: Found, what: str) -> Outcome:
        record = self.record_for(found)
        kernel = await self._persistence.restore(record)
        fields = {"kernel_id": found.kernel_id, "description": found.description, "launcher": found.launcher}
        if kernel is None:
            _log.error(what, **fields, outcome="adopting it failed; trying again at the next pass")
            return Outcome(found.kernel_id, Action.ADOPT, "failed")
        if kernel.state == KernelState.DEAD:
            # It ended between the inventory and the restore: nothing to list.
            try:
                await self._manager.shutdown(kernel.id, reason="it ended before it could be adopted")
            except CancelledError:
                raise
            except Exception:
                _log.failure("reconciler: removing kernel {kernel_id}", kernel_id=kernel.id)
            _log.warn(what, **fields, outcome=f"it ended before it could be adopted ({kernel.reason})")
            return Outcome(found.kernel_id, Action.ADOPT, "gone", kernel.reason)
        _log.warn(
            what,
            **fields,
            outcome=f"adopted, as kernelspec {record.spec_name} for {record.username or 'an unknown user'} "
            "(its sharing and profile were in the lost record)",
        )
        return Outcome(found.kernel_id, Action.ADOPT, "adopted")

    def record_for(self, found: Found) -> KernelRecord:
        """
        The record of an orphan being adopted, from what its launcher
        found: the owner is the user it runs for (C{KERNEL_USERNAME}).
        """
        env = dict(found.env)
        username = env.get("KERNEL_USERNAME", "")
        now = self._clock.seconds()
        return KernelRecord(
            kernel_id=found.kernel_id,
            spec_name=found.spec_name or "unknown",
            username=username,
            launcher=found.launcher,
            snapshot=dict(found.snapshot or {}),
            env=env,
            state=KernelState.RUNNING.value,
            execution_state="idle",
            created=now,
            updated=now,
            gateway_id=self._persistence.gateway_id,
            owner=username,
        )
