"""
The Kubernetes API calls of the pod launcher, each blocking: the launcher
runs every one of them in its thread pool, never on the reactor.  Bodies
go out as plain dicts and come back as parsed JSON (C{_preload_content=False}),
so no client model class stands between the pod template and the API.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping


KINDS = {"pod": "pod", "secret": "secret", "service": "service", "configmap": "config_map"}
"""
The kinds the launcher creates, and their names in the client's methods.
"""


class KubeClient:
    """
    The blocking Kubernetes calls of the launcher (a kubernetes client
    C{CoreV1Api}); every method runs in a worker thread.
    """

    def __init__(self, kubeconfig: str, timeout: float) -> None:
        self._kubeconfig = kubeconfig
        self.timeout = timeout
        self._core: Any = None

    def core_blocking(self) -> Any:
        if self._core is None:
            from kubernetes import client, config

            if self._kubeconfig:
                api_client = config.new_client_from_config(config_file=self._kubeconfig)
            elif os.environ.get("KUBERNETES_SERVICE_HOST"):
                configuration = client.Configuration()
                config.load_incluster_config(client_configuration=configuration)
                api_client = client.ApiClient(configuration)
            else:
                api_client = config.new_client_from_config()
            self._core = client.CoreV1Api(api_client)
        return self._core

    def _by_kind(self, verb: str, kind: str) -> Any:
        """
        The client's C{verb}_namespaced_... method for C{kind} (C{pod},
        C{secret}, C{service}, C{configmap}).
        """
        core = self.core_blocking()
        return getattr(core, f"{verb}_namespaced_{KINDS[kind]}")

    def create_blocking(self, kind: str, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        response = self._by_kind("create", kind)(namespace, body=body, _preload_content=False,
                                                 _request_timeout=self.timeout)
        return json.loads(response.data)

    def own_blocking(self, kind: str, namespace: str, name: str, pod: Mapping[str, Any]) -> None:
        """
        Make the pod the owner of C{kind} C{name}, so Kubernetes deletes it
        with the pod.
        """
        owner = {"apiVersion": "v1", "kind": "Pod", "name": pod["metadata"]["name"], "uid": pod["metadata"]["uid"]}
        self._by_kind("patch", kind)(
            name, namespace, body={"metadata": {"ownerReferences": [owner]}}, _preload_content=False,
            _request_timeout=self.timeout,
        )

    def delete_blocking(self, kind: str, namespace: str, name: str, grace: int | None = None) -> bool:
        """
        Delete; C{False} if it was not there.
        """
        from kubernetes.client.exceptions import ApiException

        options: dict[str, Any] = {}
        if grace is not None:
            options["grace_period_seconds"] = grace
        try:
            self._by_kind("delete", kind)(name, namespace, _preload_content=False, _request_timeout=self.timeout,
                                          **options)
        except ApiException as e:
            if e.status == 404:
                return False
            raise
        return True

    def ensure_namespace_blocking(self, namespace: str, labels: Mapping[str, str]) -> tuple[bool, bool]:
        """
        Create the namespace unless it exists: whether this call created it,
        and whether a gateway did (now or before: it carries C{labels}'
        C{app} and C{component}).
        """
        from kubernetes.client.exceptions import ApiException

        core = self.core_blocking()
        marks = {k: v for k, v in labels.items() if k in ("app", "component")}
        try:
            response = core.read_namespace(namespace, _preload_content=False, _request_timeout=self.timeout)
        except ApiException as e:
            if e.status != 404:
                raise
        else:
            found = (json.loads(response.data).get("metadata") or {}).get("labels") or {}
            return False, all(found.get(k) == v for k, v in marks.items())
        body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace, "labels": dict(labels)}}
        try:
            core.create_namespace(body=body, _preload_content=False, _request_timeout=self.timeout)
        except ApiException as e:
            if e.status != 409:  # created meanwhile by another gateway
                raise
            return False, True
        return True, True

    def bind_blocking(self, namespace: str, cluster_role: str, service_account: str) -> bool:
        """
        Bind C{cluster_role} to C{service_account} within C{namespace} (a
        RoleBinding named after the role); C{False} if it exists already.
        """
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        body = {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": cluster_role, "namespace": namespace,
                         "labels": {"app": "egateway", "component": "kernel-namespace"}},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_role},
            "subjects": [{"kind": "ServiceAccount", "name": service_account, "namespace": namespace}],
        }
        rbac = client.RbacAuthorizationV1Api(self.core_blocking().api_client)
        try:
            rbac.create_namespaced_role_binding(namespace, body=body, _preload_content=False,
                                                _request_timeout=self.timeout)
        except ApiException as e:
            if e.status != 409:
                raise
            return False
        return True

    def delete_namespace_blocking(self, namespace: str) -> None:
        """
        Delete the namespace (Kubernetes then removes what is left in it); gone already is fine.
        """
        from kubernetes.client.exceptions import ApiException

        try:
            self.core_blocking().delete_namespace(namespace, _preload_content=False, _request_timeout=self.timeout)
        except ApiException as e:
            if e.status != 404:
                raise

    def service_account_ready_blocking(self, namespace: str, name: str) -> bool:
        """
        Whether the service account exists with its token (pods using it
        are refused by admission until then).
        """
        from kubernetes.client.exceptions import ApiException

        try:
            response = self.core_blocking().read_namespaced_service_account(
                name, namespace, _preload_content=False, _request_timeout=self.timeout
            )
        except ApiException as e:
            if e.status == 404:
                return False
            raise
        return bool(json.loads(response.data).get("secrets"))

    def list_blocking(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        """
        The pods matching C{selector} in C{namespace}, or in every namespace
        for C{""}.
        """
        core = self.core_blocking()
        if namespace:
            response = core.list_namespaced_pod(
                namespace, label_selector=selector, _preload_content=False, _request_timeout=self.timeout
            )
        else:
            response = core.list_pod_for_all_namespaces(
                label_selector=selector, _preload_content=False, _request_timeout=self.timeout
            )
        return list(json.loads(response.data).get("items") or [])

    def log_tail_blocking(self, namespace: str, name: str, lines: int = 5) -> str:
        from kubernetes.client.exceptions import ApiException

        try:
            response = self.core_blocking().read_namespaced_pod_log(
                name, namespace, tail_lines=lines, _preload_content=False, _request_timeout=self.timeout
            )
        except ApiException:
            return ""
        text = response.data.decode("utf-8", "replace")
        return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def api_error(e: Exception) -> str:
    """
    An API exception's message as Kubernetes wrote it (its Status body).
    """
    body = getattr(e, "body", None)
    if body:
        try:
            return str(json.loads(body).get("message") or body)
        except (ValueError, AttributeError):
            return str(body)[:500]
    return str(e)


__all__ = ["KubeClient", "api_error"]
