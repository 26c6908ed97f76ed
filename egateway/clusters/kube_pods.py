"""
Kernel pods as data: rendering a pod template written for Enterprise
Gateway (C{kernel-pod.yaml.j2}, Jinja2 with its variables), the parts the
gateway itself decides, and reading a pod's status for why it cannot run.

No I/O here: the launcher reads template files and talks to the API in its
thread pool; these functions are pure and tested without a cluster.

Why the rendering is done twice.  Enterprise Gateway's templates put values
straight into YAML (C{name: "{{ kernel_pod_name }}"}), so a value holding a
quote and a newline can add keys, containers or volumes, or override a key
already there (YAML keeps the last of two equal keys).  Escaping cannot be
done right without knowing where in the template a value lands (quoted,
plain, inside a flow list), so instead the template is rendered once with
every string value replaced by an opaque placeholder and once with the real
values, and the two parsed documents must agree: the same keys, the same
list lengths, and every string equal to the placeholder rendering with the
values put back.  A value can thus only ever be the text it is, where the
template put it; any value that would change the structure is refused
(status 400) with the variable's name.  Numbers produced by a template's
filters (C{{{ kernel_uid | int }}}) may differ: a number cannot carry
structure.
"""

from __future__ import annotations

import re
import secrets
from typing import Any, Iterable, Mapping

import yaml
from jinja2 import TemplateError
from jinja2.sandbox import SandboxedEnvironment

from egateway.clusters.interface import LaunchError

DEFAULT_TEMPLATE = """\
# egateway's default kernel pod (same variables as Enterprise Gateway's kernel-pod.yaml.j2).
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
    cluster-autoscaler.kubernetes.io/safe-to-evict: "false"
spec:
  restartPolicy: Never
  serviceAccountName: "{{ kernel_service_account_name }}"
  {% if kernel_uid is defined or kernel_gid is defined %}
  securityContext:
    {% if kernel_uid is defined %}
    runAsUser: {{ kernel_uid | int }}
    {% endif %}
    {% if kernel_gid is defined %}
    runAsGroup: {{ kernel_gid | int }}
    {% endif %}
  {% endif %}
  containers:
  - name: kernel
    image: "{{ kernel_image }}"
    imagePullPolicy: "{{ kernel_image_pull_policy }}"
    {% if kernel_cpus is defined or kernel_memory is defined or kernel_gpus is defined
       or kernel_cpus_limit is defined or kernel_memory_limit is defined or kernel_gpus_limit is defined %}
    resources:
      {% if kernel_cpus is defined or kernel_memory is defined or kernel_gpus is defined %}
      requests:
        {% if kernel_cpus is defined %}cpu: "{{ kernel_cpus }}"{% endif %}
        {% if kernel_memory is defined %}memory: "{{ kernel_memory }}"{% endif %}
        {% if kernel_gpus is defined %}nvidia.com/gpu: "{{ kernel_gpus }}"{% endif %}
      {% endif %}
      {% if kernel_cpus_limit is defined or kernel_memory_limit is defined or kernel_gpus_limit is defined %}
      limits:
        {% if kernel_cpus_limit is defined %}cpu: "{{ kernel_cpus_limit }}"{% endif %}
        {% if kernel_memory_limit is defined %}memory: "{{ kernel_memory_limit }}"{% endif %}
        {% if kernel_gpus_limit is defined %}nvidia.com/gpu: "{{ kernel_gpus_limit }}"{% endif %}
      {% endif %}
    {% endif %}
    {% if kernel_working_dir %}
    workingDir: "{{ kernel_working_dir }}"
    {% endif %}
    volumeMounts:
    {% for mount in kernel_volume_mounts or [] %}
    - {{ mount | tojson }}
    {% endfor %}
  volumes:
  {% for volume in kernel_volumes or [] %}
  - {{ volume | tojson }}
  {% endfor %}
"""
"""
The pod when neither the kernelspec nor the operator names a template.
Volumes and mounts come from the kernelspec's configuration (lists of
Kubernetes objects), never from a client.
"""

POD_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")
LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?\Z")
QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?\Z")
IMAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@-]{0,254}\Z")

