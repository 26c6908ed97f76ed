"""
Late binding: giving a kernel started ahead in a warm pool the identity,
environment and working directory of the user it is handed to.

A pooled kernel was launched for nobody: its environment names the
gateway's user and none of a client's values.  Binding makes it what a
fresh start for the caller would have been: one silent C{execute_request}
(no output, no history, no execution count) on its shell channel replaces
the environment the pool launched it with by the caller's (names the
caller's start would not set are removed, so no value of the pool's stays)
and changes to the caller's C{KERNEL_WORKING_DIR}; the kernel is handed to
the client only once the kernel answered and went idle again.

Only a language whose binding code is known here can be bound; a
kernelspec says whether it may be (C{metadata.egateway.binding}, default:
true for Python kernels, false for the rest).
"""

from __future__ import annotations

from typing import Any, Mapping

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime

from egateway.errors import GatewayError
from egateway.kernels.kernel import Kernel
from egateway.wire.protocol import Message

WORKING_DIR = "KERNEL_WORKING_DIR"
"""
The client variable naming the directory a kernel works in (jupyter_server's
gateway client sends the notebook's directory in it).
"""


class BindFailed(GatewayError):
    """
    A pooled kernel could not be bound; it is discarded and the request is
    served by a fresh start.
    """

    status = 500


def supports_binding(spec: Any) -> bool:
    """
    Whether kernels of C{spec} can be bound: its C{metadata.egateway.binding}
    when set, else whether its language is Python (the one language whose
    binding code egateway ships).
    """
    metadata = spec.metadata if isinstance(spec.metadata, Mapping) else {}
    own = metadata.get("egateway")
    if isinstance(own, Mapping) and isinstance(own.get("binding"), bool):
        return bool(own["binding"]) and _python(spec)
    return _python(spec)


def _python(spec: Any) -> bool:
    return (spec.language or "").lower().startswith("python")


def python_binding(drop: list[str], env: Mapping[str, str], cwd: str) -> str:
    """
    One Python expression that removes C{drop} from the process environment,
    sets C{env} and, when C{cwd} names a directory, changes to it; it binds
    no name in the user's namespace.  The values are Python literals
    (C{repr} of C{str}), so no value can become code.
    """
    return (
        "(lambda os, drop, env, cwd: ([os.environ.pop(name, None) for name in drop], "
        "os.environ.update(env), os.chdir(cwd) if cwd and os.path.isdir(cwd) else None) and None)"
        f"(__import__('os'), {sorted(drop)!r}, {dict(sorted(env.items()))!r}, {cwd!r})"
    )


async def bind(kernel: Kernel, env: Mapping[str, str], clock: IReactorTime, timeout: float) -> None:
    """
    Make C{kernel}'s process environment C{env} (and its working directory
    C{env}'s C{KERNEL_WORKING_DIR}, when it exists), and wait until the
    kernel is idle again.

    @raise BindFailed: the kernel refused the code, or did not answer
        within C{timeout} seconds.
    """
    link = kernel.link
    if link is None:
        raise BindFailed(f"kernel {kernel.id} has no channels to bind it with")
    drop = [name for name in kernel.env if name not in env]
    code = python_binding(drop, env, env.get(WORKING_DIR, ""))
    idle: set[str] = set()
    waiting: dict[str, Deferred[None]] = {}

    def observe(message: Message) -> None:
        if message.msg_type != "status" or message.content().get("execution_state") != "idle":
            return
        parent = str(message.parent_header().get("msg_id"))
        idle.add(parent)
        pending = waiting.pop(parent, None)
        if pending is not None:
            pending.callback(None)

    kernel.on_iopub_observers.append(observe)
    try:
        try:
            reply = await link.request(
                "shell",
                "execute_request",
                {
                    "code": code,
                    "silent": True,
                    "store_history": False,
                    "user_expressions": {},
                    "allow_stdin": False,
                    "stop_on_error": False,
                },
                timeout,
            )
        except CancelledError:
            raise
        except Exception as e:
            raise BindFailed(f"kernel {kernel.id} did not run its binding: {e}") from None
        content = reply.content()
        if content.get("status") != "ok":
            raise BindFailed(
                f"kernel {kernel.id} refused its binding: {content.get('ename', '')} {content.get('evalue', '')}"
            )
        msg_id = str(reply.parent_header().get("msg_id"))
        if msg_id not in idle:
            # Its "idle" can trail the reply: a client must not hear it.
            done: Deferred[None] = Deferred()
            waiting[msg_id] = done
            done.addTimeout(timeout, clock)
            try:
                await done
            except CancelledError:
                raise
            except Exception:
                raise BindFailed(f"kernel {kernel.id} did not go idle after its binding") from None
    finally:
        kernel.on_iopub_observers.remove(observe)
