"""
egateway deployed in the cluster from the manifests in C{etc/kubernetes/}
(C{rbac-shared.yaml}, then C{egateway.yaml}), on the real single-node
cluster of L{tests.fixtures.kubecluster}.

The gateway's image is built here the way the kernel image is (no
registry): an almost empty root file system; the pod mounts this
checkout, this machine's Python and the test's kernelspecs read-only from
the host.  The manifests are applied as shipped, with only what this
machine needs put in: the image and C{imagePullPolicy: Never}, those
mounts, faster probes, and the API server's address (the fixture has no
kube-proxy to route the C{kubernetes} Service, so the test forwards a port
on the bridge to the API server; the gateway still authenticates with the
in-cluster ServiceAccount token, no kubeconfig).
"""

from __future__ import annotations

import copy
import os
import secrets
import signal
from typing import Any, Callable

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.protocols.portforward import ProxyFactory
from twisted.trial.unittest import TestCase

from tests.fixtures.kubecluster import REPO_ROOT, KubeCluster
from tests.support.daemon import HttpApi
from tests.support.remote_kernels import launcher_argv, write_spec
from tests.support.wsclient import ChannelsClient
from tests.test_kubernetes import NAMESPACE, cluster, manifest

GATEWAY_IMAGE = "docker.io/local/egateway:test"
CHECKOUT = "/opt/egateway/src"
KERNELSPECS = "/opt/egateway/kernelspecs"  # where egateway.yaml's EG_KERNELSPEC_PATH points
SELECTOR = "app=egateway,component=gateway"


def build_gateway_image_blocking(kube: KubeCluster, workdir: str) -> None:
    """
    Import the gateway's image: the kernel image's almost empty root file
    system with the account the Deployment runs as (uid 1000, gid 100).
    """
    passwd = os.path.join(workdir, "passwd")
    with open(passwd, "w") as f:
        f.write("root:x:0:0:root:/root:/bin/sh\negateway:x:1000:100:egateway:/tmp:/usr/sbin/nologin\n"
                "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")
    kube.import_image(GATEWAY_IMAGE, {"/etc/passwd": passwd}, entrypoint=[], env={"HOME": "/tmp"})