GATEWAY_LABEL = "egateway/gateway-id"
USER_LABEL = "egateway/user"
USER_ANNOTATION = "egateway/user"


def dns_label(text: str) -> str:
    """
    C{text} lower-cased with every run of other characters than letters and
    digits turned into one C{-}, trimmed (as Enterprise Gateway normalises
    pod names).
    """
    return re.sub(r"[^0-9a-z]+", "-", text.lower()).strip("-")


def pod_name(username: str, kernel_id: str) -> str:
    """
    C{<user>-<kernel id>} (Enterprise Gateway's default), within the 63
    characters a container named after its pod may have; C{kernel-<id>}
    when the user name has no usable character.
    """
    user = dns_label(username)[: 62 - len(kernel_id)].strip("-")
    return f"{user or 'kernel'}-{kernel_id}"


def label_value(text: str) -> str:
    """
    C{text} if Kubernetes takes it as a label value, else C{""}.
    """
    return text if LABEL_VALUE.match(text) else ""


def check_quantity(name: str, value: str, status: int = 400) -> str:
    """
    @raise LaunchError: C{status} (400: a client's value) unless C{value} is
        a Kubernetes quantity.
    """
    if not QUANTITY.match(value):
        raise LaunchError(f"{name} {value[:80]!r} is not a Kubernetes quantity (e.g. 500m, 2, 4Gi)", status=status)
    return value


class TemplateRefused(LaunchError):
    """
    A value would change the pod's structure (400), or the template itself
    is broken (500).
    """


def _placeholders(values: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """
    The values with every non-empty string replaced by an opaque token, and
    the token-to-value map.
    """
    nonce = secrets.token_hex(6)
    safe: dict[str, Any] = {}
    tokens: dict[str, str] = {}
    for i, (name, value) in enumerate(sorted(values.items())):
        if isinstance(value, str) and value:
            token = f"egw{nonce}v{i}x"
            tokens[token] = value
            safe[name] = token
        else:
            safe[name] = value
    return safe, tokens


def _put_back(text: str, tokens: Mapping[str, str], pattern: re.Pattern[str]) -> str:
    return pattern.sub(lambda m: tokens[m.group(0)], text)


def _agree(
    safe: Any, real: Any, tokens: Mapping[str, str], pattern: re.Pattern[str], where: str, culprits: list[str]
) -> bool:
    """
    Whether C{real} is C{safe} with its placeholders put back (see the module
    docstring); on disagreement C{culprits} gets the position.
    """
    if isinstance(safe, dict):
        expected = {_put_back(str(k), tokens, pattern): v for k, v in safe.items()}
        if not isinstance(real, dict) or set(map(str, real)) != set(expected):
            culprits.append(where or "the document")
            return False
        return all(
            _agree(expected[str(k)], v, tokens, pattern, f"{where}.{k}" if where else str(k), culprits)
            for k, v in real.items()
        )
    if isinstance(safe, list):
        if not isinstance(real, list) or len(real) != len(safe):
            culprits.append(where)
            return False
        return all(_agree(s, r, tokens, pattern, f"{where}[{i}]", culprits) for i, (s, r) in enumerate(zip(safe, real)))
    if isinstance(safe, str):
        expected_text = _put_back(safe, tokens, pattern)
        if isinstance(real, str) and real == expected_text:
            return True
        # An unquoted numeric value ("runAsUser: {{ kernel_uid }}") parses as a number.
        if (isinstance(real, (int, float)) and not isinstance(real, bool) and safe in tokens
                and re.match(r"^-?[0-9]+(\.[0-9]+)?\Z", expected_text) and float(expected_text) == real):
            return True
        culprits.append(where)
        return False
    numbers = (int, float)
    if isinstance(safe, numbers) and not isinstance(safe, bool):
        ok = isinstance(real, numbers) and not isinstance(real, bool)
    else:
        ok = safe == real
    if not ok:
        culprits.append(where)
    return ok


def yaml_safe(value: Any) -> str:
    """
    C{value} as one YAML flow node (Enterprise Gateway 3.3's templates pass
    every value through a filter of this name): a string stays a string, a
    mapping or a list stays in its place.
    """
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30, allow_unicode=True)
    if text.endswith("\n...\n"):
        text = text[: -len("\n...\n")]
    return text.strip()


