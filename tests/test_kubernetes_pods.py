"""
Kernel pods without a cluster: Enterprise Gateway pod templates and the
values that must not change their structure, what the gateway puts into
every pod, reading a pod's status for why it cannot run, and the namespace
watch (list, watch from the resource version, resume, list again after
410) driven by a scripted API.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable

from twisted.internet import reactor
from twisted.internet.defer import Deferred

from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from egateway.clusters.interface import LaunchError
from egateway.clusters.kube_pods import (
    DEFAULT_TEMPLATE,
    TemplateRefused,
    check_quantity,
    finish_extra,
    finish_pod,
    kernel_documents,
    launch_problem,
    pod_document,
    pod_name,
    progress,
    render,
    running_address,
    values_for,
)
from egateway.clusters.kube_watch import Gone, NamespaceWatch

# Written the way Enterprise Gateway's kernel-pod.yaml.j2 is: quoted values, an int filter, volumes as Python reprs.
JEG_STYLE = """\
apiVersion: v1
kind: Pod
metadata:
  name: "{{ kernel_pod_name }}"
  namespace: "{{ kernel_namespace }}"
  labels:
    kernel_id: "{{ kernel_id }}"
    app: enterprise-gateway
    component: kernel
spec:
  restartPolicy: Never
  serviceAccountName: "{{ kernel_service_account_name }}"
  {% if kernel_uid is defined %}
  securityContext:
    runAsUser: {{ kernel_uid | int }}
    fsGroup: 100
  {% endif %}
  containers:
  - image: "{{ kernel_image }}"
    name: "{{ kernel_pod_name }}"
    env:
    - name: PLAIN
      value: {{ kernel_extra }}
    {% if kernel_working_dir %}
    workingDir: "{{ kernel_working_dir }}"
    {% endif %}
    volumeMounts:
    {% for volume_mount in kernel_volume_mounts %}
    - {{ volume_mount }}
    {% endfor %}
  volumes:
  {% for volume in kernel_volumes %}
  - {{ volume }}
  {% endfor %}
"""

WITH_EXTRAS = """\
---
apiVersion: v1
kind: Service
metadata:
  name: "{{ kernel_pod_name }}"
  namespace: elsewhere
  labels:
    app: notebook
spec:
  selector:
    kernel_id: "{{ kernel_id }}"
  ports:
  - port: 8888
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: "{{ kernel_pod_name }}-files"
data:
  note: "{{ kernel_extra }}"
