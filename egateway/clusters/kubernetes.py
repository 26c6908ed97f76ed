"""
Kernels as Kubernetes pods.

A launch renders the kernel's pod from a template written for Enterprise
Gateway (the kernelspec's C{scripts/kernel-pod.yaml.j2}, the operator's
C{kubernetes_pod_template}, or the built-in one; see
L{egateway.clusters.kube_pods}), creates a Secret holding the launch token,
the Services, ConfigMaps and Secrets the template asks for besides the pod
(owned by the pod, deleted with the kernel), and the pod, and follows the pod through the namespace's watch
(L{egateway.clusters.kube_watch}) until it runs.  The image's entry point
(Enterprise Gateway's C{bootstrap-kernel.sh} contract: C{KERNEL_ID},
C{RESPONSE_ADDRESS}, C{PUBLIC_KEY}, C{PORT_RANGE}, C{KERNEL_LANGUAGE}, ...
in its environment) starts the kernel-side launcher, which reports the
connection info to the response listener like any remote kernel; the
gateway connects to the pod's IP.

The pod is named C{<user>-<kernel id>} and labelled with the kernel id
(C{kernel_id}, as Enterprise Gateway does), C{component: kernel}, this
gateway's id (C{egateway/gateway-id}) and the user (C{egateway/user}).  The
launch token reaches the container from the Secret (C{secretKeyRef}), so it
is not in the pod's spec, which everyone who may list pods can read; the
Secret is owned by the pod and deleted with it.

What the client may choose: C{KERNEL_*} values become the template's
variables (C{KERNEL_CPUS} is C{kernel_cpus}), but none of them can change
the pod's structure (the rendering refuses such values with 400), resource
quantities must be quantities, and the values that choose the image, the
namespace, the service account, the user and group ids and the volumes come
from the kernelspec and the gateway's settings only: a client that sends a
different C{KERNEL_IMAGE} (unless the kernelspec's C{allowed_images} lists
it), C{KERNEL_NAMESPACE}, C{KERNEL_VOLUMES} or C{KERNEL_VOLUME_MOUNTS} is
refused with 403.

Failures carry Kubernetes' reason: a container waiting with
C{ErrImagePull}, C{ImagePullBackOff}, C{CrashLoopBackOff}, ...; a pod the
scheduler cannot place (C{FailedScheduling} and the scheduler's message); a
container that exits before the handshake (its exit code and reason, and
the end of its log).  The launch then fails at once and the pod is deleted.
A kernel whose pod is deleted by someone else, or whose container ends, is
dead with that reason (a deletion outside the gateway is a decision, so the
kernel is not restarted).  Stopping a kernel deletes its pod with a grace
period, then forcibly.

Namespaces made for kernels (per user or per kernel, with their
RoleBinding) are L{egateway.clusters.kube_namespaces}'s.

Every API call blocks, so all of them run in the launcher's own thread
pool (one thread per watched namespace stays busy with its watch), never
on the reactor.
"""

from __future__ import annotations

import base64
import os
import re
import signal as signals
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from egateway.clusters.interface import (
    GATEWAY_ID_ENV,
    ExitStatus,
    Found,
    IKernelProcess,
    ILauncher,
    ILauncherInventory,
    LaunchError,
    LaunchRequest,
    LauncherContext,
    Liveness,
    Phase,
    Placement,
)
from egateway.clusters.kube_api import KubeClient, api_error
from egateway.clusters.kube_namespaces import KernelNamespaces
from egateway.clusters.kube_pods import (
    DEFAULT_TEMPLATE,
    EXTRA_KINDS,
    GATEWAY_LABEL,
    IMAGE,
    POD_NAME,
    check_quantity,
    finish_extra,
    finish_pod,
    kernel_documents,
    launch_problem,
    pod_name,
    progress,
    render,
    running_address,
    terminated,
    values_for,
)
from egateway.clusters.kube_watch import NamespaceWatch, PodApi, WatchFailed
from egateway.clusters.remote import Placed, RemoteKernelProcess, RemoteLaunch, RemoteLauncher, as_int
from egateway.observe import OneShotObserver
from egateway.wire.channels import ConnectionInfo