def _rendered(compiled: Any, values: Mapping[str, Any]) -> list[Any] | None:
    try:
        return [d for d in yaml.safe_load_all(compiled.render(**values)) if d is not None]
    except (TemplateError, yaml.YAMLError):
        return None


def _agrees(safe_docs: list[Any], docs: list[Any] | None, tokens: Mapping[str, str]) -> bool:
    if docs is None or len(docs) != len(safe_docs):
        return False
    if tokens:
        pattern = re.compile("|".join(map(re.escape, sorted(tokens, key=len, reverse=True))))
    else:
        pattern = re.compile(r"(?!)")
    return all(_agree(s, r, tokens, pattern, "", []) for s, r in zip(safe_docs, docs))


def render(template: str, values: Mapping[str, Any], source: str = "pod template") -> list[dict[str, Any]]:
    """
    The documents of C{template} rendered with C{values}, checked so that no
    value changes their structure.

    @raise TemplateRefused: 400 naming the variables whose values would
        change the structure; 500 when the template itself does not render
        or does not parse with harmless values.
    """
    environment = SandboxedEnvironment(autoescape=False, keep_trailing_newline=True)
    environment.filters["yaml_safe"] = yaml_safe
    safe_values, tokens = _placeholders(values)
    try:
        compiled = environment.from_string(template)
        safe_docs = [d for d in yaml.safe_load_all(compiled.render(**safe_values)) if d is not None]
    except (TemplateError, yaml.YAMLError) as e:
        raise TemplateRefused(f"{source} cannot be used: {e}") from None
    real_docs = _rendered(compiled, values)
    if _agrees(safe_docs, real_docs, tokens):
        assert real_docs is not None
        return real_docs
    # Which values?  Each alone, the others still placeholders.
    culprits = []
    for token, value in tokens.items():
        name = next(n for n, v in safe_values.items() if v == token)
        alone = {**safe_values, name: value}
        if not _agrees(safe_docs, _rendered(compiled, alone), {token: value}):
            culprits.append(name)
    named = ", ".join(sorted(culprits)) or "several variables together"
    raise TemplateRefused(
        f"refused: the value of {named} would change the structure of the kernel's {source}, "
        "not only fill in a value",
        status=400,
    )


