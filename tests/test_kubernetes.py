"""
Kernels as Kubernetes pods, on a real single-node Kubernetes v1.20 (etcd,
kube-apiserver, controller-manager, scheduler, kubelet, containerd, a CNI
bridge; L{tests.fixtures.kubecluster}) shared by the tests of this process,
with a gateway inside the test's reactor.

The kernel image is built from this checkout: its entry point is
C{launchers/bootstrap/bootstrap-kernel.sh} (Enterprise Gateway's
environment contract), and the pod mounts this machine's Python with
ipykernel read-only.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
from typing import Any

import yaml
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from tests.fixtures.kubecluster import REPO_ROOT, KubeCluster, shared_cluster
from tests.fixtures.system import NotRoot
from tests.support.gateway import GatewayTestCase
from tests.support.polling import eventually
from tests.support.remote_kernels import interrupt_sleeping_cell, launcher_argv, write_spec
from tests.support.wsclient import ChannelsClient
from tests.test_kubernetes_pods import WITH_EXTRAS
from tests.test_reconcile import ReconcileTestCase, forget

NAMESPACE = "default"


def cluster() -> KubeCluster:
    """
    The shared cluster; a skip only where the machine cannot run one at all
    (not root, as CI is).
    """
    try:
        return shared_cluster()
    except NotRoot as e:
        if os.environ.get("CI"):
            raise
        raise SkipTest(f"Kubernetes tests need root: {e}") from None


def manifest(name: str) -> list[dict[str, Any]]:
    """
    The documents of etc/kubernetes/C{name}.
    """
    with open(os.path.join(REPO_ROOT, "etc", "kubernetes", name)) as f:
        return [d for d in yaml.safe_load_all(f) if d]


JEG_STYLE_TEMPLATE = """\
# A pod template written the way Enterprise Gateway's kernel-pod.yaml.j2 is, plus a client-chosen note.
apiVersion: v1
kind: Pod
metadata:
  name: "{{ kernel_pod_name }}"
  namespace: "{{ kernel_namespace }}"
  labels:
    kernel_id: "{{ kernel_id }}"
    app: enterprise-gateway
    component: kernel
  annotations:
    note: "{{ kernel_note }}"
spec:
  restartPolicy: Never
  serviceAccountName: "{{ kernel_service_account_name }}"
  containers:
  - image: "{{ kernel_image }}"
    name: "{{ kernel_pod_name }}"
    env:
    - name: NOTE
      value: "{{ kernel_note }}"
    volumeMounts:
    {% for volume_mount in kernel_volume_mounts %}
    - {{ volume_mount }}
    {% endfor %}
  volumes:
  {% for volume in kernel_volumes %}
  - {{ volume }}
  {% endfor %}
