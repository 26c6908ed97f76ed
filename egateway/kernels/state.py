"""
The lifecycle of one kernel, as an explicit state machine.

::

    LAUNCHING --> RUNNING <--> RESTARTING
        |            |             |
        v            v             v
      FAILED    SHUTTING_DOWN --> GONE
                     ^
    DEAD ------------'     (RUNNING/RESTARTING -> DEAD when restarts run out;
                            LAUNCHING -> DEAD when a restored kernel is gone)

C{execution_state} (idle, busy, ...) is what the kernel reports on iopub and
is tracked separately; this machine is what the gateway is doing with it.
"""

from __future__ import annotations

import enum


class KernelState(str, enum.Enum):
    LAUNCHING = "launching"
    RUNNING = "running"
    RESTARTING = "restarting"
    SHUTTING_DOWN = "shutting_down"
    DEAD = "dead"
    FAILED = "failed"
    GONE = "gone"


TRANSITIONS: dict[KernelState, frozenset[KernelState]] = {
    KernelState.LAUNCHING: frozenset(
        {KernelState.RUNNING, KernelState.FAILED, KernelState.SHUTTING_DOWN, KernelState.DEAD}
    ),
    KernelState.RUNNING: frozenset(
        {KernelState.RESTARTING, KernelState.SHUTTING_DOWN, KernelState.DEAD}
    ),
    KernelState.RESTARTING: frozenset(
        {KernelState.RUNNING, KernelState.DEAD, KernelState.SHUTTING_DOWN}
    ),
    KernelState.DEAD: frozenset({KernelState.SHUTTING_DOWN, KernelState.RESTARTING}),
    KernelState.SHUTTING_DOWN: frozenset({KernelState.GONE}),
    KernelState.FAILED: frozenset({KernelState.GONE}),
    KernelState.GONE: frozenset(),
}


class IllegalTransition(RuntimeError):
    pass


def check_transition(current: KernelState, new: KernelState) -> None:
    """
    @raise IllegalTransition: if C{new} cannot follow C{current}.
    """
    if new not in TRANSITIONS[current]:
        raise IllegalTransition(f"{current.value} -> {new.value} is not allowed")