def _items(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


EXTRA_KINDS = {"Service": "service", "ConfigMap": "configmap", "Secret": "secret"}
"""
What a pod template may ask for besides its Pod (Kubernetes kind: the
launcher's name for it): created in the kernel's namespace, labelled with
the kernel, owned by the pod and deleted with it.  Anything else (a
Deployment, a Role, a Namespace...) would outlive the kernel or widen what
a kernelspec can do with the gateway's rights, so it is refused.
"""


def kernel_documents(docs: Iterable[dict[str, Any]], source: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """
    The one Pod among the template's documents, and the others (each a
    kind of L{EXTRA_KINDS}, C{apiVersion: v1}, with a name).

    @raise TemplateRefused: 500: no Pod, several, a Pod without containers,
        or another document this gateway does not create (saying which
        kinds it does).
    """
    docs = list(docs)
    kinds = [str(d.get("kind", "")) if isinstance(d, dict) else type(d).__name__ for d in docs]
    pods = [d for d in docs if isinstance(d, dict) and d.get("kind") == "Pod"]
    allowed = ", ".join(EXTRA_KINDS)
    if len(pods) != 1:
        raise TemplateRefused(
            f"{source} must hold exactly one Pod, and besides it only {allowed} (it holds: "
            f"{', '.join(kinds) or 'nothing'})"
        )
    extras = [d for d in docs if d is not pods[0]]
    for doc in extras:
        kind = str(doc.get("kind", "")) if isinstance(doc, dict) else type(doc).__name__
        metadata = doc.get("metadata") if isinstance(doc, dict) else None
        name = metadata.get("name") if isinstance(metadata, dict) else None
        if kind not in EXTRA_KINDS or doc.get("apiVersion") != "v1" or not isinstance(name, str) or not name:
            raise TemplateRefused(
                f"{source}: a {kind or 'document'} {'named ' + repr(name) + ' ' if name else ''}cannot be "
                f"created with a kernel: besides its Pod a template may hold only {allowed} (apiVersion v1, "
                "with a metadata.name)"
            )
    pod = pods[0]
    containers = _items((pod.get("spec") or {}).get("containers"))
    if not containers or not all(isinstance(c, dict) for c in containers):
        raise TemplateRefused(f"{source}: the Pod has no containers")
    return pod, extras


def pod_document(docs: Iterable[dict[str, Any]], source: str) -> dict[str, Any]:
    """
    The Pod of L{kernel_documents}.
    """
    return kernel_documents(docs, source)[0]


def kernel_labels(labels: Any, *, kernel_id: str, gateway_id: str, username: str, component: str) -> dict[str, str]:
    """
    A template's labels (if a mapping) with those that find a kernel's
    objects again: its id, C{component} (unless set), this gateway's id and
    the user.
    """
    labels = {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {}
    labels["kernel_id"] = kernel_id
    labels.setdefault("component", component)
    if gateway_id:
        labels[GATEWAY_LABEL] = gateway_id
    user_label = label_value(username)
    if user_label:
        labels[USER_LABEL] = user_label
    return labels


def finish_extra(doc: dict[str, Any], *, namespace: str, kernel_id: str, gateway_id: str,
                 username: str) -> dict[str, Any]:
    """
    Put the kernel's namespace and labels into a document created with its
    pod, whatever the template says.
    """
    metadata = doc.setdefault("metadata", {})
    if not isinstance(metadata, dict):
        raise TemplateRefused(f"the metadata of the pod template's {doc.get('kind')} is not a mapping")
    metadata["namespace"] = namespace
    metadata["labels"] = kernel_labels(metadata.get("labels"), kernel_id=kernel_id, gateway_id=gateway_id,
                                       username=username, component="kernel-resource")
    return doc


def finish_pod(
    pod: dict[str, Any],
    *,
    name: str,
    namespace: str,
    kernel_id: str,
    gateway_id: str,
    username: str,
    env: Mapping[str, str],
    secret: str,
    token_key: str,
    pull_policy: str,
) -> dict[str, Any]:
    """
    Put what the gateway decides into the rendered pod, whatever the
    template says: its name and namespace, the labels that find it again
    (kernel id, gateway id, user), C{restartPolicy: Never} (a kernel that
    ends is not restarted behind the gateway's back), and the kernel's
    environment in the first container, the launch token from C{secret}
    rather than in the pod's spec.
    """
    metadata = pod.setdefault("metadata", {})
    if not isinstance(metadata, dict):
        raise TemplateRefused("the pod template's metadata is not a mapping")
    metadata["name"] = name
    metadata["namespace"] = namespace
    metadata["labels"] = kernel_labels(metadata.get("labels"), kernel_id=kernel_id, gateway_id=gateway_id,
                                       username=username, component="kernel")
    annotations = metadata.get("annotations") if isinstance(metadata.get("annotations"), dict) else {}
    annotations = {str(k): str(v) for k, v in annotations.items()}
    annotations[USER_ANNOTATION] = username
    metadata["annotations"] = annotations
    spec = pod["spec"]
    spec["restartPolicy"] = "Never"
    container = spec["containers"][0]
    if pull_policy and not container.get("imagePullPolicy"):
        container["imagePullPolicy"] = pull_policy
    ours = set(env) | {"EG_LAUNCH_TOKEN"}
    kept = [e for e in _items(container.get("env")) if isinstance(e, dict) and e.get("name") not in ours]
    kept += [{"name": k, "value": v} for k, v in sorted(env.items())]
    kept.append({"name": "EG_LAUNCH_TOKEN", "valueFrom": {"secretKeyRef": {"name": secret, "key": token_key}}})
    container["env"] = kept
    return pod


# -- reading a pod's status ----------------------------------------------------

FATAL_WAITING = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "ErrImageNeverPull",
        "InvalidImageName",
        "RunContainerError",
        "CrashLoopBackOff",
    }
)
"""
Container waiting reasons after which the kernel will not start by
itself: the launch fails at once, quoting the reason.  Not among them:
C{CreateContainerConfigError} and C{CreateContainerError}, which kubelet
also reports for passing trouble (C{failed to sync secret cache} under
load) and retries; the launch waits, showing the message in its phase,
until they clear or the launch times out.
"""


def _described(reason: str, message: str) -> str:
    return f"{reason}: {message}" if message else reason


def container_statuses(pod: Mapping[str, Any]) -> list[dict[str, Any]]:
    status = pod.get("status") or {}
    return [*_items(status.get("initContainerStatuses")), *_items(status.get("containerStatuses"))]


def terminated(pod: Mapping[str, Any]) -> str | None:
    """
    How the pod's containers ended, if one has (C{"container kernel exited
    with code 1 (Error)"}, C{"... (OOMKilled)"}), else C{None}.
    """
    for status in container_statuses(pod):
        state = (status.get("state") or {}).get("terminated")
        if state:
            code = state.get("exitCode")
            reason = state.get("reason") or ""
            signal = state.get("signal")
            how = f"was killed by signal {signal}" if signal else f"exited with code {code}"
            message = (state.get("message") or "").strip()
            return (
                f"container {status.get('name', '?')} {how}" + (f" ({reason})" if reason else "")
                + (f": {message[:500]}" if message else "")
            )
    return None


def launch_problem(pod: Mapping[str, Any]) -> str | None:
    """
    Why the pod will not bring up a kernel, in Kubernetes' words, or
    C{None} while it still may: a pull or configuration error of a
    container, a scheduler that found no node (C{FailedScheduling} with the
    scheduler's message), a container that ended, a failed or evicted pod.
    """
    status = pod.get("status") or {}
    for container in container_statuses(pod):
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in FATAL_WAITING:
            return _described(waiting["reason"], (waiting.get("message") or "").strip()[:500])
    for condition in _items(status.get("conditions")):
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False" and (
            condition.get("reason") == "Unschedulable"
        ):
            return _described("FailedScheduling", (condition.get("message") or "").strip())
    ended = terminated(pod)
    if ended:
        return ended
    if status.get("phase") in ("Failed", "Succeeded"):
        return _described(f"pod {status['phase']}", f"{status.get('reason', '')} {status.get('message', '')}".strip())
    return None