"""


class KubernetesGatewayTestCase(GatewayTestCase):
    """
    A gateway whose kernelspecs run kernels as pods on the shared cluster.
    """

    timeout = 180
    extra_settings: dict[str, Any] = {}

    async def setUp(self) -> None:
        self.cluster = await deferToThread(cluster)
        self.core = self.cluster.api()
        self.specs = os.path.abspath(self.mktemp())
        volumes, mounts = self.cluster.kernel_volumes()
        base = {
            "image_name": self.cluster.kernel_image,
            "image_pull_policy": "Never",
            "volumes": volumes,
            "volume_mounts": mounts,
        }
        write_spec(self.specs, "pod", launcher_argv(), "kubernetes", config=base)
        write_spec(self.specs, "missing-image", launcher_argv(), "kubernetes",
                   config={**base, "image_name": "127.0.0.1:1/egateway/missing:1", "image_pull_policy": "Always"})
        write_spec(self.specs, "bad-language", launcher_argv(), "kubernetes", config=base,
                   env={"KERNEL_LANGUAGE": "cobol"})
        write_spec(self.specs, "bad-volume", launcher_argv(), "kubernetes",
                   config={**base, "volumes": [*volumes, {"name": "gone", "hostPath": {"path": "/nonexistent/egw",
                                                                                      "type": "Directory"}}],
                           "volume_mounts": [*mounts, {"name": "gone", "mountPath": "/gone"}]})
        write_spec(self.specs, "jeg-style", launcher_argv(), "kubernetes", config=base)
        os.makedirs(os.path.join(self.specs, "jeg-style", "scripts"))
        with open(os.path.join(self.specs, "jeg-style", "scripts", "kernel-pod.yaml.j2"), "w") as f:
            f.write(JEG_STYLE_TEMPLATE)
        await self.more_specs(base)
        self.gateway_settings = {
            "kernelspec_path": self.specs,
            "response_ip": self.cluster.host_ip,
            "kubernetes_config": self.cluster.kubeconfig,
            "kubernetes_namespace": NAMESPACE,
            "kubernetes_delete_grace": 2,
            "list_kernels": "true",
            "shutdown_wait": 3,
            "terminate_wait": 3,
            "poll_interval": 0.5,
            **self.extra_settings,
        }
        self.addCleanup(self.nothing_left)
        await super().setUp()

    async def more_specs(self, base: dict[str, Any]) -> None:
        """
        Write more kernelspecs into C{self.specs} before the gateway starts.
        """

    async def nothing_left(self) -> None:
        """
        No kernel pod or launch secret of this gateway remains (checked
        after the gateway stopped).
        """
        await eventually(lambda: not self.kernel_objects(), "kernel pods and secrets to be deleted", timeout=30)

    def kernel_objects(self) -> list[str]:
        pods = self.core.list_namespaced_pod(NAMESPACE, label_selector="kernel_id", _request_timeout=10).items
        secrets = self.core.list_namespaced_secret(NAMESPACE, label_selector="kernel_id", _request_timeout=10).items
        return [f"pod {p.metadata.name}" for p in pods] + [f"secret {s.metadata.name}" for s in secrets]

    def delete_namespace(self, name: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self.core.delete_namespace(name, _preload_content=False)
        except ApiException as e:
            if e.status != 404:
                raise

    def pod(self, name: str) -> Any:
        return json.loads(self.core.read_namespaced_pod(name, NAMESPACE, _preload_content=False).data)

    async def assert_kernel_role(self, namespace: str) -> None:
        """
        The gateway bound the ClusterRole kernel-controller to the kernels'
        service account in C{namespace}: it may create pods there, and
        nowhere else.
        """
        from kubernetes import client

        rbac = client.RbacAuthorizationV1Api(self.core.api_client)
        binding = await deferToThread(rbac.read_namespaced_role_binding, "kernel-controller", namespace)
        self.assertEqual((binding.role_ref.kind, binding.role_ref.name), ("ClusterRole", "kernel-controller"))
        self.assertEqual([(s.kind, s.name, s.namespace) for s in binding.subjects],
                         [("ServiceAccount", "default", namespace)])
        reviews = client.AuthorizationV1Api(self.core.api_client)

        def allowed(where: str) -> bool:
            review = {"spec": {"user": f"system:serviceaccount:{namespace}:default",
                               "resourceAttributes": {"namespace": where, "verb": "create", "resource": "pods"}}}
            return bool(reviews.create_subject_access_review(review).status.allowed)

        self.assertTrue(await deferToThread(allowed, namespace))
        self.assertFalse(await deferToThread(allowed, NAMESPACE))

    async def start(self, name: str = "pod", env: dict[str, str] | None = None, expect: int = 201) -> Any:
        body: dict[str, Any] = {"name": name, **({"env": env} if env else {})}
        code, model = await self.gateway.request("POST", "api/kernels", body)
        self.assertEqual(code, expect, model)
        return model


class PodKernelTests(KubernetesGatewayTestCase):
    async def test_pod_kernel_runs_code_is_interrupted_and_leaves_nothing(self) -> None:
        """
        A kernel started through the API runs in a pod named and labelled
        for it, runs code through the WebSocket with Enterprise Gateway's
        environment contract (and no launch token in its environment), is
        interrupted through its comm port, and shutting it down deletes
        its pod and its launch secret.
        """
        model = await self.start()
        kernel_id = model["id"]
        placement = model["placement"]
        self.assertEqual(placement["namespace"], NAMESPACE)
        pod = self.pod(placement["pod"])
        self.assertTrue(placement["pod"].endswith(f"-{kernel_id}"), placement)
        labels = pod["metadata"]["labels"]
        self.assertEqual(labels["kernel_id"], kernel_id)
        self.assertEqual(labels["component"], "kernel")
        self.assertIn("egateway/gateway-id", labels)
        self.assertEqual(placement["ip"], pod["status"]["podIP"])
        env_names = [e["name"] for e in pod["spec"]["containers"][0]["env"]]
        self.assertIn("RESPONSE_ADDRESS", env_names)
        token_entry = [e for e in pod["spec"]["containers"][0]["env"] if e["name"] == "EG_LAUNCH_TOKEN"]
        self.assertEqual(list(token_entry[0]), ["name", "valueFrom"], "the token is not in the pod's spec")
        phases = [p["phase"] for p in model["phases"]]
        self.assertEqual(phases[-4:], ["placed", "connection info received", "connected", "ready"])
        self.assertEqual(model["phases"][1]["detail"], f"pod {NAMESPACE}/{placement['pod']}")

        client = await ChannelsClient.connect(self.gateway.url, kernel_id)
        self.addCleanup(client.close)
        result = await client.execute(
            "import os, socket, json; print(json.dumps([socket.gethostname(), os.environ.get('KERNEL_ID'), "
            "os.environ.get('KERNEL_LANGUAGE'), 'EG_LAUNCH_TOKEN' in os.environ, "
            "b'EG_LAUNCH_TOKEN=' in open('/proc/self/environ', 'rb').read()]))"
        )
        self.assertEqual(json.loads(result["stdout"]), [placement["pod"], kernel_id, "python", False, False])

        code, reply = await interrupt_sleeping_cell(client, self.gateway, kernel_id)
        self.assertEqual(code, 204)
        self.assertEqual(reply["ename"], "KeyboardInterrupt")

        code, _ = await self.gateway.request("DELETE", f"api/kernels/{kernel_id}")
        self.assertEqual(code, 204)
        self.assertEqual(await deferToThread(self.kernel_objects), [])

    async def test_restart_makes_a_new_pod_under_the_same_id(self) -> None:
        """
        Restarting a pod kernel replaces its pod (a new pod, the same kernel
        id and pod name) and the kernel's state is fresh.
        """
        model = await self.start()
        kernel_id, name = model["id"], model["placement"]["pod"]
        old_uid = (await deferToThread(self.pod, name))["metadata"]["uid"]
        client = await ChannelsClient.connect(self.gateway.url, kernel_id)
        self.addCleanup(client.close)
        await client.execute("x = 1")
        code, restarted = await self.gateway.request("POST", f"api/kernels/{kernel_id}/restart")
        self.assertEqual(code, 200, restarted)
        self.assertEqual(restarted["id"], kernel_id)
        self.assertEqual(restarted["placement"]["pod"], name)
        pod = await deferToThread(self.pod, name)
        self.assertNotEqual(pod["metadata"]["uid"], old_uid)
        self.assertEqual(restarted["placement"]["ip"], pod["status"]["podIP"])
        self.assertEqual((await client.execute("'x' in dir()"))["result"]["text/plain"], "False")
        code, _ = await self.gateway.request("DELETE", f"api/kernels/{kernel_id}")
        self.assertEqual(code, 204)

    async def test_oom_killed_kernel_is_restarted_in_a_new_pod(self) -> None:
        """
        A kernel whose container is killed for exceeding its memory limit
        is restarted in a new pod (a crash, not a decision), and the reason
        names OOMKilled.
        """
        model = await self.start(env={"KERNEL_MEMORY_LIMIT": "200Mi"})
        kernel_id, name = model["id"], model["placement"]["pod"]
        old_uid = (await deferToThread(self.pod, name))["metadata"]["uid"]
        client = await ChannelsClient.connect(self.gateway.url, kernel_id)
        self.addCleanup(client.close)
        client.send("execute_request", {"code": "x = bytearray(1024 ** 3)", "silent": False, "store_history": False,
                                        "user_expressions": {}, "allow_stdin": False})
        deadline = reactor.seconds() + 60
        while True:
            code, now = await self.gateway.request("GET", f"api/kernels/{kernel_id}")
            if now.get("restarts") == 1 and now["state"] == "running":
                break
            self.assertLess(reactor.seconds(), deadline, f"the kernel was not restarted: {now}")
            await deferLater(reactor, 0.2, lambda: None)
        pod = await deferToThread(self.pod, name)
        self.assertNotEqual(pod["metadata"]["uid"], old_uid)
        self.assertIn("OOMKilled", now.get("reason", "") + json.dumps(now["phases"]))
        code, _ = await self.gateway.request("DELETE", f"api/kernels/{kernel_id}")
        self.assertEqual(code, 204)

    async def test_watch_resumes_after_a_drop(self) -> None:
        """
        When the namespace watch's connection drops, it resumes from the
        last resource version, and a pod deleted afterwards still ends its
        kernel.
        """
        from egateway.clusters.kube_watch import cut

        model = await self.start()
        watch = self.gateway.manager.launchers.get("kubernetes")._watches[NAMESPACE]
        await eventually(lambda: watch._response is not None, "the watch to be streaming")
        before = watch.opened
        cut(watch._response)
        await eventually(lambda: watch.opened > before, "the watch to resume")
        await deferToThread(self.core.delete_namespaced_pod, model["placement"]["pod"], NAMESPACE,
                            grace_period_seconds=0)
        deadline = reactor.seconds() + 30
        while True:
            code, now = await self.gateway.request("GET", f"api/kernels/{model['id']}")
            if now["execution_state"] == "dead":
                break
            self.assertLess(reactor.seconds(), deadline, f"the kernel is not declared dead: {now}")
            await deferLater(reactor, 0.2, lambda: None)
        self.assertIn("deleted outside the gateway", now["reason"])

    async def test_pod_deleted_outside_the_gateway(self) -> None:
        """
        A kernel whose pod someone deletes is dead with that reason, and is
        not restarted.
        """
        model = await self.start()
        pod = model["placement"]["pod"]
        await deferToThread(self.core.delete_namespaced_pod, pod, NAMESPACE, grace_period_seconds=1)

        deadline = reactor.seconds() + 30
        while True:
            code, now = await self.gateway.request("GET", f"api/kernels/{model['id']}")
            if code == 200 and now["execution_state"] == "dead":
                break
            self.assertLess(reactor.seconds(), deadline, f"the kernel is not declared dead: {now}")
            await deferLater(reactor, 0.2, lambda: None)
        self.assertIn(f"pod {NAMESPACE}/{pod} was deleted outside the gateway", now["reason"])
        self.assertIn("not restarted", now["reason"])
        self.assertEqual(now["restarts"], 0)


class UserNamespaceTests(KubernetesGatewayTestCase):
    """
    kubernetes_namespace_mode = user: each user's kernels in their own
    namespace, created on first use.
    """

    extra_settings = {"kubernetes_namespace_mode": "user", "kubernetes_namespace_prefix": "egw-test-"}

    async def test_two_users_two_namespaces(self) -> None:
        """
        Alice's and Bob's kernels run in egw-test-alice and egw-test-bob,
        each namespace created for them; shutdown deletes the pods.
        """
        for user in ("alice", "bob"):
            self.addCleanup(deferToThread, self.delete_namespace, f"egw-test-{user}")
        models = {}
        for user in ("alice", "bob"):
            models[user] = await self.start(env={"KERNEL_USERNAME": user})
            self.assertEqual(models[user]["placement"]["namespace"], f"egw-test-{user}")
            self.assertEqual(models[user]["placement"]["pod"], f"{user}-{models[user]['id']}")
        for user, model in models.items():
            pod = json.loads(self.core.read_namespaced_pod(model["placement"]["pod"], f"egw-test-{user}",
                                                           _preload_content=False).data)
            self.assertEqual(pod["metadata"]["labels"]["egateway/user"], user)
            client = await ChannelsClient.connect(self.gateway.url, model["id"])
            self.addCleanup(client.close)
            result = await client.execute("import os; print(os.environ['KERNEL_NAMESPACE'])")
            self.assertEqual(result["stdout"].strip(), f"egw-test-{user}")
            code, _ = await self.gateway.request("DELETE", f"api/kernels/{model['id']}")
            self.assertEqual(code, 204)
            pods = self.core.list_namespaced_pod(f"egw-test-{user}", label_selector="kernel_id").items
            self.assertEqual(pods, [])


class KernelNamespaceTests(KubernetesGatewayTestCase):
    """
    kubernetes_namespace_mode = kernel: each kernel's pod in a namespace of
    its own, deleted with the kernel.
    """

    extra_settings = {"kubernetes_namespace_mode": "kernel", "kubernetes_namespace_prefix": "egw-k-"}

    async def setUp(self) -> None:
        kube = await deferToThread(cluster)
        role = [d for d in manifest("rbac-per-user.yaml") if d["metadata"]["name"] == "kernel-controller"]
        created = await deferToThread(kube.apply, role)
        self.addCleanup(deferToThread, kube.delete, created)
        await super().setUp()

    async def test_namespace_per_kernel(self) -> None:
        """
        The kernel runs in egw-k-<pod name>, created for it with the
        kernel-controller ClusterRole bound to its service account;
        shutting the kernel down deletes the namespace too.
        """
        from kubernetes.client.exceptions import ApiException

        model = await self.start()
        namespace = model["placement"]["namespace"]
        self.addCleanup(deferToThread, self.delete_namespace, namespace)
        self.assertEqual(namespace, f"egw-k-{model['placement']['pod']}"[:63].strip("-"))
        await self.assert_kernel_role(namespace)
        client = await ChannelsClient.connect(self.gateway.url, model["id"])
        self.addCleanup(client.close)
        self.assertEqual((await client.execute("import os; print(os.environ['KERNEL_NAMESPACE'])"))["stdout"].strip(),
                         namespace)
        code, _ = await self.gateway.request("DELETE", f"api/kernels/{model['id']}")
        self.assertEqual(code, 204)
        try:
            phase = (await deferToThread(self.core.read_namespace, namespace)).status.phase
        except ApiException as e:
            self.assertEqual(e.status, 404)
        else:
            self.assertEqual(phase, "Terminating")


class LeastRightsTests(KubernetesGatewayTestCase):
    """
    The rights etc/kubernetes/rbac-shared.yaml grants are enough for a pod
    kernel's whole life, and no more than the README says.
    """

    manifest = "rbac-shared.yaml"

    async def setUp(self) -> None:
        self.cluster = await deferToThread(cluster)
        created = await deferToThread(self.cluster.apply, manifest(self.manifest))
        self.addCleanup(deferToThread, self.cluster.delete, created)
        self.kubeconfig = await deferToThread(self.cluster.account_kubeconfig, "default", "egateway",
                                              os.path.abspath(self.mktemp()))
        self.extra_settings = {**self.extra_settings, "kubernetes_config": self.kubeconfig}
        await super().setUp()

    async def test_kernel_with_the_gateway_account(self) -> None:
        """
        With the ServiceAccount's token only, a kernel starts, runs code and
        is shut down, leaving nothing; the account cannot list namespaces.
        """
        from kubernetes import client, config
        from kubernetes.client.exceptions import ApiException

        model = await self.start()
        ws = await ChannelsClient.connect(self.gateway.url, model["id"])
        self.addCleanup(ws.close)
        self.assertEqual((await ws.execute("6 * 7"))["result"]["text/plain"], "42")
        code, _ = await self.gateway.request("DELETE", f"api/kernels/{model['id']}")
        self.assertEqual(code, 204)
        limited = client.CoreV1Api(config.new_client_from_config(config_file=self.kubeconfig))
        with self.assertRaises(ApiException) as caught:
            await deferToThread(limited.list_namespace)
        self.assertEqual(caught.exception.status, 403)


class PerUserLeastRightsTests(LeastRightsTests):
    """
    The rights etc/kubernetes/rbac-per-user.yaml grants are enough for
    per-user namespaces.
    """

    manifest = "rbac-per-user.yaml"
    extra_settings = {"kubernetes_namespace_mode": "user", "kubernetes_namespace_prefix": "egw-rights-"}

    async def test_kernel_with_the_gateway_account(self) -> None:
        """
        With the ServiceAccount's token only, a user's namespace is created
        and a kernel runs code in it.
        """
        self.addCleanup(deferToThread, self.delete_namespace, "egw-rights-carol")
        model = await self.start(env={"KERNEL_USERNAME": "carol"})
        self.assertEqual(model["placement"]["namespace"], "egw-rights-carol")
        await self.assert_kernel_role("egw-rights-carol")
        ws = await ChannelsClient.connect(self.gateway.url, model["id"])
        self.addCleanup(ws.close)
        self.assertEqual((await ws.execute("6 * 7"))["result"]["text/plain"], "42")
        code, _ = await self.gateway.request("DELETE", f"api/kernels/{model['id']}")
        self.assertEqual(code, 204)


# The JEG style pod with a ConfigMap it mounts and a Service, all from one template.
EXTRAS_TEMPLATE = JEG_STYLE_TEMPLATE.replace(
    "    volumeMounts:\n", "    volumeMounts:\n    - {name: files, mountPath: /etc/kernel-files, readOnly: true}\n"
).replace(
    "  volumes:\n", '  volumes:\n  - name: files\n    configMap: {name: "{{ kernel_pod_name }}-files"}\n'
) + WITH_EXTRAS.replace("kernel_extra", "kernel_note")  # its Service names another namespace: overridden


class TemplateResourcesTests(LeastRightsTests):
    """
    A pod template that also asks for a ConfigMap and a Service, with the
    rights of etc/kubernetes/rbac-shared.yaml only.
    """

    async def more_specs(self, base: dict[str, Any]) -> None:
        write_spec(self.specs, "with-extras", launcher_argv(), "kubernetes",
                   config={**base, "pod_template": "pod.yaml.j2"})
        with open(os.path.join(self.specs, "with-extras", "pod.yaml.j2"), "w") as f:
            f.write(EXTRAS_TEMPLATE)

    def made_with(self, kernel_id: str) -> dict[str, Any]:
        selector = f"kernel_id={kernel_id}"
        found = {}
        for kind, listing in (("configmap", self.core.list_namespaced_config_map),
                              ("service", self.core.list_namespaced_service)):
            for item in json.loads(listing(NAMESPACE, label_selector=selector, _preload_content=False).data)["items"]:
                found[f"{kind} {item['metadata']['name']}"] = item["metadata"]
        return found

    async def test_kernel_with_the_gateway_account(self) -> None:
        """
        The ConfigMap (holding a client's value as plain text) and the
        Service are created in the kernel's namespace, labelled with the
        kernel and the gateway and owned by the pod; the kernel reads the
        mounted ConfigMap; shutting the kernel down deletes them.
        """
        note = "hello: [world] # {{ 1 }}"
        model = await self.start("with-extras", env={"KERNEL_NOTE": note})
        name = model["placement"]["pod"]
        pod = await deferToThread(self.pod, name)
        made = await deferToThread(self.made_with, model["id"])
        self.assertEqual(sorted(made), [f"configmap {name}-files", f"service {name}"])
        for metadata in made.values():
            self.assertEqual(metadata["namespace"], NAMESPACE)
            self.assertEqual(metadata["labels"]["egateway/gateway-id"], pod["metadata"]["labels"]["egateway/gateway-id"])
            self.assertEqual([(o["kind"], o["uid"]) for o in metadata["ownerReferences"]],
                             [("Pod", pod["metadata"]["uid"])])
        ws = await ChannelsClient.connect(self.gateway.url, model["id"])
        self.addCleanup(ws.close)
        result = await ws.execute("print(open('/etc/kernel-files/note').read())")
        self.assertEqual(result["stdout"].rstrip("\n"), note)
        code, _ = await self.gateway.request("DELETE", f"api/kernels/{model['id']}")
        self.assertEqual(code, 204)
        self.assertEqual(await deferToThread(self.made_with, model["id"]), {})


JEG_IMAGE = "docker.io/elyra/kernel-py:3.3.0"
JEG_MEMBERS = {
    "kernel.json": "etc/kernelspecs/python_kubernetes/kernel.json",
    "kernel-pod.yaml.j2": "etc/kernel-launchers/kubernetes/scripts/kernel-pod.yaml.j2",
    "bootstrap-kernel.sh": "etc/kernel-launchers/bootstrap/bootstrap-kernel.sh",
    "launch_ipykernel.py": "etc/kernel-launchers/python/scripts/launch_ipykernel.py",
}


def extract_jeg_blocking(destination: str) -> dict[str, str]:
    """
    Enterprise Gateway 3.3.0's Kubernetes kernelspec, pod template,
    bootstrap-kernel.sh and launcher, from its (cached, checksummed) source
    distribution.
    """
    import tarfile

    from tests.test_jeg_launcher_compat import JEG_VERSION, SDIST, cache_dir

    paths = {}
    with tarfile.open(os.path.join(cache_dir(), SDIST)) as archive:
        for name, member in JEG_MEMBERS.items():
            source = archive.extractfile(f"jupyter_enterprise_gateway-{JEG_VERSION}/{member}")
            assert source is not None
            paths[name] = os.path.join(destination, name)
            with source, open(paths[name], "wb") as out:
                out.write(source.read())
    return paths


class EnterpriseGatewayKernelspecTests(KubernetesGatewayTestCase):
    """
    Enterprise Gateway 3.3's python_kubernetes kernelspec with its
    kernel-pod.yaml.j2 (unchanged), and an image running its
    bootstrap-kernel.sh and launch_ipykernel.py (version 1 connection info,
    which the operator allows with response_accept_v1).
    """

    extra_settings = {"response_accept_v1": "true"}

    async def more_specs(self, base: dict[str, Any]) -> None:
        from tests.test_jeg_launcher_compat import jeg_launcher

        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        await jeg_launcher(workdir)  # downloads the source distribution once, checksummed
        files = await deferToThread(extract_jeg_blocking, workdir)
        # Like Enterprise Gateway's image: its bootstrap and launchers, run by a Python with pycryptodomex. This
        # machine's /usr and Python are mounted into the pod, so the files live under /opt instead of /usr/local/bin.
        await deferToThread(
            self.cluster.import_image,
            JEG_IMAGE,
            {"/opt/jeg/bootstrap-kernel.sh": files["bootstrap-kernel.sh"],
             "/opt/jeg/kernel-launchers/python/scripts/launch_ipykernel.py": files["launch_ipykernel.py"]},
            ["/bin/bash", "/opt/jeg/bootstrap-kernel.sh"],
            {"KERNEL_LANGUAGE": "python", "KERNEL_LAUNCHERS_DIR": "/opt/jeg/kernel-launchers"},
        )
        spec_dir = os.path.join(self.specs, "python_kubernetes")
        os.makedirs(os.path.join(spec_dir, "scripts"))
        with open(files["kernel.json"]) as f:
            spec = json.load(f)
        config = spec["metadata"]["process_proxy"]["config"]
        # What Enterprise Gateway's build does to its kernelspecs (VERSION), and this machine's Python for the pod.
        config["image_name"] = config["image_name"].replace("VERSION", "3.3.0")
        config.update(volumes=base["volumes"], volume_mounts=base["volume_mounts"])
        with open(os.path.join(spec_dir, "kernel.json"), "w") as f:
            json.dump(spec, f)
        os.replace(files["kernel-pod.yaml.j2"], os.path.join(spec_dir, "scripts", "kernel-pod.yaml.j2"))

    async def test_enterprise_gateway_kernelspec_and_image(self) -> None:
        """
        The kernel starts in a pod rendered from Enterprise Gateway's own
        template, reports version 1 connection info from Enterprise
        Gateway's launcher, runs code, is interrupted through that
        launcher's comm port, and shutting it down deletes the pod.
        """
        model = await self.start("python_kubernetes")
        self.assertEqual(model["launcher"], "kubernetes")
        self.assertIn("payload v1", json.dumps(model["phases"]))
        pod = await deferToThread(self.pod, model["placement"]["pod"])
        self.assertEqual(pod["metadata"]["labels"]["source"], "kernel-pod.yaml")
        self.assertEqual(pod["spec"]["containers"][0]["image"], "elyra/kernel-py:3.3.0")
        client = await ChannelsClient.connect(self.gateway.url, model["id"])
        self.addCleanup(client.close)
        result = await client.execute("import sys; print(sys.argv[0].rsplit('/', 1)[-1])")
        self.assertEqual(result["stdout"].strip(), "launch_ipykernel.py")
        code, reply = await interrupt_sleeping_cell(client, self.gateway, model["id"])
        self.assertEqual(code, 204)
        self.assertEqual(reply["ename"], "KeyboardInterrupt")
        code, _ = await self.gateway.request("DELETE", f"api/kernels/{model['id']}")
        self.assertEqual(code, 204)
        self.assertEqual(await deferToThread(self.kernel_objects), [])


class LaunchFailureTests(KubernetesGatewayTestCase):
    async def test_missing_image(self) -> None:
        """
        An image that cannot be pulled fails the launch within 10 seconds,
        naming ErrImagePull, and the pod is deleted.
        """
        started = reactor.seconds()
        model = await self.start("missing-image", expect=500)
        self.assertLess(reactor.seconds() - started, 10)
        self.assertIn("ErrImagePull", model["message"])
        self.assertIn("127.0.0.1:1/egateway/missing:1", model["message"])
        self.assertEqual(await deferToThread(self.kernel_objects), [])

    async def test_unschedulable(self) -> None:
        """
        A resource request no node can meet fails the launch at once with
        the scheduler's message (400: the client asked for it).
        """
        model = await self.start(env={"KERNEL_CPUS": "64"}, expect=400)
        self.assertIn("FailedScheduling", model["message"])
        self.assertIn("Insufficient cpu", model["message"])
        self.assertEqual(await deferToThread(self.kernel_objects), [])

    async def test_container_exits_before_the_handshake(self) -> None:
        """
        A container that exits before sending connection info fails the
        launch within seconds with its exit code and the end of its log.
        """
        started = reactor.seconds()
        model = await self.start("bad-language", expect=500)
        self.assertLess(reactor.seconds() - started, 15)
        self.assertIn("exited with code 1", model["message"])
        self.assertIn("unknown KERNEL_LANGUAGE=cobol", model["message"])
        self.assertEqual(await deferToThread(self.kernel_objects), [])

    async def test_launch_timeout_while_the_pod_cannot_start(self) -> None:
        """
        A pod that never gets its volume stays ContainerCreating: the launch
        times out (504) quoting the pod's last warning event (FailedMount
        and kubelet's message), and the pod is deleted.
        """
        # Long enough for kubelet to have tried the mount and said so on a
        # loaded machine: once, with a benchmark running beside the test
        # suite, 6 s ended the launch before the first FailedMount event.
        model = await self.start("bad-volume", env={"KERNEL_LAUNCH_TIMEOUT": "20"}, expect=504)
        self.assertIn("Warning FailedMount", model["message"])
        self.assertIn("/nonexistent/egw", model["message"])
        self.assertEqual(await deferToThread(self.kernel_objects), [])

    async def test_bad_quantity_refused_before_anything_starts(self) -> None:
        """
        A resource value that is not a Kubernetes quantity is refused with
        400 before any pod is created.
        """
        model = await self.start(env={"KERNEL_MEMORY": '1Gi"\n    image: evil'}, expect=400)
        self.assertIn("KERNEL_MEMORY", model["message"])
        self.assertEqual(await deferToThread(self.kernel_objects), [])

    async def test_values_that_choose_placement_are_refused(self) -> None:
        """
        KERNEL_IMAGE, KERNEL_NAMESPACE and KERNEL_VOLUMES from a client are
        refused (403): the kernelspec and the gateway choose them.
        """
        for env in ({"KERNEL_IMAGE": "docker.io/library/evil:1"}, {"KERNEL_NAMESPACE": "kube-system"},
                    {"KERNEL_VOLUMES": "[{name: root, hostPath: {path: /}}]"}):
            model = await self.start(env=env, expect=403)
            self.assertIn(next(iter(env)), model["message"])
        self.assertEqual(await deferToThread(self.kernel_objects), [])


class YamlInjectionTests(KubernetesGatewayTestCase):
    """
    Client values in an Enterprise Gateway style template land as plain
    strings or are refused; they never add keys, containers or volumes.
    """

    async def test_injection_refused(self) -> None:
        """
        Values that would close the quoted string and add keys or list items
        are refused with 400 naming the variable; nothing is created.
        """
        for value in ('a", "b', 'x" # the rest is a comment', 'x", "image": "evil'):
            model = await self.start("jeg-style", env={"KERNEL_NOTE": value}, expect=400)
            self.assertIn("kernel_note", model["message"])
            self.assertIn("would change the structure", model["message"])
        # Line breaks never get this far: the API refuses them in any environment value.
        for value in ('x"\n    image: "evil', 'x"\n  - name: sidecar\n    image: "evil', "x\n  hostNetwork: true"):
            await self.start("jeg-style", env={"KERNEL_NOTE": value}, expect=400)
        self.assertEqual(await deferToThread(self.kernel_objects), [])

    async def test_odd_values_land_as_plain_strings(self) -> None:
        """
        Values with YAML and Jinja syntax that fit where they are put are
        taken as the text they are.
        """
        value = "{{ 7*7 }} [a] #x: y' ] , { 'hostNetwork': true"
        model = await self.start("jeg-style", env={"KERNEL_NOTE": value})
        pod = self.pod(model["placement"]["pod"])
        self.assertEqual(pod["metadata"]["annotations"]["note"], value)
        self.assertEqual(len(pod["spec"]["containers"]), 1)
        self.assertEqual(len(pod["spec"]["volumes"]), len(self.cluster.kernel_volumes()[0]) + 1)  # + the token
        note = [e for e in pod["spec"]["containers"][0]["env"] if e["name"] == "NOTE"]
        self.assertEqual(note, [{"name": "NOTE", "value": value}])
        code, _ = await self.gateway.request("DELETE", f"api/kernels/{model['id']}")
        self.assertEqual(code, 204)


class ClusterFixtureTests(TestCase):
    """
    The cluster fixture itself: a private cluster that ran a pod leaves
    nothing behind.
    """

    timeout = 240

    async def test_down_leaves_nothing(self) -> None:
        """
        After a pod ran (a network namespace, mounts, containerd shims),
        down() leaves no process naming the cluster's directory, no mount,
        no pod network namespace, no bridge and no directory.
        """
        await deferToThread(cluster)  # skips where the machine cannot run one
        private = KubeCluster(tempfile.mkdtemp(prefix="egk-", dir="/tmp"))
        self.addCleanup(deferToThread, private.down)
        await deferToThread(private.up)
        core = private.api()
        volumes, mounts = private.kernel_volumes()
        body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "sleeper"},
                "spec": {"containers": [{"name": "c", "image": private.kernel_image, "imagePullPolicy": "Never",
                                         "command": ["/bin/sleep", "600"], "volumeMounts": mounts}],
                         "volumes": volumes, "terminationGracePeriodSeconds": 0}}
        await deferToThread(core.create_namespaced_pod, "default", body=body, _preload_content=False)

        def running() -> bool:
            return core.read_namespaced_pod("sleeper", "default").status.phase == "Running"

        await eventually(running, "the pod to run", timeout=60)
        netns = await deferToThread(private._sandbox_netns)
        self.assertTrue(netns, "the pod has a network namespace")
        self.assertTrue(private._mounts(), "the pod has mounts under the cluster's directory")
        await deferToThread(private.down)
        self.assertEqual(private.leftovers(), [])
        self.assertFalse(any(os.path.exists(p) for p in netns))
        self.assertFalse(os.path.exists(private.work.path))
        self.assertFalse(os.path.exists(f"/sys/class/net/{private.bridge}"))


class ReattachTests(TestCase):
    """
    A gateway daemon killed with SIGKILL and started again reattaches to
    its running pod kernels.
    """

    timeout = 240

    async def test_kill_9_and_restart_reattaches(self) -> None:
        """
        A pod kernel holding x = 42 outlives its gateway's SIGKILL; the next
        gateway on the same data directory lists it, x is still 42 in the
        same pod, and shutting it down deletes the pod.
        """
        from tests.support.daemon import start_gateway
        from tests.test_persistence import get_x, set_x

        kube = await deferToThread(cluster)
        core = kube.api()
        specs = os.path.abspath(self.mktemp())
        volumes, mounts = kube.kernel_volumes()
        write_spec(specs, "pod", launcher_argv(), "kubernetes",
                   config={"image_name": kube.kernel_image, "image_pull_policy": "Never", "volumes": volumes,
                           "volume_mounts": mounts})
        flags = {
            "list-kernels": "true",
            "persistence": "true",
            "kernelspec-path": specs,
            "response-ip": kube.host_ip,
            "kubernetes-config": kube.kubeconfig,
            "kubernetes-namespace": NAMESPACE,
            "kubernetes-delete-grace": "2",
        }
        first = await start_gateway(self, flags={**flags, "on-stop": "keep"})
        model = await first.api.call("POST", "api/kernels", {"name": "pod"}, expect=201)
        name = model["placement"]["pod"]
        await set_x(first.url, model["id"], 42)
        uid = core.read_namespaced_pod(name, NAMESPACE).metadata.uid
        first.process.send_signal(signal.SIGKILL)
        await first.process.when_ended()
        first.process.report = "killed"  # judged here: its kernel must stay
        await first.api.close()

        second = await start_gateway(self, flags={**flags, "on-stop": "shutdown", "data-dir": first.data_dir})
        second.data_dir = first.data_dir
        deadline = reactor.seconds() + 30
        while True:
            listed = await second.api.call("GET", "api/kernels")
            if [k["state"] for k in listed] == ["running"]:
                break
            self.assertLess(reactor.seconds(), deadline, f"the kernel is not restored: {listed}")
            await deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(listed[0]["id"], model["id"])
        self.assertEqual(await get_x(second.url, model["id"]), "42")
        self.assertEqual(core.read_namespaced_pod(name, NAMESPACE).metadata.uid, uid)
        await second.api.call("DELETE", f"api/kernels/{model['id']}", expect=204)
        pods = core.list_namespaced_pod(NAMESPACE, label_selector=f"kernel_id={model['id']}").items
        self.assertEqual(pods, [])


class PodReconcileTests(ReconcileTestCase):
    """
    The reconciler and pods: an orphan kernel pod (its record lost) of this
    gateway is deleted; a recorded one is restored and left running.
    """

    async def setUp(self) -> None:
        super().setUp()
        kube = await deferToThread(cluster)
        self.core = kube.api()
        specs = os.path.abspath(self.mktemp())
        volumes, mounts = kube.kernel_volumes()
        write_spec(specs, "pod", launcher_argv(), "kubernetes",
                   config={"image_name": kube.kernel_image, "image_pull_policy": "Never", "volumes": volumes,
                           "volume_mounts": mounts})
        self.extra = {
            "kernelspec_path": specs,
            "response_ip": kube.host_ip,
            "kubernetes_config": kube.kubeconfig,
            "kubernetes_namespace": NAMESPACE,
            "kubernetes_delete_grace": 2,
            "poll_interval": 0.5,
        }

    def pods(self) -> dict[str, str]:
        pods = self.core.list_namespaced_pod(NAMESPACE, label_selector=f"egateway/gateway-id={self.gateway_id}").items
        return {p.metadata.labels["kernel_id"]: p.metadata.uid for p in pods}

    async def test_orphan_pod_deleted_recorded_one_restored(self) -> None:
        """
        With reconcile = adopt, the orphan pod is reaped (a pod cannot be
        reattached without its connection info), the recorded kernel is
        listed running in the same pod, and stopping the gateway with
        on_stop = shutdown deletes it.
        """
        first = await self.gateway(on_stop="keep")
        kept = orphan = None
        for _ in range(2):
            code, model = await first.request("POST", "api/kernels", {"name": "pod"})
            self.assertEqual(code, 201, model)
            kept, orphan = orphan, model
        assert kept is not None and orphan is not None
        await first.stop()
        before = self.pods()
        self.assertEqual(set(before), {kept["id"], orphan["id"]})
        forget(self.data_dir, orphan["id"])

        second = await self.gateway(on_stop="shutdown", reconcile="adopt")
        outcomes = await self.first_pass(second)
        self.assertEqual([(o.kernel_id, o.done) for o in outcomes], [(orphan["id"], "reaped")])
        self.assertEqual(self.pods(), {kept["id"]: before[kept["id"]]})
        listed = await self.listed(second)
        self.assertEqual((list(listed), listed[kept["id"]]["state"]), ([kept["id"]], "running"))
        await second.stop()
        self.assertEqual(self.pods(), {})