_log = Logger()

TOKEN_KEY = "launch-token"

QUANTITIES = ("KERNEL_CPUS", "KERNEL_MEMORY", "KERNEL_GPUS", "KERNEL_CPUS_LIMIT", "KERNEL_MEMORY_LIMIT",
              "KERNEL_GPUS_LIMIT")

CLIENT_REFUSED = {
    "KERNEL_NAMESPACE": "the gateway decides the namespace (kubernetes_namespace)",
    "KERNEL_VOLUMES": "volumes come from the kernelspec's configuration only",
    "KERNEL_VOLUME_MOUNTS": "volume mounts come from the kernelspec's configuration only",
    "KERNEL_SERVICE_ACCOUNT_NAME": "the service account comes from the kernelspec or kubernetes_service_account",
    "KERNEL_POD_NAME": "the gateway names kernel pods",
}
"""
C{KERNEL_*} values a client may not set to anything but what the gateway
decides, and why (Enterprise Gateway lets clients choose them).
"""

CONTROLLED = ("kernel_uid", "kernel_gid", "kernel_volumes", "kernel_volume_mounts", "kernel_working_dir")
"""
Template variables set only from the kernelspec: a client's value is not
passed on.
"""

KERNEL_ID = re.compile(r"^[a-z0-9]([-a-z0-9]{0,50}[a-z0-9])?\Z")

SECRET_SUFFIX = "-launch"

@dataclass
class _PodLaunch:
    """
    What a pod launch's steps keep.
    """

    namespace: str
    name: str
    pod: dict[str, Any]
    from_client: bool
    created: bool = False
    state: dict[str, Any] | None = None
    gone: bool = False
    changed: OneShotObserver[None] = field(default_factory=OneShotObserver)
    unfollow: Callable[[], None] | None = None
    unfollow_events: Callable[[], None] | None = None
    warning: str = ""
    own_namespace: bool = False
    extras: list[dict[str, Any]] = field(default_factory=list)
    made: list[tuple[str, str]] = field(default_factory=list)
    """The template's other documents, and those created: (launcher kind, name)."""

    def stop_following(self) -> None:
        for unfollow in (self.unfollow, self.unfollow_events):
            if unfollow is not None:
                unfollow()
        self.unfollow = self.unfollow_events = None

    @property
    def secret(self) -> str:
        return self.name + SECRET_SUFFIX

    def update(self, pod: Mapping[str, Any] | None) -> None:
        if pod is None:
            self.gone = True
        else:
            self.state = dict(pod)
        changed, self.changed = self.changed, OneShotObserver()
        changed.fire(None)