def running_address(pod: Mapping[str, Any]) -> str | None:
    """
    The pod's IP once it runs, else C{None}.
    """
    status = pod.get("status") or {}
    if status.get("phase") == "Running" and status.get("podIP"):
        return str(status["podIP"])
    return None


def progress(pod: Mapping[str, Any]) -> str:
    """
    One line on where a starting pod is, for the C{submitted} phase
    (C{"scheduled on node1; kernel: ContainerCreating"}).
    """
    status = pod.get("status") or {}
    parts = [status.get("phase") or "Pending"]
    node = (pod.get("spec") or {}).get("nodeName")
    if node:
        parts.append(f"on {node}")
    for container in container_statuses(pod):
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason"):
            message = (waiting.get("message") or "").strip()[:200]
            parts.append(f"{container.get('name', '?')}: {waiting['reason']}" + (f" ({message})" if message else ""))
    return ", ".join(parts)


def values_for(env: Mapping[str, str]) -> dict[str, str]:
    """
    Enterprise Gateway's template variables from an environment: each
    C{KERNEL_*} variable lower-cased (C{KERNEL_CPUS} is C{kernel_cpus}).
    """
    return {name.lower(): value for name, value in env.items() if name.startswith("KERNEL_")}


__all__ = [
    "DEFAULT_TEMPLATE",
    "EXTRA_KINDS",
    "FATAL_WAITING",
    "TemplateRefused",
    "check_quantity",
    "dns_label",
    "finish_extra",
    "finish_pod",
    "kernel_documents",
    "launch_problem",
    "pod_document",
    "pod_name",
    "progress",
    "render",
    "running_address",
    "terminated",
    "values_for",
]
