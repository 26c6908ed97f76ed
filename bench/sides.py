"""
The two sides measured: kernels through the gateway, and kernels started
directly with jupyter_client.  Each side starts a kernel, hands back a
channel client that has had its first C{kernel_info_reply}, and shuts
kernels down; each remembers what it started so that L{close} can remove
everything after an error or a Ctrl-C.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from typing import Any

from bench import httpclient
from bench.channels import ChannelsClosed, DirectChannels, GatewayChannels


@dataclass
class StartedKernel:
    """
    A ready kernel: C{elapsed} is seconds from the start request to its
    first C{kernel_info_reply}, C{ready_at} the C{time.perf_counter()} at
    that reply (what a storm of starts is timed by: see
    L{bench.figures.concurrent_starts}).
    """

    key: str
    channels: Any
    elapsed: float
    handle: Any = None
    ready_at: float = 0.0


class GatewaySide:
    name = "gateway"

    def __init__(
        self,
        base_url: str,
        token: str,
        kernelspec: str,
        protocol: str,
        launch_timeout: float,
    ) -> None:
        self.base_url = base_url.rstrip("/") + "/"
        self.ws_base = "ws" + self.base_url[4:] if self.base_url.startswith("http") else self.base_url
        self.token = token
        self.kernelspec = kernelspec
        self.protocol = protocol
        self.launch_timeout = launch_timeout
        self.kernels: dict[str, StartedKernel | None] = {}

    async def start_kernel(self) -> StartedKernel:
        """
        C{POST /api/kernels}, then open the channels WebSocket and do one
        C{kernel_info} round trip: what a notebook server does before it
        shows a kernel as ready.
        """
        start = time.perf_counter()
        response = await httpclient.expect(
            "POST",
            self.base_url + "api/kernels",
            201,
            body={"name": self.kernelspec},
            token=self.token,
            timeout=self.launch_timeout + 30,
        )
        kernel_id = response.json()["id"]
        self.kernels[kernel_id] = None
        channels = await GatewayChannels.connect(self.ws_base, kernel_id, self.token, self.protocol)
        started = StartedKernel(kernel_id, channels, 0.0)
        self.kernels[kernel_id] = started
        reply = await channels.kernel_info(timeout=30)
        if reply is None:
            raise RuntimeError(f"kernel {kernel_id}: no kernel_info_reply over the WebSocket in 30 s")
        started.ready_at = reply.done.result()
        started.elapsed = started.ready_at - start
        return started

    async def shutdown(self, kernel: StartedKernel) -> None:
        await kernel.channels.close()
        await self._delete(kernel.key)

    async def _delete(self, kernel_id: str) -> None:
        self.kernels.pop(kernel_id, None)
        await httpclient.expect(
            "DELETE",
            f"{self.base_url}api/kernels/{kernel_id}",
            (204, 404),
            token=self.token,
            timeout=60,
        )

    async def close(self) -> list[str]:
        """
        Delete every kernel still held; the problems met, if any.
        """
        problems: list[str] = []

        async def one(kernel_id: str, started: StartedKernel | None) -> None:
            try:
                if started is not None:
                    await started.channels.close()
                await self._delete(kernel_id)
            except Exception as e:
                problems.append(f"gateway kernel {kernel_id}: {e}")

        await asyncio.gather(*(one(k, s) for k, s in list(self.kernels.items())))
        return problems


class DirectSide:
    name = "direct"

    def __init__(self, kernelspec: str, workdir: str, timeout: float, curve: bool = False) -> None:
        """
        @param curve: provision CurveZMQ keys where the kernelspec declares
            support (jupyter_client's C{transport_encryption="auto"}), as
            the gateway's C{kernel_encryption = "auto"} does; the client's
            sockets then encrypt too.
        """
        self.kernelspec = kernelspec
        self.timeout = timeout
        self.curve = curve
        self.runtime = os.path.join(workdir, "direct-runtime")
        self.logs = os.path.join(workdir, "direct-logs")
        os.makedirs(self.runtime, mode=0o700, exist_ok=True)
        os.makedirs(self.logs, exist_ok=True)
        self._count = 0
        self.kernels: dict[str, StartedKernel] = {}

    async def start_kernel(self) -> StartedKernel:
        """
        C{AsyncKernelManager.start_kernel}, then what C{wait_for_ready}
        does (C{kernel_info_request} until a reply, and an iopub message
        to prove the subscription) minus its closing 0.2 s iopub flush,
        which is a fixed wait, not kernel start-up.
        """
        from jupyter_client.manager import AsyncKernelManager

        self._count += 1
        key = f"direct-{os.getpid()}-{self._count}"
        manager = AsyncKernelManager(
            kernel_name=self.kernelspec,
            connection_file=os.path.join(self.runtime, f"kernel-{key}.json"),
            transport_encryption="auto" if self.curve else "disabled",
        )
        started = StartedKernel(key, None, 0.0, manager)
        self.kernels[key] = started
        log_path = os.path.join(self.logs, f"{key}.log")
        start = time.perf_counter()
        with open(log_path, "ab") as log:
            await manager.start_kernel(stdout=log, stderr=log)
        started.channels = channels = DirectChannels(manager.get_connection_info())
        deadline = start + self.timeout
        while True:
            try:
                reply = await channels.kernel_info(timeout=1.0)
            except ChannelsClosed:
                reply = None
            if reply is not None and (
                channels.tracker.iopub_seen or await channels.tracker.wait_iopub(0.2)
            ):
                break
            if not await manager.is_alive():
                raise RuntimeError(
                    f"{key}: the kernel died before answering kernel_info: {_last_line(log_path)}"
                )
            if time.perf_counter() > deadline:
                raise RuntimeError(
                    f"{key}: no kernel_info_reply in {self.timeout:g} s: {_last_line(log_path)}"
                )
        started.ready_at = time.perf_counter()
        started.elapsed = started.ready_at - start
        return started

    async def shutdown(self, kernel: StartedKernel, now: bool = False) -> None:
        self.kernels.pop(kernel.key, None)
        if kernel.channels is not None:
            await kernel.channels.close()
        await kernel.handle.shutdown_kernel(now=now)

    async def close(self) -> list[str]:
        problems: list[str] = []

        async def one(started: StartedKernel) -> None:
            try:
                await self.shutdown(started, now=True)
            except Exception as e:
                problems.append(f"direct kernel {started.key}: {e}")

        await asyncio.gather(*(one(s) for s in list(self.kernels.values())))
        return problems


def _last_line(path: str) -> str:
    """
    The last line of a kernel's output that looks like an error.
    """
    try:
        with open(path, "rb") as f:
            lines = f.read()[-20000:].decode("utf-8", "replace").splitlines()
    except OSError:
        return "(no output)"
    errors = [line for line in lines if "Error" in line or "error" in line]
    return (errors or lines or ["(no output)"])[-1].strip()[:300]