"""

VALUES = {
    "kernel_pod_name": "alice-k1",
    "kernel_namespace": "team",
    "kernel_id": "k1",
    "kernel_service_account_name": "default",
    "kernel_image": "registry.example/kernel:1",
    "kernel_image_pull_policy": "IfNotPresent",
    "kernel_extra": "plain",
    "kernel_volumes": [{"name": "data", "hostPath": {"path": "/data"}}],
    "kernel_volume_mounts": [{"name": "data", "mountPath": "/data", "readOnly": True}],
}


class TemplateTests(SynchronousTestCase):
    def test_enterprise_gateway_template(self) -> None:
        """
        An Enterprise Gateway style template renders to the pod it
        describes, numbers from its filters included.
        """
        pod = pod_document(render(JEG_STYLE, {**VALUES, "kernel_uid": "1000"}), "t")
        self.assertEqual(pod["metadata"]["name"], "alice-k1")
        self.assertEqual(pod["spec"]["securityContext"], {"runAsUser": 1000, "fsGroup": 100})
        container = pod["spec"]["containers"][0]
        self.assertEqual(container["image"], "registry.example/kernel:1")
        self.assertEqual(container["volumeMounts"], VALUES["kernel_volume_mounts"])
        self.assertEqual(pod["spec"]["volumes"], VALUES["kernel_volumes"])

    def test_default_template(self) -> None:
        """
        The built-in template takes the same variables, resources included.
        """
        pod = pod_document(render(DEFAULT_TEMPLATE, {**VALUES, "kernel_cpus": "500m", "kernel_memory_limit": "1Gi"}),
                           "t")
        container = pod["spec"]["containers"][0]
        self.assertEqual(container["resources"], {"requests": {"cpu": "500m"}, "limits": {"memory": "1Gi"}})
        self.assertEqual(container["imagePullPolicy"], "IfNotPresent")
        self.assertEqual(pod["spec"]["volumes"], VALUES["kernel_volumes"])

    def test_values_that_change_the_structure_are_refused(self) -> None:
        """
        Values that would add or override keys, list items or documents, in
        a quoted or a plain position, are refused with 400 naming the
        variable (Enterprise Gateway's YAML-injection cases and more).
        """
        cases = [
            ("kernel_image", 'x"\n    securityContext: {privileged: true}\n    x: "'),
            ("kernel_image", 'x", "command": ["sh"], "y": "'),
            ("kernel_image", 'x" # hide the rest'),
            ("kernel_pod_name", 'a"\n  hostNetwork: true\n  x: "'),
            ("kernel_extra", "x\n    - name: EVIL\n      value: y"),
            ("kernel_extra", "[1, 2]"),
            ("kernel_extra", "{a: 1}"),
            ("kernel_extra", "a: b"),
            ("kernel_extra", "x\n---\napiVersion: v1\nkind: Pod"),
            ("kernel_extra", "!!python/object/apply:os.system ['true']"),
            ("kernel_extra", "&a x"),
            ("kernel_working_dir", '/w"\n    image: "evil'),
        ]
        for name, value in cases:
            with self.assertRaises(TemplateRefused, msg=repr(value)) as caught:
                render(JEG_STYLE, {**VALUES, name: value})
            self.assertEqual(caught.exception.status, 400)
            self.assertIn(name, str(caught.exception))

    def test_values_land_as_plain_strings(self) -> None:
        """
        Values with YAML or Jinja syntax that fit where they are put are
        exactly the text they are; nothing evaluates them.
        """
        for value in ("{{ 7*7 }}", "{% raw %}", "x' ] , { 'y': true", "#not a comment", "@x", "1.5", "yes"):
            pod = render(JEG_STYLE, {**VALUES, "kernel_image": value})[0]
            self.assertEqual(pod["spec"]["containers"][0]["image"], value)
            self.assertEqual(len(pod["spec"]["containers"]), 1)

    def test_yaml_safe_filter(self) -> None:
        """
        Enterprise Gateway 3.3's templates pass values through yaml_safe:
        values that would inject there are quoted and land as the text they
        are; volumes stay mappings.
        """
        template = JEG_STYLE.replace('"{{ kernel_image }}"', "{{ kernel_image | yaml_safe }}").replace(
            "- {{ volume }}", "- {{ volume | yaml_safe }}")
        for value in ('x", "command": ["sh"], "y": "', "a: b", "[1, 2]", "x # y", "'", "1000", "null"):
            pod = render(template, {**VALUES, "kernel_image": value})[0]
            self.assertEqual(pod["spec"]["containers"][0]["image"], value)
        self.assertEqual(pod["spec"]["volumes"], VALUES["kernel_volumes"])

    def test_broken_template(self) -> None:
        """
        A template that does not render or parse with harmless values is
        the operator's error (500), and only a Pod may be in it.
        """
        for template in ("{% if %}", "a: [", "kind: Pod\nspec: {containers: []}",
                         "kind: Pod\nspec: {containers: [{}]}\n---\nkind: Service"):
            with self.assertRaises(TemplateRefused) as caught:
                pod_document(render(template, VALUES), "t")
            self.assertEqual(caught.exception.status, 500)

    def test_other_documents(self) -> None:
        """
        Services, ConfigMaps and Secrets after the Pod are created with it:
        in the kernel's namespace whatever the template says, labelled with
        the kernel, the gateway and the user; the template's own labels kept.
        """
        template = JEG_STYLE + WITH_EXTRAS
        pod, extras = kernel_documents(render(template, VALUES), "t")
        self.assertEqual(pod["kind"], "Pod")
        self.assertEqual([(d["kind"], d["metadata"]["name"]) for d in extras],
                         [("Service", "alice-k1"), ("ConfigMap", "alice-k1-files")])
        service = finish_extra(extras[0], namespace="team", kernel_id="k1", gateway_id="gw", username="alice")
        self.assertEqual(service["metadata"]["namespace"], "team")
        self.assertEqual(service["metadata"]["labels"], {"app": "notebook", "kernel_id": "k1",
                                                         "component": "kernel-resource",
                                                         "egateway/gateway-id": "gw", "egateway/user": "alice"})
        self.assertEqual(extras[1]["data"], {"note": "plain"})

    def test_other_kinds_refused(self) -> None:
        """
        Any other document (a Deployment, a RoleBinding, a Namespace, a
        ConfigMap of another API group, one without a name, a second Pod)
        is refused (500: the operator's template), naming what is allowed.
        """
        for extra in ("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}",
                      "apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {name: r}",
                      "apiVersion: v1\nkind: Namespace\nmetadata: {name: n}",
                      "apiVersion: v2\nkind: ConfigMap\nmetadata: {name: c}",
                      "apiVersion: v1\nkind: Service\nmetadata: {}",
                      "[1, 2]",
                      JEG_STYLE):
            with self.assertRaises(TemplateRefused) as caught:
                kernel_documents(render(JEG_STYLE + "---\n" + extra, VALUES), "t")
            self.assertEqual(caught.exception.status, 500)
            self.assertIn("Service, ConfigMap, Secret", str(caught.exception))

    def test_values_cannot_add_documents(self) -> None:
        """
        A value that would start a document of its own (in the Pod or in a
        ConfigMap's data) is refused with 400, like any value that changes
        the structure.
        """
        for value in ('x"\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: evil}',
                      "x\n---\napiVersion: v1\nkind: Service\nmetadata: {name: evil}"):
            with self.assertRaises(TemplateRefused) as caught:
                render(JEG_STYLE + WITH_EXTRAS, {**VALUES, "kernel_extra": value})
            self.assertEqual(caught.exception.status, 400)
            self.assertIn("kernel_extra", str(caught.exception))

    def test_values_for(self) -> None:
        """
        Every KERNEL_* variable is a lower-cased template variable, and only
        those.
        """
        self.assertEqual(values_for({"KERNEL_CPUS": "1", "PATH": "/bin", "KERNEL_X_Y": "z"}),
                         {"kernel_cpus": "1", "kernel_x_y": "z"})

    def test_quantities(self) -> None:
        for good in ("1", "500m", "1.5", "4Gi", "100M"):
            self.assertEqual(check_quantity("KERNEL_CPUS", good), good)
        for bad in ("", "-1", "1 Gi", "1Gi\n", "one", '1"'):
            with self.assertRaises(LaunchError) as caught:
                check_quantity("KERNEL_MEMORY", bad)
            self.assertEqual(caught.exception.status, 400)

    def test_pod_names(self) -> None:
        kernel_id = "0d0c2f6e-0f1b-4bd5-9a4c-2b8b3c8c6f7a"
        self.assertEqual(pod_name("Alice.Smith@example.org", kernel_id), f"alice-smith-example-org-{kernel_id}")
        self.assertEqual(pod_name("", kernel_id), f"kernel-{kernel_id}")
        self.assertEqual(pod_name("---", kernel_id), f"kernel-{kernel_id}")
        self.assertLessEqual(len(pod_name("x" * 100, kernel_id)), 63)


class FinishPodTests(SynchronousTestCase):
    def finish(self, pod: dict[str, Any], username: str = "alice") -> dict[str, Any]:
        return finish_pod(
            pod, name="alice-k1", namespace="team", kernel_id="k1", gateway_id="gw1", username=username,
            env={"KERNEL_ID": "k1", "RESPONSE_ADDRESS": "10.0.0.1:8877"}, secret="alice-k1-launch",
            token_key="launch-token", pull_policy="Never",
        )

    def test_what_the_gateway_decides(self) -> None:
        """
        Name, namespace, labels, restart policy and the kernel's environment
        are the gateway's, whatever the template says; the launch token
        comes from the Secret.
        """
        pod = {"metadata": {"name": "other", "labels": {"app": "x", "kernel_id": "wrong"}},
               "spec": {"restartPolicy": "Always", "containers": [
                   {"name": "k", "image": "i", "env": [{"name": "KERNEL_ID", "value": "forged"},
                                                        {"name": "KEEP", "value": "1"},
                                                        {"name": "EG_LAUNCH_TOKEN", "value": "forged"}]}]}}
        pod = self.finish(pod, username="Alice Smith")
        self.assertEqual((pod["metadata"]["name"], pod["metadata"]["namespace"]), ("alice-k1", "team"))
        self.assertEqual(pod["metadata"]["labels"],
                         {"app": "x", "kernel_id": "k1", "component": "kernel", "egateway/gateway-id": "gw1"})
        self.assertEqual(pod["metadata"]["annotations"], {"egateway/user": "Alice Smith"})
        self.assertEqual(pod["spec"]["restartPolicy"], "Never")
        container = pod["spec"]["containers"][0]
        self.assertEqual(container["imagePullPolicy"], "Never")
        self.assertEqual(container["env"], [
            {"name": "KEEP", "value": "1"},
            {"name": "KERNEL_ID", "value": "k1"},
            {"name": "RESPONSE_ADDRESS", "value": "10.0.0.1:8877"},
            {"name": "EG_LAUNCH_TOKEN",
             "valueFrom": {"secretKeyRef": {"name": "alice-k1-launch", "key": "launch-token"}}},
        ])

    def test_user_label(self) -> None:
        pod = self.finish({"spec": {"containers": [{"name": "k", "image": "i", "imagePullPolicy": "Always"}]}})
        self.assertEqual(pod["metadata"]["labels"]["egateway/user"], "alice")
        self.assertEqual(pod["spec"]["containers"][0]["imagePullPolicy"], "Always")


def pod_with(status: dict[str, Any], node: str = "") -> dict[str, Any]:
    return {"metadata": {"name": "p"}, "spec": {"nodeName": node} if node else {}, "status": status}


class StatusTests(SynchronousTestCase):
    def test_pull_errors(self) -> None:
        for reason in ("ErrImagePull", "ImagePullBackOff", "ErrImageNeverPull", "CrashLoopBackOff"):
            pod = pod_with({"phase": "Pending", "containerStatuses": [
                {"name": "kernel", "state": {"waiting": {"reason": reason, "message": "no such image x"}}}]})
            self.assertEqual(launch_problem(pod), f"{reason}: no such image x")

    def test_still_starting(self) -> None:
        """
        A pod being created, or one whose container configuration kubelet
        is still retrying (a passing failure under load), may still start.
        """
        retrying = pod_with({"phase": "Pending", "containerStatuses": [{"name": "kernel", "state": {"waiting": {
            "reason": "CreateContainerConfigError", "message": "failed to sync secret cache: timed out"}}}]},
            node="n1")
        self.assertIsNone(launch_problem(retrying))
        self.assertEqual(progress(retrying),
                         "Pending, on n1, kernel: CreateContainerConfigError (failed to sync secret cache: timed out)")
        for status in ({}, {"phase": "Pending"}, {"phase": "Pending", "containerStatuses": [
                {"name": "kernel", "state": {"waiting": {"reason": "ContainerCreating"}}}]},
                {"phase": "Running", "podIP": "10.1.0.5"}):
            self.assertIsNone(launch_problem(pod_with(status)))
        self.assertIsNone(running_address(pod_with({"phase": "Pending", "podIP": "10.1.0.5"})))
        self.assertEqual(running_address(pod_with({"phase": "Running", "podIP": "10.1.0.5"})), "10.1.0.5")

    def test_unschedulable(self) -> None:
        pod = pod_with({"phase": "Pending", "conditions": [
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
             "message": "0/1 nodes are available: 1 Insufficient cpu."}]})
        self.assertEqual(launch_problem(pod), "FailedScheduling: 0/1 nodes are available: 1 Insufficient cpu.")

    def test_ended(self) -> None:
        pod = pod_with({"phase": "Failed", "containerStatuses": [
            {"name": "kernel", "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]})
        self.assertEqual(launch_problem(pod), "container kernel exited with code 137 (OOMKilled)")
        evicted = pod_with({"phase": "Failed", "reason": "Evicted", "message": "low on memory"})
        self.assertEqual(launch_problem(evicted), "pod Failed: Evicted low on memory")


# -- the namespace watch, driven by a scripted API ---------------------------------------------


class SynchronousPool:
    """
    A thread pool that runs each call at once (the scripted API never blocks).
    """

    def callInThreadWithCallback(self, on_result: Callable[..., None], f: Callable[..., Any], *a: Any,
                                 **kw: Any) -> None:
        try:
            result = f(*a, **kw)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)


class ThreadlessClock(Clock):
    def callFromThread(self, f: Callable[..., Any], *a: Any, **kw: Any) -> None:
        f(*a, **kw)


def pod(name: str, version: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "resourceVersion": version}, "status": {}}


class ScriptedApi:
    """
    Lists and watches as scripted: each watch step either delivers events
    and ends (a drop) or raises.
    """

    def __init__(self, lists: list[tuple[list[dict[str, Any]], str]], watches: list[Any]) -> None:
        self.lists = lists
        self.watches = watches
        self.calls: list[tuple[str, str]] = []
        self.watch: NamespaceWatch | None = None

    def list_blocking(self, namespace: str, selector: str) -> tuple[list[dict[str, Any]], str]:
        self.calls.append(("list", ""))
        return self.lists.pop(0)

    def watch_blocking(self, namespace: str, selector: str, version: str, deliver: Any, started: Any) -> str:
        self.calls.append(("watch", version))
        if not self.watches:
            assert self.watch is not None
            self.watch.stop()
            return version
        step = self.watches.pop(0)
        if isinstance(step, Exception):
            raise step
        for kind, obj in step:
            deliver(kind, obj)
            version = obj["metadata"]["resourceVersion"]
        return version


class NamespaceWatchTests(SynchronousTestCase):
    def test_list_watch_resume_relist(self) -> None:
        """
        The watch lists, watches from the list's version, resumes from the
        last version it saw after a drop, lists again after 410 Gone (a pod
        deleted meanwhile is reported deleted), and retries an error after
        a backoff on the clock.
        """
        clock = ThreadlessClock()
        api = ScriptedApi(
            lists=[([pod("a", "1")], "1"), ([pod("b", "8")], "9")],
            watches=[[("MODIFIED", pod("a", "3")), ("ADDED", pod("b", "5"))], Gone("too old"),
                     RuntimeError("connection reset")],
        )
        watch = NamespaceWatch(clock, SynchronousPool(), api, "team", "kernel_id")  # type: ignore[arg-type]
        api.watch = watch
        seen: list[tuple[str, str | None]] = []
        for name in ("a", "b"):
            watch.follow(name, lambda p, name=name: seen.append(
                (name, p["metadata"]["resourceVersion"] if p else None)))
        synced = watch.synced()
        watch.start()
        self.successResultOf(synced)
        self.assertEqual(api.calls, [("list", ""), ("watch", "1"), ("watch", "5"), ("list", ""), ("watch", "9")])
        self.assertEqual(seen, [("a", "1"), ("a", "3"), ("b", "5"), ("a", None), ("b", "8")])
        self.assertEqual(set(watch.pods), {"b"})
        clock.advance(0.5)
        self.assertEqual(api.calls[-1], ("watch", "9"))
        self.assertEqual(len(api.calls), 6)


class PrepareTests(TestCase):
    """
    What a launch decides before anything is created: the launcher's checks
    of the client's values and what the kernelspec (or its profile) asks for.
    """

    def setUp(self) -> None:
        from egateway.clusters.interface import LauncherContext, LaunchSettings
        from egateway.clusters.kubernetes import KubernetesLauncher
        from egateway.config import build_config

        config = build_config({}, {}, {"kubernetes-image": "local/kernel:1"})
        context = LauncherContext(reactor=reactor, runtime_dir="", ports=None, section=config.kubernetes,
                                  shared=LaunchSettings.from_config(config, "gw"))
        self.launcher = KubernetesLauncher(context)
        self.addCleanup(self.launcher.stop)

    def prepare(self, config: dict[str, Any] | None = None, env: dict[str, str] | None = None) -> Any:
        from egateway.clusters.interface import LaunchRequest

        spec = SimpleNamespace(name="pod", resource_dir="", env={}, language="python")
        request = LaunchRequest(kernel_id="0d0c2f6e-0f1b-4bd5-9a4c-2b8b3c8c6f7a", spec=spec,
                                env={"KERNEL_ID": "x", **(env or {})}, config=config or {}, username="alice",
                                report=lambda *a: None, timeout=30)
        return Deferred.fromCoroutine(self.launcher._prepare(request))

    async def refused(self, status: int, config: dict[str, Any] | None = None, env: dict[str, str] | None = None) -> str:
        with self.assertRaises(LaunchError) as caught:
            await self.prepare(config, env)
        self.assertEqual(caught.exception.status, status, str(caught.exception))
        return str(caught.exception)

    async def test_kernelspec_resources(self) -> None:
        """
        The kernelspec's (or its profile's) cpus, memory and image are the
        pod's unless the client's allowed value replaces them.
        """
        launch = await self.prepare({"cpus": "2", "memory": "1Gi", "image_name": "local/other:2"},
                                    {"KERNEL_MEMORY": "512Mi"})
        container = launch.pod["spec"]["containers"][0]
        self.assertEqual(container["resources"], {"requests": {"cpu": "2", "memory": "512Mi"}})
        self.assertEqual(container["image"], "local/other:2")
        self.assertEqual(launch.name, "alice-0d0c2f6e-0f1b-4bd5-9a4c-2b8b3c8c6f7a")

    async def test_client_choices_refused(self) -> None:
        """
        Image (unless allowed), namespace, volumes, GPUs beyond max_gpus:
        refused with 403; a malformed quantity with 400.
        """
        self.assertIn("KERNEL_IMAGE", await self.refused(403, env={"KERNEL_IMAGE": "evil/image:1"}))
        launch = await self.prepare({"allowed_images": ["local/ok:1"]}, {"KERNEL_IMAGE": "local/ok:1"})
        self.assertEqual(launch.pod["spec"]["containers"][0]["image"], "local/ok:1")
        for name in ("KERNEL_NAMESPACE", "KERNEL_VOLUMES", "KERNEL_VOLUME_MOUNTS", "KERNEL_POD_NAME"):
            self.assertIn(name, await self.refused(403, env={name: "x"}))
        self.assertIn("max_gpus", await self.refused(403, env={"KERNEL_GPUS": "1"}))
        launch = await self.prepare({"max_gpus": 2}, {"KERNEL_GPUS": "2"})
        self.assertEqual(launch.pod["spec"]["containers"][0]["resources"]["requests"], {"nvidia.com/gpu": "2"})
        self.assertIn("KERNEL_CPUS", await self.refused(400, env={"KERNEL_CPUS": "2; rm"}))
        self.assertIn("config cpus", await self.refused(500, config={"cpus": "lots"}))

    async def test_client_uid_and_volumes_not_passed(self) -> None:
        """
        KERNEL_UID from a client does not reach the template; the
        kernelspec's uid does.
        """
        launch = await self.prepare({}, {"KERNEL_UID": "0"})
        self.assertNotIn("securityContext", launch.pod["spec"])
        launch = await self.prepare({"uid": 1000})
        self.assertEqual(launch.pod["spec"]["securityContext"], {"runAsUser": 1000})

    async def test_user_namespaces(self) -> None:
        """
        With kubernetes_namespace_mode = user, a user's kernels go to the
        prefix plus their name as a DNS label; a kernelspec's namespace
        still wins.
        """
        from egateway.clusters.interface import LauncherContext, LaunchSettings
        from egateway.clusters.kubernetes import KubernetesLauncher
        from egateway.config import build_config

        config = build_config({}, {}, {"kubernetes-image": "local/kernel:1", "kubernetes-namespace-mode": "user"})
        self.launcher = KubernetesLauncher(LauncherContext(reactor=reactor, runtime_dir="", ports=None,
                                                           section=config.kubernetes,
                                                           shared=LaunchSettings.from_config(config)))
        self.addCleanup(self.launcher.stop)
        self.assertEqual((await self.prepare()).namespace, "kernels-alice")
        self.assertEqual((await self.prepare({"namespace": "team"})).namespace, "team")
        self.assertIn("namespace", await self.refused(400, {"namespace": "Not_A_Name"}))
        config = build_config({}, {}, {"kubernetes-image": "local/kernel:1", "kubernetes-namespace-mode": "kernel"})
        self.launcher = KubernetesLauncher(LauncherContext(reactor=reactor, runtime_dir="", ports=None,
                                                           section=config.kubernetes,
                                                           shared=LaunchSettings.from_config(config)))
        self.addCleanup(self.launcher.stop)
        launch = await self.prepare()
        self.assertEqual((launch.namespace, launch.own_namespace),
                         ("kernels-alice-0d0c2f6e-0f1b-4bd5-9a4c-2b8b3c8c6f7a", True))
        self.assertFalse((await self.prepare({"namespace": "team"})).own_namespace)


class NamespaceBindingTests(TestCase):
    """
    The RoleBinding of kubernetes_kernel_cluster_role in namespaces a
    gateway creates, against a scripted client.
    """

    def launcher(self, **settings: str) -> Any:
        from egateway.clusters.interface import LauncherContext, LaunchSettings
        from egateway.clusters.kubernetes import KubernetesLauncher
        from egateway.config import build_config

        config = build_config({}, {}, {"kubernetes-namespace-mode": "user", **settings})
        launcher = KubernetesLauncher(LauncherContext(reactor=reactor, runtime_dir="", ports=None,
                                                      section=config.kubernetes,
                                                      shared=LaunchSettings.from_config(config)))
        self.addCleanup(launcher.stop)
        return launcher

    def client(self, launcher: Any, ours: bool, refuse: bool = False) -> list[tuple[str, ...]]:
        calls: list[tuple[str, ...]] = []

        def bind(namespace: str, role: str, account: str) -> bool:
            calls.append((namespace, role, account))
            if refuse:
                raise RuntimeError("rolebindings is forbidden: cannot bind")
            return True

        launcher.namespaces.client = SimpleNamespace(
            ensure_namespace_blocking=lambda namespace, labels: (ours, ours),
            bind_blocking=bind,
            service_account_ready_blocking=lambda namespace, account: True,
        )
        return calls

    async def test_bound_in_namespaces_a_gateway_made(self) -> None:
        """
        A namespace a gateway made gets the binding (the role from the
        setting, the kernels' service account); one it did not make, or
        any with the setting empty, does not.
        """
        launcher = self.launcher()
        calls = self.client(launcher, ours=True)
        await launcher.namespaces.ensure("kernels-alice", "alice", "spark")
        self.assertEqual(calls, [("kernels-alice", "kernel-controller", "spark")])
        launcher = self.launcher()
        calls = self.client(launcher, ours=False)
        await launcher.namespaces.ensure("team", "alice", "default")
        self.assertEqual(calls, [])
        launcher = self.launcher(**{"kubernetes-kernel-cluster-role": ""})
        calls = self.client(launcher, ours=True)
        await launcher.namespaces.ensure("kernels-alice", "alice", "default")
        self.assertEqual(calls, [])

    async def test_binding_refused(self) -> None:
        """
        A binding the API refuses fails the launch saying which right the
        gateway lacks, and the next launch tries again.
        """
        launcher = self.launcher(**{"kubernetes-kernel-cluster-role": "powerful"})
        calls = self.client(launcher, ours=True, refuse=True)
        for _ in range(2):
            with self.assertRaises(LaunchError) as caught:
                await launcher.namespaces.ensure("kernels-alice", "alice", "default")
            self.assertIn("cannot bind ClusterRole 'powerful'", str(caught.exception))
            self.assertIn("bind verb", str(caught.exception))
        self.assertEqual(len(calls), 2)


class KernelNamespacesTests(SynchronousTestCase):
    """
    L{egateway.clusters.kube_namespaces.KernelNamespaces} against a
    scripted client, its blocking calls run in line.
    """

    def namespaces(self, fail_delete: bool = False) -> tuple[Any, list[tuple[str, str]]]:
        from twisted.internet.defer import maybeDeferred

        from egateway.clusters.kube_namespaces import KernelNamespaces
        from egateway.config import build_config

        calls: list[tuple[str, str]] = []

        def delete(namespace: str) -> None:
            calls.append(("delete", namespace))
            if fail_delete:
                raise RuntimeError("namespaces is forbidden")

        def ensure(namespace: str, labels: dict[str, str]) -> tuple[bool, bool]:
            calls.append(("ensure", namespace))
            return True, True

        client = SimpleNamespace(ensure_namespace_blocking=ensure, delete_namespace_blocking=delete,
                                 bind_blocking=lambda namespace, role, account: False,
                                 service_account_ready_blocking=lambda namespace, account: True)
        config = build_config({}, {}, {"kubernetes-namespace-mode": "kernel"})
        return KernelNamespaces(Clock(), config.kubernetes, client, maybeDeferred), calls

    def test_made_once_until_deleted(self) -> None:
        """
        A namespace made ready is not asked for again; once deleted (a
        kernel's own namespace goes with the kernel), it is made again.
        """
        namespaces, calls = self.namespaces()
        for _ in range(2):
            self.successResultOf(Deferred.fromCoroutine(namespaces.ensure("k-1", "alice", "default")))
        self.successResultOf(Deferred.fromCoroutine(namespaces.delete("k-1")))
        self.successResultOf(Deferred.fromCoroutine(namespaces.ensure("k-1", "alice", "default")))
        self.assertEqual(calls, [("ensure", "k-1"), ("delete", "k-1"), ("ensure", "k-1")])

    def test_failed_delete_is_logged(self) -> None:
        """
        A namespace the API will not delete is logged for the operator; the
        kernel's end does not fail for it.
        """
        from twisted.logger import capturedLogs, formatEvent

        namespaces, calls = self.namespaces(fail_delete=True)
        with capturedLogs() as events:
            self.successResultOf(Deferred.fromCoroutine(namespaces.delete("k-1")))
        self.assertEqual(calls, [("delete", "k-1")])
        self.assertIn("cannot delete namespace k-1: ", " ".join(formatEvent(e) for e in events))
        self.assertIn("delete it by hand", " ".join(formatEvent(e) for e in events))

    def test_choice(self) -> None:
        """
        In kernel mode a kernel gets a namespace of its own unless its
        kernelspec names one.
        """
        namespaces, _ = self.namespaces()
        self.assertEqual(namespaces.choose("", "alice", "alice-1"), ("kernels-alice-1", True))
        self.assertEqual(namespaces.choose("team", "alice", "alice-1"), ("team", False))


class UnreachableApiTests(TestCase):
    """
    A gateway whose Kubernetes API cannot be reached fails a pod launch at
    once, saying so, instead of at its launch timeout.
    """

    async def test_launch_fails_fast(self) -> None:
        import json
        import os

        from tests.support.gateway import InProcessGateway
        from tests.support.remote_kernels import launcher_argv, write_spec

        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        kubeconfig = os.path.join(workdir, "kubeconfig")
        with open(kubeconfig, "w") as f:
            json.dump({"apiVersion": "v1", "kind": "Config", "current-context": "c",
                       "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1",
                                                             "insecure-skip-tls-verify": True}}],
                       "users": [{"name": "u", "user": {"token": "t"}}],
                       "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}, f)
        specs = os.path.join(workdir, "specs")
        write_spec(specs, "pod", launcher_argv(), "kubernetes", config={"image_name": "local/kernel:1"})
        gateway = InProcessGateway(kernelspec_path=specs, kubernetes_config=kubeconfig, launch_timeout=60,
                                   kubernetes_api_timeout=5)
        await gateway.start()
        self.addCleanup(gateway.stop)
        began = reactor.seconds()
        code, reply = await gateway.request("POST", "api/kernels", {"name": "pod"})
        self.assertEqual(code, 500, reply)
        self.assertIn("cannot list kernel pods in namespace default", reply["message"])
        self.assertIn("kubernetes_config", reply["message"])
        self.assertLess(reactor.seconds() - began, 20)