def for_this_machine(docs: list[dict[str, Any]], kube: KubeCluster, specs: str, api_port: int,
                     marker: str) -> list[dict[str, Any]]:
    """
    egateway.yaml's documents with this machine's image, mounts, probe
    periods and API server address put in (see the module docstring).
    """
    docs = copy.deepcopy(docs)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    container["image"] = GATEWAY_IMAGE
    container["imagePullPolicy"] = "Never"
    container["env"] += [
        {"name": "KUBERNETES_SERVICE_HOST", "value": kube.host_ip},
        {"name": "KUBERNETES_SERVICE_PORT", "value": str(api_port)},
        {"name": "PYTHONPATH", "value": CHECKOUT},
        {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
        {"name": "EGW_DEPLOY_TEST", "value": marker},  # finds its process from the host
    ]
    volumes, mounts = kube.kernel_volumes()
    for path, target in ((REPO_ROOT, CHECKOUT), (specs, KERNELSPECS)):
        volumes.append({"name": f"host{len(volumes)}", "hostPath": {"path": path, "type": "Directory"}})
        mounts.append({"name": volumes[-1]["name"], "mountPath": target, "readOnly": True})
    pod["volumes"] += volumes
    container["volumeMounts"] += mounts
    container["readinessProbe"]["periodSeconds"] = 1
    container["livenessProbe"].update(initialDelaySeconds=1, periodSeconds=1)
    pod["terminationGracePeriodSeconds"] = 30
    return docs


def process_with_marker(marker: str) -> int | None:
    """
    The host pid of the twistd process whose environment holds C{marker}.
    """
    needle = f"EGW_DEPLOY_TEST={marker}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read().split(b"\0")
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if needle in environ and b"twistd" in cmdline:
            return int(entry)
    return None


async def until(check: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    """
    Call the blocking C{check} in a thread until it returns something true.
    """
    deadline = reactor.seconds() + timeout
    while True:
        result = await deferToThread(check)
        if result:
            return result
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await deferLater(reactor, 0.2, lambda: None)


class GatewayPodTests(TestCase):
    """
    The gateway as a pod of the Deployment in etc/kubernetes/egateway.yaml.
    """

    timeout = 360

    async def setUp(self) -> None:
        self.kube = await deferToThread(cluster)
        self.core = self.kube.api()
        specs = os.path.abspath(self.mktemp())
        volumes, mounts = self.kube.kernel_volumes()
        write_spec(specs, "pod", launcher_argv(), "kubernetes",
                   config={"image_name": self.kube.kernel_image, "image_pull_policy": "Never", "volumes": volumes,
                           "volume_mounts": mounts})
        await deferToThread(build_gateway_image_blocking, self.kube, specs)
        port = await TCP4ServerEndpoint(reactor, 0, interface=self.kube.host_ip).listen(
            ProxyFactory("127.0.0.1", self.kube.api_port))
        self.addCleanup(port.stopListening)
        self.marker = secrets.token_hex(8)
        self.token = secrets.token_hex(16)
        token_secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "egateway-auth",
                                                                           "namespace": NAMESPACE},
                        "stringData": {"token": self.token}}
        # Cleanups run last first: the gateway goes (shutting its kernels down with its rights), then its rights.
        rights = await deferToThread(self.kube.apply, [*manifest("rbac-shared.yaml"), token_secret])
        self.addCleanup(deferToThread, self.kube.delete, rights)
        self.addCleanup(self.nothing_left)
        gateway = for_this_machine(manifest("egateway.yaml"), self.kube, specs, port.getHost().port, self.marker)
        created = await deferToThread(self.kube.apply, gateway)
        self.addCleanup(deferToThread, self.kube.delete, created)

    async def nothing_left(self) -> None:
        """
        Deleting the Deployment stops the gateway pod, which shuts its kernels down.
        """

        left: list[str] = []

        def gone() -> bool:
            pods = self.core.list_namespaced_pod(NAMESPACE, label_selector=SELECTOR, _request_timeout=10).items
            kernels = self.core.list_namespaced_pod(NAMESPACE, label_selector="kernel_id", _request_timeout=10).items
            left[:] = [f"{p.metadata.name} ({p.status.phase}, deleting since {p.metadata.deletion_timestamp})"
                       for p in pods + kernels]
            return not left

        # The pods' grace period is 30 s; the rest of the bound is the kubelet's own pace on a loaded machine (a
        # CI run took over 60 s; 5 s on a quiet one).
        try:
            await until(gone, "the gateway pod and its kernel pods to be deleted", timeout=120)
        except AssertionError as e:
            raise AssertionError(f"{e}; left: {left}") from None

    def gateway_pod(self) -> Any:
        pods = self.core.list_namespaced_pod(NAMESPACE, label_selector=SELECTOR, _request_timeout=10).items
        return pods[0] if len(pods) == 1 else None

    def ready(self, pod: Any) -> bool:
        return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])

    def endpoints(self) -> tuple[list[str], list[str]]:
        """
        The Service's ready and not-ready addresses.
        """
        subsets = self.core.read_namespaced_endpoints("egateway", NAMESPACE, _request_timeout=10).subsets or []
        return ([a.ip for s in subsets for a in s.addresses or []],
                [a.ip for s in subsets for a in s.not_ready_addresses or []])

    async def test_gateway_pod_serves_a_kernel_and_drains(self) -> None:
        """
        The Deployment's pod becomes ready (its readiness probe) and is the
        Service's endpoint; through it, with the token from its Secret, a
        kernel pod starts (the gateway using its in-cluster account with
        the rights of rbac-shared.yaml) and runs code; after SIGUSR1 the
        readiness probe fails, the Service drops the pod, new kernels are
        refused with 503 and the running kernel is still served; the
        liveness probe never restarted the container.
        """

        def ready_pod() -> Any:
            pod = self.gateway_pod()
            return pod if pod is not None and self.ready(pod) else None

        try:
            pod = await until(ready_pod, "the gateway pod to be ready", timeout=90)
        except AssertionError:
            raise AssertionError("the gateway pod is not ready; its log ends:\n" + await deferToThread(self.log))
        ip = pod.status.pod_ip
        self.assertEqual(await until(lambda: self.endpoints()[0], "the Service's endpoint"), [ip])
        api = HttpApi(reactor, f"http://{ip}:8888/", self.token)
        self.addCleanup(api.close)
        self.assertEqual((await api.request("GET", "healthz", token=None)).code, 200)
        self.assertEqual((await api.request("GET", "api/kernels", token=None)).code, 401)

        model = await api.call("POST", "api/kernels", {"name": "pod"}, expect=201)
        self.assertEqual(model["placement"]["namespace"], NAMESPACE)
        client = await ChannelsClient.connect(f"http://{ip}:8888/", model["id"], token=self.token)
        self.addCleanup(client.close)
        result = await client.execute("import os; print(os.environ['RESPONSE_ADDRESS'])")
        self.assertEqual(result["stdout"].strip(), f"{ip}:8877")

        pid = await deferToThread(process_with_marker, self.marker)
        self.assertIsNotNone(pid, "the gateway's process is visible from the host")
        assert pid is not None
        os.kill(pid, signal.SIGUSR1)
        await self.answers(api, "readyz", 503)
        await until(lambda: not self.ready(self.gateway_pod()), "the readiness probe to fail")
        self.assertEqual(await until(lambda: self.endpoints()[1], "the Service to drop the pod"), [ip])
        refused = await api.request("POST", "api/kernels", {"name": "pod"})
        self.assertEqual(refused.code, 503, refused.body)
        self.assertEqual((await client.execute("6 * 7"))["result"]["text/plain"], "42")
        self.assertEqual((await api.request("GET", "healthz", token=None)).code, 200)

        await api.call("DELETE", f"api/kernels/{model['id']}", expect=204)
        pod = await deferToThread(self.gateway_pod)
        self.assertEqual(pod.status.container_statuses[0].restart_count, 0)

    async def answers(self, api: HttpApi, path: str, code: int, timeout: float = 10.0) -> None:
        """
        Wait until C{GET path} answers C{code} (a signal reaches the gateway's
        reactor a moment after it is sent).
        """
        deadline = reactor.seconds() + timeout
        while (reply := await api.request("GET", path, token=None)).code != code:
            self.assertLess(reactor.seconds(), deadline, f"GET {path}: {reply.code} {reply.body!r}")
            await deferLater(reactor, 0.1, lambda: None)

    def log(self) -> str:
        pod = self.gateway_pod()
        if pod is None:
            return "(no pod)"
        try:
            return self.core.read_namespaced_pod_log(pod.metadata.name, NAMESPACE, tail_lines=40)
        except Exception as e:
            return f"(no log: {e}; status: {pod.status})"