class KubernetesKernelProcess(RemoteKernelProcess):
    """
    A kernel running in pod C{name} of C{namespace}, followed through the
    namespace's watch.
    """

    def __init__(
        self,
        *,
        launcher: "KubernetesLauncher",
        namespace: str,
        name: str,
        watch: NamespaceWatch,
        own_namespace: bool = False,
        extras: Sequence[tuple[str, str]] = (),
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self._launcher = launcher
        self.namespace = namespace
        self.name = name
        self.own_namespace = own_namespace
        self.extras = list(extras)
        self._deleting = False
        self._pods = watch
        self._unfollow = watch.follow(name, self._pod_changed)
        pod = watch.pods.get(name)
        self._pod_changed(pod)

    def _pod_changed(self, pod: Mapping[str, Any] | None) -> None:
        if self._exit is not None:
            return
        end = self._end_of(pod)
        if end is not None:
            self._ended(end)

    def _end_of(self, pod: Mapping[str, Any] | None) -> ExitStatus | None:
        where = f"pod {self.namespace}/{self.name}"
        if pod is None:
            if self._deleting:
                return ExitStatus(reason=f"{where} was deleted")
            return ExitStatus(reason=f"{where} was deleted outside the gateway", decision=True)
        if (pod.get("metadata") or {}).get("deletionTimestamp") and not self._deleting:
            return ExitStatus(reason=f"{where} was deleted outside the gateway", decision=True)
        ended = terminated(pod)
        if ended:
            return ExitStatus(reason=f"{where}: {ended}")
        status = pod.get("status") or {}
        if status.get("phase") in ("Failed", "Succeeded"):
            why = " ".join(str(status.get(k) or "") for k in ("reason", "message")).strip()
            return ExitStatus(reason=f"{where} {status['phase'].lower()}" + (f": {why}" if why else ""))
        return None

    async def _check_alive(self) -> Liveness:
        if self._exit is not None:
            return Liveness(False, self._exit.describe(), self._exit.decision)
        end = self._end_of(self._pods.pods.get(self.name))
        if end is not None:
            return Liveness(False, end.reason, end.decision)
        return Liveness(True)

    async def _signal_directly(self, signum: int) -> None:
        if signum == signals.SIGTERM:
            self._deleting = True
            await self._launcher.delete_pod(self.namespace, self.name, wait=False, extras=self.extras)
        elif signum == signals.SIGKILL:
            self._deleting = True
            await self._launcher.delete_pod(self.namespace, self.name, grace=0, wait=False, extras=self.extras)
        else:
            raise LaunchError(
                f"cannot send signal {signum} to pod {self.namespace}/{self.name}: its comm port does not answer"
            )

    async def _release(self) -> None:
        self._deleting = True
        self._unfollow()
        await self._launcher.delete_pod(self.namespace, self.name, extras=self.extras)
        if self.own_namespace:
            await self._launcher.forget_namespace(self.namespace)

    def detach(self) -> None:
        super().detach()
        self._unfollow()

    def snapshot(self) -> dict:
        return {**super().snapshot(), "launcher": "kubernetes", "namespace": self.namespace, "pod": self.name,
                "own_namespace": self.own_namespace, "extras": [list(e) for e in self.extras]}


@implementer(ILauncher, ILauncherInventory)
class KubernetesLauncher(RemoteLauncher):
    """
    Starts kernels as pods; see the module docstring.
    """

    name = "kubernetes"
    _poll_interval = 0.25  # reads the watch's cache, not the API

    def __init__(self, context: LauncherContext) -> None:
        super().__init__(context)
        self._settings = context.section
        self.client = KubeClient(self._settings.kubernetes_config, self._settings.kubernetes_api_timeout)
        # A pool of its own, not the gateway's (context.threadpool): each
        # watched namespace holds two threads for as long as it is watched
        # (the client's watch streams block), which would starve the
        # gateway's bounded pool of the threads other blocking work needs.
        self._pool = ThreadPool(minthreads=0, maxthreads=self._settings.kubernetes_threads, name="kubernetes")
        self._watches: dict[str, NamespaceWatch] = {}
        self._event_watches: dict[str, NamespaceWatch] = {}
        self.namespaces = KernelNamespaces(self._reactor, self._settings, self.client, self._call)

    # -- threads and watches ------------------------------------------------

    def _call(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        if not self._pool.started:
            self._pool.start()
        return deferToThreadPool(self._reactor, self._pool, f, *args, **kwargs)

    async def watch(self, namespace: str) -> NamespaceWatch:
        """
        The namespace's watch, started on first use, once it has listed.

        @raise LaunchError: the API cannot be reached.
        """
        watch = self._watches.get(namespace)
        if watch is None:
            try:
                core = await self._call(self.client.core_blocking)
            except CancelledError:
                raise
            except Exception as e:
                raise LaunchError(
                    f"cannot use the Kubernetes API: {e}; set kubernetes_config (EG_KUBERNETES_CONFIG) to a "
                    "kubeconfig, or run the gateway in the cluster"
                ) from None
            if not self._pool.started:
                self._pool.start()
            watch = NamespaceWatch(self._reactor, self._pool, PodApi(core, self.client.timeout), namespace, "kernel_id")
            events = NamespaceWatch(
                self._reactor, self._pool, PodApi(core, self.client.timeout, kind="event"), namespace,
                "involvedObject.kind=Pod", key=lambda event: str((event.get("involvedObject") or {}).get("name") or ""),
            )
            self._watches[namespace] = watch
            self._event_watches[namespace] = events
            # Each watch holds a thread for good: grow the pool so API calls never wait behind watches.
            self._pool.adjustPoolsize(maxthreads=self._settings.kubernetes_threads + 2 * len(self._watches))
            watch.start()
            events.start()
        try:
            await watch.synced()
        except WatchFailed as e:
            # Forgotten, so the next launch tries again.
            if self._watches.get(namespace) is watch:
                del self._watches[namespace]
                stale = self._event_watches.pop(namespace, None)
                if stale is not None:
                    stale.stop()
            raise LaunchError(
                f"{e}; check kubernetes_config (EG_KUBERNETES_CONFIG) and the gateway's rights in that namespace"
            ) from None
        return watch

    def stop(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        watches = [*self._watches.values(), *self._event_watches.values()]
        self._watches, self._event_watches = {}, {}
        for watch in watches:
            stopping = watch.stop()
            if stopping is not None:
                try:
                    await stopping
                except Exception:
                    _log.failure("stopping the watch of namespace {namespace}", namespace=watch.namespace)
        if self._pool.started:
            self._pool.stop()

    # -- pods ------------------------------------------------------------------

    async def delete_pod(self, namespace: str, name: str, grace: float | None = None, wait: bool = True,
                         extras: Sequence[tuple[str, str]] = ()) -> None:
        """
        Delete the pod with a grace period (C{kubernetes_delete_grace}), then,
        if it is still there once that has passed, forcibly; its Secret and
        the C{extras} made with it (C{(kind, name)}) with it (they are owned
        by the pod too, but Kubernetes' garbage collector takes its time).
        Tolerates a pod already gone; logs rather than raises.
        """
        grace = self._settings.kubernetes_delete_grace if grace is None else grace
        try:
            await self._call(self.client.delete_blocking, "pod", namespace, name, int(grace))
        except CancelledError:
            raise
        except Exception as e:
            _log.warn("cannot delete pod {namespace}/{pod}: {error}", namespace=namespace, pod=name, error=api_error(e))
        for kind, made in [("secret", name + SECRET_SUFFIX), *extras]:
            await self._delete_made(kind, namespace, made)
        watch = self._watches.get(namespace)
        if not wait or watch is None:
            return
        deadline = self._reactor.seconds() + grace + 2.0
        forced = grace == 0
        while name in watch.pods:
            if self._reactor.seconds() >= deadline:
                if forced:
                    _log.warn("pod {namespace}/{pod} is still there after a forced delete",
                              namespace=namespace, pod=name)
                    return
                forced = True
                deadline = self._reactor.seconds() + 10.0
                try:
                    await self._call(self.client.delete_blocking, "pod", namespace, name, 0)
                except CancelledError:
                    raise
                except Exception as e:
                    _log.warn("cannot force the deletion of pod {namespace}/{pod}: {error}",
                              namespace=namespace, pod=name, error=api_error(e))
            await _pod_event(watch, name, 0.5, self._reactor)

    async def _delete_made(self, kind: str, namespace: str, name: str) -> None:
        try:
            await self._call(self.client.delete_blocking, kind, namespace, name)
        except CancelledError:
            raise
        except Exception as e:
            _log.warn("cannot delete {kind} {namespace}/{name}: {error}", kind=kind, namespace=namespace,
                      name=name, error=api_error(e))

    # -- the launch's steps ----------------------------------------------------

    async def _prepare(self, request: LaunchRequest) -> _PodLaunch:
        if not KERNEL_ID.match(request.kernel_id):
            raise LaunchError(f"kernel id {request.kernel_id[:80]!r} cannot name a pod", status=400)
        config = request.config
        env = request.env
        for variable, why in CLIENT_REFUSED.items():
            if env.get(variable):
                raise LaunchError(f"{variable} is not accepted from clients: {why}", status=403)
        image = str(config.get("image_name") or config.get("image") or self._settings.kubernetes_image)
        asked = env.get("KERNEL_IMAGE", "")
        if asked and asked != image:
            allowed = config.get("allowed_images") or []
            if not isinstance(allowed, list) or asked not in allowed:
                raise LaunchError(
                    f"KERNEL_IMAGE {asked[:120]!r} is not allowed for kernelspec "
                    f"{getattr(request.spec, 'name', '')!r} (its allowed_images lists the images a client may choose)",
                    status=403,
                )
            image = asked
        if not image:
            raise LaunchError(
                "no kernel image: set the kernelspec's image_name or kubernetes_image (EG_KUBERNETES_IMAGE)"
            )
        if not IMAGE.match(image):
            raise LaunchError(f"kernel image {image[:120]!r} is not an image name", status=400 if asked else 500)
        for variable in QUANTITIES:
            if env.get(variable):
                check_quantity(variable, env[variable])
        for variable in ("KERNEL_GPUS", "KERNEL_GPUS_LIMIT"):
            asked_gpus = env.get(variable, "")
            most = as_int(config.get("max_gpus"))
            if asked_gpus and (not asked_gpus.isdigit() or int(asked_gpus) > most):
                raise LaunchError(
                    f"{variable}={asked_gpus[:20]!r} is more GPUs than kernelspec "
                    f"{getattr(request.spec, 'name', '')!r} allows (its max_gpus: {most})",
                    status=403,
                )
        name = pod_name(request.username, request.kernel_id)
        if not POD_NAME.match(name):
            raise LaunchError(f"cannot name a pod for kernel {request.kernel_id!r}", status=400)
        namespace, own_namespace = self.namespaces.choose(str(config.get("namespace") or ""), request.username, name)
        if not POD_NAME.match(namespace):
            raise LaunchError(f"{namespace[:80]!r} cannot name a Kubernetes namespace", status=400)
        template, source = await self._template(request)
        values: dict[str, Any] = {k: v for k, v in values_for(env).items() if k not in CONTROLLED}
        values.update(
            kernel_id=request.kernel_id,
            kernel_namespace=namespace,
            kernel_pod_name=name,
            kernel_image=image,
            kernel_username=request.username,
            kernel_service_account_name=str(
                config.get("service_account_name") or self._settings.kubernetes_service_account
            ),
            kernel_image_pull_policy=str(config.get("image_pull_policy") or self._settings.kubernetes_image_pull_policy),
            kernel_volumes=list(config.get("volumes") or []),
            kernel_volume_mounts=list(config.get("volume_mounts") or []),
        )
        for key in ("cpus", "memory", "gpus"):
            # The kernelspec's (or its profile's) request, unless the client's value replaces it.
            if config.get(key) is not None and f"kernel_{key}" not in values:
                values[f"kernel_{key}"] = check_quantity(f"kernelspec config {key}", str(config[key]), 500)
        for key in ("uid", "gid"):
            if config.get(key) is not None:
                values[f"kernel_{key}"] = str(config[key])
        if request.cwd and config.get("mirror_working_dirs"):
            values["kernel_working_dir"] = request.cwd
        pod, extras = kernel_documents(render(template, values, source), source)
        from_client = any(env.get(v) for v in QUANTITIES)
        return _PodLaunch(namespace=namespace, name=name, pod=pod, from_client=from_client,
                          own_namespace=own_namespace, extras=extras)

    async def forget_namespace(self, namespace: str) -> None:
        """
        A kernel's own namespace is done with: stop its watches and delete it
        (logged, not raised, when that fails).
        """
        for watches in (self._watches, self._event_watches):
            watch = watches.pop(namespace, None)
            if watch is not None:
                watch.stop()
        await self.namespaces.delete(namespace)

    async def _template(self, request: LaunchRequest) -> tuple[str, str]:
        """
        The pod template's text and where it came from: the kernelspec's
        C{pod_template} (relative to its directory), else its
        C{scripts/kernel-pod.yaml.j2} (Enterprise Gateway's layout), else
        C{kubernetes_pod_template}, else the built-in one.
        """
        resource_dir = str(getattr(request.spec, "resource_dir", "") or "")
        candidates = []
        named = request.config.get("pod_template")
        if named:
            candidates.append((os.path.join(resource_dir, str(named)), True))
        if resource_dir:
            candidates.append((os.path.join(resource_dir, "scripts", "kernel-pod.yaml.j2"), False))
        if self._settings.kubernetes_pod_template:
            candidates.append((self._settings.kubernetes_pod_template, True))

        def read_blocking() -> tuple[str, str] | None:
            for path, required in candidates:
                try:
                    with open(path, encoding="utf-8") as f:
                        return f.read(), f"pod template {path}"
                except FileNotFoundError:
                    if required:
                        raise LaunchError(f"pod template {path} does not exist") from None
                except OSError as e:
                    raise LaunchError(f"cannot read pod template {path}: {e}") from None
            return None

        found = await self._call(read_blocking)
        return found or (DEFAULT_TEMPLATE, "built-in pod template")

    def _pod_env(self, launch: RemoteLaunch) -> dict[str, str]:
        """
        The container's environment: the kernel's C{KERNEL_*} variables and
        the kernelspec's own, then Enterprise Gateway's contract.
        """
        request, state = launch.request, launch.state
        spec_env = getattr(request.spec, "env", None) or {}
        env = {k: str(v) for k, v in request.env.items() if k.startswith("KERNEL_") or k in spec_env}
        language = str(getattr(request.spec, "language", "") or "python").lower()
        container = state.pod["spec"]["containers"][0]
        env.update(
            KERNEL_ID=request.kernel_id,
            KERNEL_USERNAME=request.username,
            KERNEL_LANGUAGE=env.get("KERNEL_LANGUAGE") or language,
            KERNEL_NAMESPACE=state.namespace,
            KERNEL_POD_NAME=state.name,
            KERNEL_IMAGE=str(container.get("image", "")),
            RESPONSE_ADDRESS=launch.listener.response_address,
            PUBLIC_KEY=launch.listener.public_key,
            PORT_RANGE=str(request.config.get("port_range") or self._kernels.port_range),
        )
        if self._gateway_id:
            env[GATEWAY_ID_ENV] = self._gateway_id
        return env

    async def _submit(self, launch: RemoteLaunch) -> None:
        request, state = launch.request, launch.state
        if state.namespace != self._settings.kubernetes_namespace:
            spec = state.pod.get("spec") or {}
            await self.namespaces.ensure(state.namespace, request.username,
                                         str(spec.get("serviceAccountName") or "default"))
        watch = await self.watch(state.namespace)
        state.unfollow = watch.follow(state.name, state.update)
        pod = finish_pod(
            state.pod,
            name=state.name,
            namespace=state.namespace,
            kernel_id=request.kernel_id,
            gateway_id=self._gateway_id,
            username=request.username,
            env=self._pod_env(launch),
            secret=state.secret,
            token_key=TOKEN_KEY,
            pull_policy=self._settings.kubernetes_image_pull_policy,
        )
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": state.secret, "namespace": state.namespace,
                         "labels": {"kernel_id": request.kernel_id, "component": "kernel-launch"}},
            "type": "Opaque",
            "data": {TOKEN_KEY: base64.b64encode(launch.pending.token.encode()).decode()},
        }
        try:
            await self._call(self.client.create_blocking, "secret", state.namespace, secret)
            state.created = True
            for doc in state.extras:
                # Before the pod, which may mount them.
                kind = EXTRA_KINDS[doc["kind"]]
                finish_extra(doc, namespace=state.namespace, kernel_id=request.kernel_id,
                             gateway_id=self._gateway_id, username=request.username)
                await self._call(self.client.create_blocking, kind, state.namespace, doc)
                state.made.append((kind, str(doc["metadata"]["name"])))
            created = await self._call(self.client.create_blocking, "pod", state.namespace, pod)
        except CancelledError:
            raise
        except LaunchError:
            raise
        except Exception as e:
            status = getattr(e, "status", None)
            raise LaunchError(
                f"Kubernetes refused the kernel pod {state.namespace}/{state.name} (or what its template creates "
                f"with it): {api_error(e)}",
                status=400 if status in (400, 422) and state.from_client else 500,
            ) from None
        for kind, made in [("secret", state.secret), *state.made]:
            try:
                await self._call(self.client.own_blocking, kind, state.namespace, made, created)
            except CancelledError:
                raise
            except Exception as e:
                _log.warn("kernel {kernel_id}: {kind} {name} is not owned by its pod, so it stays until the gateway "
                          "deletes it with the kernel: {error}", kernel_id=request.kernel_id, kind=kind, name=made,
                          error=api_error(e))
        _log.info("kernel {kernel_id}: created pod {namespace}/{pod}", kernel_id=request.kernel_id,
                  namespace=state.namespace, pod=state.name)
        request.report(Phase.SUBMITTED, f"pod {state.namespace}/{state.name}")
        uid = str((created.get("metadata") or {}).get("uid") or "")
        events = self._event_watches.get(state.namespace)
        if events is not None:
            state.unfollow_events = events.follow(state.name, lambda event: self._pod_event(request, state, uid, event))
        if state.state is None and state.name in watch.pods:
            state.update(watch.pods[state.name])

    def _pod_event(self, request: LaunchRequest, state: _PodLaunch, uid: str, event: Mapping[str, Any] | None) -> None:
        """
        A Kubernetes event about the launching pod: warnings (FailedMount,
        FailedScheduling, BackOff ...) are reported as the C{submitted}
        phase's detail, so a launch that times out says why.
        """
        if event is None or (event.get("involvedObject") or {}).get("uid") != uid or event.get("type") != "Warning":
            return
        warning = f"{event.get('reason', '')}: {str(event.get('message') or '').strip()[:300]}"
        if warning != state.warning:
            state.warning = warning
            request.report(Phase.SUBMITTED, f"pod {state.namespace}/{state.name}: Warning {warning}")

    async def _await_placement(self, launch: RemoteLaunch) -> Placed:
        request, state = launch.request, launch.state
        reported = ""
        while True:
            if state.gone:
                raise LaunchError(f"pod {state.namespace}/{state.name} was deleted before its kernel started")
            pod = state.state
            if pod is not None:
                problem = launch_problem(pod)
                if problem is not None:
                    raise LaunchError(
                        f"kernel pod {state.namespace}/{state.name} cannot start: {problem}"
                        + await self._log_suffix(state),
                        status=400 if state.from_client and problem.startswith("FailedScheduling") else 500,
                    )
                address = running_address(pod)
                node = str((pod.get("spec") or {}).get("nodeName") or "")
                if address:
                    return Placed(node, address, f"pod {state.namespace}/{state.name} on {node} ({address})")
                now = progress(pod)
                if now != reported:
                    reported = now
                    request.report(Phase.SUBMITTED, f"pod {state.namespace}/{state.name}: {now}")
            await state.changed.when_fired()

    async def _log_suffix(self, state: _PodLaunch) -> str:
        if state.state is None or not terminated(state.state):
            return ""
        tail = await self._call(self.client.log_tail_blocking, state.namespace, state.name)
        return f"; its log ends: {tail}" if tail else ""

    async def _launch_ended(self, launch: RemoteLaunch) -> str | None:
        state = launch.state
        if state.gone:
            return f"pod {state.namespace}/{state.name} was deleted before its kernel reported"
        if state.state is None:
            return None
        problem = launch_problem(state.state)
        if problem is None:
            return None
        return (
            f"kernel pod {state.namespace}/{state.name} ended before the kernel sent its connection info: "
            f"{problem}" + await self._log_suffix(state)
        )

    def _kernel(
        self, launch: RemoteLaunch, placed: Placed, info: ConnectionInfo, payload: Mapping[str, Any]
    ) -> IKernelProcess:
        state = launch.state
        state.stop_following()
        return KubernetesKernelProcess(
            launcher=self,
            namespace=state.namespace,
            name=state.name,
            watch=self._watches[state.namespace],
            own_namespace=state.own_namespace,
            extras=state.made,
            placement=Placement(host=placed.host, ip=placed.address,
                                extra={"namespace": state.namespace, "pod": state.name}),
            **self._kernel_arguments(launch, info, payload),
        )

    async def _abandon(self, launch: RemoteLaunch) -> None:
        state = launch.state
        state.stop_following()
        if state.created:
            _log.info("kernel {kernel_id}: deleting pod {namespace}/{pod} of a failed launch",
                      kernel_id=launch.request.kernel_id, namespace=state.namespace, pod=state.name)
            await self.delete_pod(state.namespace, state.name, grace=0, extras=state.made)
        if state.own_namespace:
            await self.forget_namespace(state.namespace)

    # -- restoring ---------------------------------------------------------------

    async def _restore(self, kernel_id: str, snapshot: Mapping[str, Any]) -> IKernelProcess:
        arguments = self._restored_arguments(kernel_id, snapshot)
        namespace, name = self._snapshot_fields(snapshot, "namespace", "pod")
        watch = await self.watch(namespace)
        pod = watch.pods.get(name)
        if pod is None or running_address(pod) is None:
            raise LaunchError(f"kernel {kernel_id} is no longer running: pod {namespace}/{name} is "
                              + ("gone" if pod is None else progress(pod)))
        if (pod.get("metadata") or {}).get("labels", {}).get("kernel_id") != kernel_id:
            raise LaunchError(f"pod {namespace}/{name} is not the pod of kernel {kernel_id}")
        return KubernetesKernelProcess(
            launcher=self,
            namespace=namespace,
            name=name,
            watch=watch,
            own_namespace=bool(snapshot.get("own_namespace")),
            extras=[(str(kind), str(made)) for kind, made in snapshot.get("extras") or []
                    if kind in EXTRA_KINDS.values()],
            placement=Placement(host=str(snapshot.get("host") or ""), ip=arguments["info"].ip,
                                extra={"namespace": namespace, "pod": name}),
            **arguments,
        )

    # -- inventory ---------------------------------------------------------------

    async def _find(self, gateway_id: str, hints: Sequence[Mapping[str, Any]]) -> list[Found]:
        """
        The kernel pods labelled with this gateway's id in the namespaces
        kernels go to (the setting's and those the kernelspecs name).  They
        can be reaped (deleted) but not adopted: a pod does not keep its
        kernel's connection info.

        @raise LaunchError: the API cannot be reached.
        """
        # Per-user namespaces are many: look in all (the mode needs cluster-wide rights anyway).
        namespaces = [self._settings.kubernetes_namespace if self._settings.kubernetes_namespace_mode == "shared" else ""]
        for config in hints:
            if config.get("namespace") and str(config["namespace"]) not in namespaces:
                namespaces.append(str(config["namespace"]))
        found: list[Found] = []
        seen: set[str] = set()
        for namespace in namespaces:
            try:
                pods = await self._call(self.client.list_blocking, namespace, f"{GATEWAY_LABEL}={gateway_id}")
            except CancelledError:
                raise
            except Exception as e:
                where = f"namespace {namespace}" if namespace else "any namespace"
                raise LaunchError(f"cannot list kernel pods in {where}: {api_error(e)}") from None
            for pod in pods:
                metadata = pod.get("metadata") or {}
                kernel_id = str((metadata.get("labels") or {}).get("kernel_id") or "")
                name = str(metadata.get("name") or "")
                namespace = str(metadata.get("namespace") or namespace)
                if not kernel_id or not name or kernel_id in seen:
                    continue
                seen.add(kernel_id)
                found.append(
                    self._found(
                        kernel_id,
                        f"pod {namespace}/{name} ({progress(pod)})",
                        lambda namespace=namespace, name=name: self._reap(namespace, name),
                    )
                )
        return found

    async def _reap(self, namespace: str, name: str) -> None:
        await self.watch(namespace)
        await self.delete_pod(namespace, name)


async def _pod_event(watch: NamespaceWatch, name: str, seconds: float, clock: Any) -> None:
    """
    Wait until the pod changes or C{seconds} pass, whichever is first.
    """
    from egateway.observe import first

    changed: Deferred[None] = Deferred()

    def follower(pod: Any) -> None:
        if not changed.called:
            changed.callback(None)

    unfollow = watch.follow(name, follower)
    try:
        await first([changed, deferLater(clock, seconds, lambda: None)])
    finally:
        unfollow()


__all__ = ["KubeClient", "KubernetesKernelProcess", "KubernetesLauncher", "api_error"]
