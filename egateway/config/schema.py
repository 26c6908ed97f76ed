"""
The gateway's configuration schema: one frozen object with a section per
concern.

Every leaf setting is declared once, as a dataclass field whose metadata names
its environment variables (Enterprise Gateway's names first, where one
exists) and its help text.  From that single declaration the loader
(L{egateway.config.loader}) derives the TOML schema, the environment mapping
and one command-line flag per setting, so the three sources cannot drift
apart.

Only shapes, types and bounds are declared here.  What a value means to the
layer that uses it (a store URL, an authenticator's keys, a Slurm time
limit) is checked by that layer: the gateway's assembly runs those checks
(L{egateway.validation}), so this package imports nothing above it.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence


class ConfigError(ValueError):
    """
    A configuration value is missing, unknown or malformed.  The message
    names the offending key and says what would be accepted.
    """

    @classmethod
    @contextmanager
    def about(cls, key: str, *errors: type[Exception]) -> Iterator[None]:
        """
        Report a layer's own complaint about a value (a C{ValueError}, or
        any of C{errors}) as a L{ConfigError} naming the key, so each layer
        checks its section with the parser it uses anyway::

            with ConfigError.about("store.store_url"):
                parse_store_url(settings.store_url)
        """
        try:
            yield
        except (errors or (ValueError,)) as e:
            raise cls(f"{key}: {e}") from None


def setting(default: Any, help: str, env: Sequence[str] = (), **extra: Any) -> Any:
    """
    Declare one leaf setting.

    @param default: the value used when no source sets it.
    @param help: one line for C{--help} and the README's reference.
    @param env: environment variable names, first match wins.
    """
    metadata = {"help": help, "env": tuple(env), **extra}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class ServerConfig:
    listen: str = setting(
        "tcp:8888:interface=127.0.0.1",
        "Endpoint string for the HTTP/WebSocket listener (tcp:, ssl:, unix:).",
    )
    ip: str = setting(
        "",
        "Listen address; with port, an alternative to --listen.",
        env=("EG_IP", "KG_IP"),
    )
    port: int = setting(
        0,
        "Listen port; with ip, an alternative to --listen (0: use --listen).",
        env=("EG_PORT", "KG_PORT"),
        minimum=0,
        maximum=65535,
    )
    base_url: str = setting(
        "/", "Prefix for every route.", env=("EG_BASE_URL", "KG_BASE_URL")
    )
    data_dir: str = setting(
        "",
        "Directory for the gateway's files (kernels' connection files and, with persistence, the kernel "
        "store and its key); keep it on persistent storage, not under /run or /tmp, or kept kernels are "
        "forgotten (default: $XDG_DATA_HOME/egateway with persistence, else a temporary directory).",
        env=("EG_DATA_DIR",),
    )
    ws_ping_interval: float = setting(
        30.0,
        "Seconds between WebSocket pings to clients (0 disables).",
        env=("EG_WS_PING_INTERVAL_SECS",),
        minimum=0,
    )
    ws_ack_delay: float = setting(
        5.0,
        "Seconds from a message sent to a WebSocket client to the ping whose pong says the client has it, "
        "after which its session stops holding it for a resume (0 disables: a connected session then holds "
        "its last 256 messages).",
        env=("EG_WS_ACK_DELAY_SECS",),
        minimum=0,
    )
    max_request_body: int = setting(
        1 << 20,
        "Largest accepted REST request body in bytes.",
        env=("EG_MAX_REQUEST_BODY",),
        minimum=1024,
    )
    max_ws_message: int = setting(
        64 << 20,
        "Largest accepted WebSocket message from a client, in bytes.",
        env=("EG_MAX_WS_MESSAGE",),
        minimum=1024,
    )
    client_message_limit: int = setting(
        0,
        "Largest kernel message sent to a client in one WebSocket message, in bytes: a larger stream output is "
        "sent in pieces, anything else replaced by a notice. 0: 10 MiB for Tornado clients (jupyter_server's "
        "gateway client cannot take more), no limit for others.",
        env=("EG_CLIENT_MESSAGE_LIMIT",),
        minimum=0,
    )
    stop_timeout: float = setting(
        30.0,
        "Seconds a graceful stop may take before the gateway exits anyway.",
        env=("EG_STOP_TIMEOUT",),
        minimum=0,
    )
    certfile: str = setting(
        "",
        "Server certificate (PEM, intermediates after it); when set the listener speaks TLS "
        "(HTTPS/WSS) on the listen endpoint. Certificate files are reloaded on SIGHUP.",
        env=("EG_CERTFILE", "KG_CERTFILE"),
    )
    keyfile: str = setting(
        "",
        "Unencrypted PEM private key of certfile (empty: the key is in certfile).",
        env=("EG_KEYFILE", "KG_KEYFILE"),
    )
    client_ca: str = setting(
        "",
        "CA certificates (PEM) client certificates must chain to; when set, clients without "
        "one are refused (mutual TLS).",
        env=("EG_CLIENT_CA", "KG_CLIENT_CA"),
    )
    tls_min_version: str = setting(
        "1.2",
        "Oldest TLS version accepted: 1.2 or 1.3 (1.0 and 1.1 are always refused).",
        env=("EG_TLS_MIN_VERSION",),
        choices=("1.2", "1.3"),
    )


@dataclass(frozen=True)
class AuthConfig:
    auth_token: str = setting(
        "",
        "Shared token clients must present (empty: no token required).",
        env=("EG_AUTH_TOKEN", "KG_AUTH_TOKEN"),
        secret=True,
    )
    allow_origin: str = setting(
        "",
        "Access-Control-Allow-Origin value; also the Origin allowed on "
        "WebSockets ('*' for any).",
        env=("EG_ALLOW_ORIGIN", "KG_ALLOW_ORIGIN"),
    )
    allowed_hosts: list = setting(
        [],
        "Host names (.example.org: every name under it; *: any) a request may name in its Host header when no "
        "authenticator is configured, besides loopback names and addresses and the listen interface's (a "
        "defence against DNS rebinding).",
        env=("EG_ALLOWED_HOSTS",),
    )
    allow_credentials: str = setting(
        "",
        "Access-Control-Allow-Credentials value.",
        env=("EG_ALLOW_CREDENTIALS", "KG_ALLOW_CREDENTIALS"),
    )
    allow_headers: str = setting(
        "",
        "Access-Control-Allow-Headers value.",
        env=("EG_ALLOW_HEADERS", "KG_ALLOW_HEADERS"),
    )
    allow_methods: str = setting(
        "",
        "Access-Control-Allow-Methods value.",
        env=("EG_ALLOW_METHODS", "KG_ALLOW_METHODS"),
    )
    expose_headers: str = setting(
        "",
        "Access-Control-Expose-Headers value.",
        env=("EG_EXPOSE_HEADERS", "KG_EXPOSE_HEADERS"),
    )
    max_age: str = setting(
        "", "Access-Control-Max-Age value.", env=("EG_MAX_AGE", "KG_MAX_AGE")
    )
    list_kernels: bool = setting(
        True,
        "Allow GET /api/kernels and GET /api/sessions (each user sees only the kernels and sessions they "
        "may use; JupyterLab, through jupyter_server's gateway client, polls the list).",
        env=("EG_LIST_KERNELS", "KG_LIST_KERNELS"),
    )
    authenticators: list = setting(
        [],
        "Authenticators asked in order: trusted-proxy, token, user-tokens, jwt, jupyterhub (empty: each "
        "whose settings are given, in that order; none: every caller is anonymous).",
        env=("EG_AUTHENTICATORS",),
    )
    user_tokens_file: str = setting(
        "",
        "TOML (or .json) file of per-user tokens' SHA-256 hashes with username, groups, admin; reloaded "
        "when it changes (make entries with python -m egateway.api.authenticators.user_tokens).",
        env=("EG_USER_TOKENS_FILE",),
    )
    jwt_secret: str = setting(
        "",
        "Shared secret (at least 32 bytes) verifying HS256/HS384/HS512 JWT bearer tokens.",
        env=("EG_JWT_SECRET",),
        secret=True,
    )
    jwt_public_key_file: str = setting(
        "",
        "PEM public key (or certificate) verifying RS256 (and other public-key) JWT bearer tokens.",
        env=("EG_JWT_PUBLIC_KEY_FILE",),
    )
    jwt_algorithms: list = setting(
        ["HS256", "RS256"],
        "JWT algorithms accepted (each only when its key is configured).",
        env=("EG_JWT_ALGORITHMS",),
    )
    jwt_audience: str = setting(
        "",
        "Required JWT aud claim; must be set with the jwt authenticator, unless jwt_any_audience is true.",
        env=("EG_JWT_AUDIENCE",),
    )
    jwt_any_audience: bool = setting(
        False,
        "Accept JWTs whatever their aud claim (only for an identity provider whose every token is meant for "
        "this gateway); without it jwt_audience is required.",
        env=("EG_JWT_ANY_AUDIENCE",),
    )
    jwt_issuer: str = setting(
        "", "Required JWT iss claim (empty: iss is not checked).", env=("EG_JWT_ISSUER",)
    )
    jwt_username_claim: str = setting(
        "sub",
        "JWT claim naming the user (dotted names reach nested claims).",
        env=("EG_JWT_USERNAME_CLAIM",),
    )
    jwt_groups_claim: str = setting(
        "groups",
        "JWT claim listing the user's groups (empty: none).",
        env=("EG_JWT_GROUPS_CLAIM",),
    )
    jwt_leeway: float = setting(
        30.0,
        "Seconds of clock skew allowed when checking JWT exp and nbf.",
        env=("EG_JWT_LEEWAY",),
        minimum=0,
        maximum=600,
    )
    jupyterhub_api_url: str = setting(
        "",
        "JupyterHub API URL (e.g. http://127.0.0.1:8081/hub/api) that checks JupyterHub API tokens.",
        env=("EG_JUPYTERHUB_API_URL",),
    )
    jupyterhub_scope: str = setting(
        "access:services!service=egateway",
        "Scope a JupyterHub token must hold (in the Hub's answer) to be accepted, e.g. "
        "access:services!service=<this gateway's service name> (empty: any token the Hub accepts).",
        env=("EG_JUPYTERHUB_SCOPE",),
    )
    jupyterhub_cache_ttl: float = setting(
        30.0,
        "Seconds a JupyterHub token check is cached; a token revoked at the Hub is refused after it.",
        env=("EG_JUPYTERHUB_CACHE_TTL",),
        minimum=0,
    )
    jupyterhub_recheck_interval: float = setting(
        60.0,
        "Seconds between checks, with the Hub (through the cache), of the JupyterHub tokens open WebSockets "
        "were opened with; a WebSocket whose token the Hub refuses is closed (0: never).",
        env=("EG_JUPYTERHUB_RECHECK_INTERVAL",),
        minimum=0,
    )
    trusted_proxies: list = setting(
        [],
        "Addresses or CIDRs of trusted front ends: with the shared token they may name the user (in "
        "trusted_user_header or KERNEL_USERNAME); once set, the shared token from elsewhere names no one.",
        env=("EG_TRUSTED_PROXIES",),
    )
    trusted_user_header: str = setting(
        "",
        "Header in which a trusted front end names the user, e.g. X-Forwarded-User (empty: KERNEL_USERNAME).",
        env=("EG_TRUSTED_USER_HEADER",),
    )
    admin_users: list = setting(
        [], "Users who administer every kernel.", env=("EG_ADMIN_USERS",)
    )
    admin_groups: list = setting(
        [], "Groups whose members administer every kernel.", env=("EG_ADMIN_GROUPS",)
    )
    auth_failure_limit: int = setting(
        10,
        "Failed authentications allowed per client address and token within auth_failure_window; more with "
        "that token from that address are answered 429 (0: no limit).",
        env=("EG_AUTH_FAILURE_LIMIT",),
        minimum=0,
    )
    auth_failure_window: float = setting(
        60.0,
        "Seconds over which failed authentications are counted.",
        env=("EG_AUTH_FAILURE_WINDOW",),
        minimum=1,
    )
    audit_log: str = setting(
        "",
        "File the audit trail is appended to, one JSON object per line (empty: the audit events go only "
        "to the gateway log, namespace egateway.audit).",
        env=("EG_AUDIT_LOG",),
    )


@dataclass(frozen=True)
class KernelsConfig:
    default_kernel_name: str = setting(
        "",
        "Kernelspec used when a request names none (empty: python3).",
        env=("EG_DEFAULT_KERNEL_NAME", "KG_DEFAULT_KERNEL_NAME"),
    )
    max_kernels: int = setting(
        0,
        "Most kernels at once, launches in progress included, dead ones not (0: no limit).",
        env=("EG_MAX_KERNELS", "KG_MAX_KERNELS"),
        minimum=0,
    )
    launch_timeout: float = setting(
        30.0,
        "Seconds a launch may take until the kernel answers kernel_info.",
        env=("EG_KERNEL_LAUNCH_TIMEOUT",),
        minimum=1,
    )
    max_launch_timeout: float = setting(
        300.0,
        "Longest launch timeout a client may ask for with KERNEL_LAUNCH_TIMEOUT in the start request's env "
        "(as Enterprise Gateway honours it; jupyter_server's gateway client sends it); longer requests are "
        "cut to this.",
        env=("EG_MAX_LAUNCH_TIMEOUT",),
        minimum=1,
    )
    kernel_info_timeout: float = setting(
        60.0,
        "Seconds a new WebSocket waits for a starting or restarting kernel.",
        env=("EG_KERNEL_INFO_TIMEOUT",),
        minimum=1,
    )
    restart_limit: int = setting(
        5,
        "Automatic restarts of a crashed kernel before it is declared dead (a kernel ended on purpose "
        "outside the gateway, such as a Slurm job cancelled by an administrator, is never restarted).",
        env=("EG_RESTART_LIMIT",),
        minimum=0,
    )
    shutdown_wait: float = setting(
        5.0,
        "Seconds between shutdown_request and SIGTERM.",
        env=("EG_SHUTDOWN_WAIT",),
        minimum=0,
    )
    terminate_wait: float = setting(
        5.0,
        "Seconds between SIGTERM and SIGKILL.",
        env=("EG_TERMINATE_WAIT",),
        minimum=0,
    )
    poll_interval: float = setting(
        3.0,
        "Seconds between liveness polls of kernels whose launcher cannot "
        "report exits by itself.",
        env=("EG_POLL_INTERVAL",),
        minimum=0.1,
    )
    kernelspec_path: list = setting(
        [],
        "Extra directories searched for kernelspecs, before Jupyter's own.",
        env=("EG_KERNELSPEC_PATH",),
    )
    allowed_kernelspecs: list = setting(
        [],
        "Only these kernelspecs are offered (empty: all found).",
        env=("EG_ALLOWED_KERNELS", "EG_KERNEL_WHITELIST"),
    )
    client_envs: list = setting(
        [],
        "Names besides KERNEL_* a client may set in a kernel's environment "
        "('*' for any).",
        env=("EG_CLIENT_ENVS", "EG_ENV_WHITELIST", "KG_ENV_WHITELIST"),
    )
    inherited_envs: list = setting(
        ["PATH", "HOME", "LANG", "LC_ALL", "TZ"],
        "Gateway environment variables copied into every kernel's environment.",
        env=("EG_INHERITED_ENVS", "EG_ENV_PROCESS_WHITELIST", "KG_ENV_PROCESS_WHITELIST"),
    )
    port_range: str = setting(
        "0..0",
        "lo..hi range for kernel ports (0..0: any free port).",
        env=("EG_PORT_RANGE",),
    )
    session_retention: float = setting(
        3600.0,
        "Seconds a WebSocket session whose client left keeps journaling, so the "
        "client can resume it.",
        env=("EG_SESSION_RETENTION",),
        minimum=0,
    )
    kernel_encryption: str = setting(
        "auto",
        "CurveZMQ encryption of kernel channels: auto (local kernels whose kernelspec declares "
        "supported_encryption curve; remote ones whose launcher provides keys), off, or required "
        "(no kernel is reached over TCP in clear text).",
        env=("EG_KERNEL_ENCRYPTION",),
        choices=("auto", "off", "required"),
    )


@dataclass(frozen=True)
class CullingConfig:
    cull_idle_timeout: float = setting(
        0.0,
        "Seconds of inactivity after which a kernel is shut down (0: never).",
        env=("EG_CULL_IDLE_TIMEOUT",),
        minimum=0,
    )
    cull_interval: float = setting(
        300.0,
        "Seconds between idle checks.",
        env=("EG_CULL_INTERVAL",),
        minimum=1,
    )
    cull_connected: bool = setting(
        False,
        "Also cull kernels that have WebSocket clients.",
        env=("EG_CULL_CONNECTED",),
    )
    cull_busy: bool = setting(
        False, "Also cull busy kernels.", env=("EG_CULL_BUSY",)
    )


@dataclass(frozen=True)
class ResponseConfig:
    response_ip: str = setting(
        "",
        "Address remote launchers send connection info to: bound, and "
        "advertised in {response_address} (empty: this host's primary IPv4 "
        "address; 0.0.0.0: bind every address, advertise the primary one).",
        env=("EG_RESPONSE_IP",),
    )
    response_port: int = setting(
        8877,
        "TCP port of the connection-info listener (0: any free port).",
        env=("EG_RESPONSE_PORT",),
        minimum=0,
        maximum=65535,
    )
    response_accept_v1: bool = setting(
        False,
        "Accept Enterprise Gateway's unauthenticated version 1 payloads, only for kernelspecs that run "
        "its launcher (Enterprise Gateway's form unchanged, or kernel_launcher = \"enterprise-gateway\" "
        "in the launcher config) and only from the kernel's host (anyone on that host can then answer "
        "for a pending launch; see the README's security section).",
        env=("EG_RESPONSE_ACCEPT_V1",),
    )
    response_max_payload: int = setting(
        65536,
        "Largest connection-info payload accepted, in bytes.",
        env=("EG_RESPONSE_MAX_PAYLOAD",),
        minimum=1024,
    )
    response_tls: bool = setting(
        False,
        "Receive connection info over TLS with the server certificate (certfile/keyfile or the "
        "ssl: listen keys). Only egateway's launcher given the CA (EG_RESPONSE_CA) can then "
        "deliver; Enterprise Gateway's launchers cannot.",
        env=("EG_RESPONSE_TLS",),
    )


@dataclass(frozen=True)
class SSHConfig:
    remote_hosts: list = setting(
        ["localhost"],
        "Hosts SSH kernels may run on (a kernelspec's remote_hosts overrides).",
        env=("EG_REMOTE_HOSTS",),
    )
    remote_user: str = setting(
        "",
        "User to log in as on remote hosts (empty: the gateway's user).",
        env=("EG_REMOTE_USER",),
    )
    ssh_port: int = setting(22, "Port of the remote hosts' sshd.", env=("EG_SSH_PORT",), minimum=1, maximum=65535)
    ssh_key_files: list = setting(
        [],
        "Private key files for SSH (empty: ~/.ssh/id_ed25519, id_ecdsa, id_rsa, as ssh does).",
        env=("EG_SSH_KEY_FILES",),
    )
    ssh_known_hosts: str = setting(
        "~/.ssh/known_hosts", "known_hosts file host keys are checked against.", env=("EG_SSH_KNOWN_HOSTS",)
    )
    ssh_host_key_checking: str = setting(
        "strict",
        "strict (refuse unknown or changed host keys), accept-new (learn unknown ones) or off.",
        env=("EG_SSH_HOST_KEY_CHECKING",),
        choices=("strict", "accept-new", "off"),
    )
    ssh_connect_timeout: float = setting(
        10.0, "Seconds to reach and log in to a host.", env=("EG_SSH_CONNECT_TIMEOUT",), minimum=0.1
    )
    load_balancing_algorithm: str = setting(
        "round-robin",
        "How SSH launches pick a host: round-robin or least-connection.",
        env=("EG_LOAD_BALANCING_ALGORITHM",),
        choices=("round-robin", "least-connection"),
    )
    host_backoff: float = setting(
        5.0,
        "Seconds a host that failed is avoided; doubles on each further failure.",
        env=("EG_HOST_BACKOFF",),
        minimum=0,
    )
    host_backoff_max: float = setting(
        300.0, "Longest back-off for a failing host.", env=("EG_HOST_BACKOFF_MAX",), minimum=0
    )
    kernel_log_dir: str = setting(
        "/tmp",
        "Directory on remote hosts for each kernel's log (kernel-<id>.log).",
        env=("EG_KERNEL_LOG_DIR",),
    )
    remote_python: str = setting(
        "",
        "Python that runs kernelspec argv naming python on remote hosts (empty: the gateway's own path).",
        env=("EG_REMOTE_PYTHON",),
    )


@dataclass(frozen=True)
class SlurmConfig:
    slurm_bin_dir: str = setting(
        "",
        "Directory holding sbatch, squeue, scontrol and scancel (empty: search the gateway's PATH).",
        env=("EG_SLURM_BIN_DIR",),
    )
    slurm_conf: str = setting(
        "",
        "slurm.conf the Slurm commands use, passed as SLURM_CONF (empty: the gateway's own SLURM_CONF, "
        "else Slurm's default).",
        env=("EG_SLURM_CONF",),
    )
    slurm_partition: str = setting(
        "",
        "Partition for kernel jobs when the kernelspec names none (empty: the cluster's default).",
        env=("EG_SLURM_PARTITION",),
    )
    slurm_account: str = setting(
        "", "Account kernel jobs are charged to when the kernelspec names none.", env=("EG_SLURM_ACCOUNT",)
    )
    slurm_qos: str = setting("", "QOS of kernel jobs when the kernelspec names none.", env=("EG_SLURM_QOS",))
    slurm_time_limit: str = setting(
        "",
        "Time limit of kernel jobs when the kernelspec names none, in Slurm's format (e.g. 8:00:00; "
        "empty: the partition's default).",
        env=("EG_SLURM_TIME_LIMIT",),
    )
    slurm_max_cpus: int = setting(
        4,
        "Most CPUs a client may ask for with KERNEL_CPUS (a kernelspec's max_cpus overrides).",
        env=("EG_SLURM_MAX_CPUS",),
        minimum=1,
    )
    slurm_max_memory: str = setting(
        "8G",
        "Most memory a client may ask for with KERNEL_MEMORY, e.g. 8G (a kernelspec's max_memory overrides).",
        env=("EG_SLURM_MAX_MEMORY",),
    )
    slurm_max_gpus: int = setting(
        0,
        "Most GPUs a client may ask for with KERNEL_GPUS (a kernelspec's max_gpus overrides).",
        env=("EG_SLURM_MAX_GPUS",),
        minimum=0,
    )
    slurm_max_time_limit: str = setting(
        "24:00:00",
        "Longest time limit a client may ask for with KERNEL_SLURM_TIME (a kernelspec's max_time_limit "
        "overrides).",
        env=("EG_SLURM_MAX_TIME_LIMIT",),
    )
    slurm_poll_interval: float = setting(
        0.5,
        "Seconds between job state queries while a kernel job is pending or starting.",
        env=("EG_SLURM_POLL_INTERVAL",),
        minimum=0.05,
    )
    slurm_job_name_prefix: str = setting(
        "egateway-",
        "Kernel jobs are named this prefix followed by the kernel id.",
        env=("EG_SLURM_JOB_NAME_PREFIX",),
    )
    slurm_log_dir: str = setting(
        "/tmp",
        "Directory on the compute nodes for each kernel job's output (kernel-<id>.log); it must exist there.",
        env=("EG_SLURM_LOG_DIR",),
    )
    slurm_python: str = setting(
        "",
        "Python that runs kernelspec argv naming python on compute nodes (empty: the gateway's own path).",
        env=("EG_SLURM_PYTHON",),
    )


# -- Kubernetes (issue 13): a self-contained block, kept apart so it moves easily ---------------


@dataclass(frozen=True)
class KubernetesConfig:
    kubernetes_config: str = setting(
        "",
        "kubeconfig file for the Kubernetes API (empty: the in-cluster service account when "
        "KUBERNETES_SERVICE_HOST is set, else KUBECONFIG or ~/.kube/config).",
        env=("EG_KUBERNETES_CONFIG",),
    )
    kubernetes_namespace: str = setting(
        "default",
        "Namespace kernel pods run in.",
        env=("EG_KUBERNETES_NAMESPACE", "EG_NAMESPACE"),
    )
    kubernetes_namespace_mode: str = setting(
        "shared",
        "shared: every kernel pod in kubernetes_namespace; user: each user's pods in their own namespace, "
        "kubernetes_namespace_prefix + user name, created on first use and kept; kernel: each pod in its own "
        "namespace, kubernetes_namespace_prefix + pod name, deleted with the kernel.",
        env=("EG_KUBERNETES_NAMESPACE_MODE",),
        choices=("shared", "user", "kernel"),
    )
    kubernetes_namespace_prefix: str = setting(
        "kernels-",
        "Prefix of per-user and per-kernel namespaces (kubernetes_namespace_mode = user or kernel).",
        env=("EG_KUBERNETES_NAMESPACE_PREFIX",),
    )
    kubernetes_image: str = setting(
        "",
        "Kernel image when the kernelspec names none (its image_name).",
        env=("EG_KUBERNETES_IMAGE",),
    )
    kubernetes_image_pull_policy: str = setting(
        "IfNotPresent",
        "imagePullPolicy of kernel containers whose pod template sets none.",
        env=("EG_KUBERNETES_IMAGE_PULL_POLICY",),
        choices=("Always", "IfNotPresent", "Never"),
    )
    kubernetes_pod_template: str = setting(
        "",
        "Jinja2 pod template (Enterprise Gateway's kernel-pod.yaml.j2 variables) for kernelspecs that carry none "
        "(empty: the built-in one).",
        env=("EG_KUBERNETES_POD_TEMPLATE",),
    )
    kubernetes_service_account: str = setting(
        "default",
        "Service account of kernel pods.",
        env=("EG_DEFAULT_KERNEL_SERVICE_ACCOUNT_NAME",),
    )
    kubernetes_kernel_cluster_role: str = setting(
        "kernel-controller",
        "ClusterRole bound (a RoleBinding of the same name) to the kernels' service account in each namespace the gateway creates (kubernetes_namespace_mode = user or kernel), deleted with the namespace; the gateway needs the bind verb on it (etc/kubernetes/rbac-per-user.yaml). Empty: no binding.",
        env=("EG_KERNEL_CLUSTER_ROLE",),
    )
    kubernetes_delete_grace: float = setting(
        10.0,
        "Seconds a deleted kernel pod gets to stop before it is deleted forcibly.",
        env=("EG_KUBERNETES_DELETE_GRACE",),
        minimum=0.0,
    )
    kubernetes_api_timeout: float = setting(
        30.0,
        "Seconds one Kubernetes API request may take.",
        env=("EG_KUBERNETES_API_TIMEOUT",),
        minimum=1.0,
    )
    kubernetes_threads: int = setting(
        16,
        "Threads for blocking Kubernetes API calls, besides the one each watched namespace holds.",
        env=("EG_KUBERNETES_THREADS",),
        minimum=2,
    )


@dataclass(frozen=True)
class StoreConfig:
    store_url: str = setting(
        "",
        "Where kernels, sessions and WebSocket journals are kept: redis://[user:password@]host:port/db for gateways "
        "sharing one Redis (rediss://...?ca=PATH&cert=PATH&key=PATH for TLS; "
        "redis+sentinel://[user:password@]host:26379,host2:26379/master-name/db to follow a Sentinel failover), "
        "sqlite:///path or a file path for one gateway (empty: an SQLite file in the data directory).",
        env=("EG_STORE_URL",),
        secret=True,
    )
    store_key: str = setting(
        "",
        "Fernet key encrypting the secrets in kernel records (several, comma-separated: the first encrypts, all "
        "decrypt); make one with python -m egateway.store.crypto. Overrides store_key_file.",
        env=("EG_STORE_KEY",),
        secret=True,
    )
    store_key_file: str = setting(
        "",
        "File holding the store key; for an SQLite store it is created (mode 0600) if missing, gateways sharing "
        "Redis must all be given the same key (empty: store.key in the data directory).",
        env=("EG_STORE_KEY_FILE",),
    )
    persistence: bool = setting(
        True,
        "Keep kernel records in the store, so kernels outlive a gateway restart or crash.",
        env=("EG_KERNEL_SESSION_PERSISTENCE",),
    )
    on_stop: str = setting(
        "keep",
        "What a graceful stop does with running kernels when persistence is on: keep (a restarted gateway "
        "reattaches) or shutdown.",
        env=("EG_ON_STOP",),
        choices=("keep", "shutdown"),
    )
    journal_entries: int = setting(
        20000,
        "WebSocket messages kept per client session for a reconnecting client to receive what it missed; older "
        "ones are dropped (0: no replay).",
        env=("EG_JOURNAL_ENTRIES",),
        minimum=0,
    )
    journal_bytes: int = setting(
        64 << 20,
        "Most bytes of messages kept per client session for a reconnecting client (the "
        "oldest go first); messages shared by several sessions are stored once.",
        env=("EG_JOURNAL_BYTES",),
        minimum=0,
    )
    journal_total_bytes: int = setting(
        256 << 20,
        "Most bytes of messages all client sessions' journals and all kernels' iopub rings of this gateway hold "
        "together; over it, the largest ones lose their oldest messages first (0: each is bounded only by "
        "journal_entries and journal_bytes).",
        env=("EG_JOURNAL_TOTAL_BYTES",),
        minimum=0,
    )
    lease_ttl: float = setting(
        30.0,
        "Seconds a gateway's lease on a kernel lasts unless renewed; a dead gateway's kernels are taken over "
        "after it.",
        env=("EG_LEASE_TTL",),
        minimum=1,
    )
    gateway_id: str = setting(
        "",
        "This gateway installation's id (1 to 64 letters, digits, . _ -), tagged on every kernel it starts "
        "(EGATEWAY_ID in local and SSH kernels' environment, the comment of Slurm jobs) so the reconciler finds "
        "its own and no other's (empty: derived from the host name and the data directory, so it stays the same "
        "across restarts). Gateways sharing a store have the same id only when given the same one.",
        env=("EG_GATEWAY_ID",),
    )
    reconcile: str = setting(
        "adopt",
        "What the reconciler does, with persistence on, with a running kernel tagged with this gateway's id that "
        "the store does not know: adopt (reattach and list it where its launcher can, i.e. local kernels whose "
        "connection file remains, so no one's work is lost; others are reaped), reap (stop it, remove its files) "
        "or report (log it only). It runs once the store's kernels are restored, then every reconcile_interval.",
        env=("EG_RECONCILE",),
        choices=("reap", "adopt", "report"),
    )
    reconcile_interval: float = setting(
        300.0,
        "Seconds between reconciler passes after the one at start (0: only at start).",
        env=("EG_RECONCILE_INTERVAL",),
        minimum=0,
    )


@dataclass(frozen=True)
class TenancyConfig:
    hide_kernels: bool = setting(
        True,
        "Another user's kernel (or session) is answered 404, as if it did not exist (false: 403).",
        env=("EG_HIDE_KERNELS",),
    )
    authorized_users: list = setting(
        [],
        "If set (or authorized_groups is), only these users may launch kernels; a kernelspec's own "
        "authorized_users/authorized_groups replace both.",
        env=("EG_AUTHORIZED_USERS",),
    )
    unauthorized_users: list = setting(
        [],
        "Users who may not launch kernels (a kernelspec's unauthorized_users adds to it).",
        env=("EG_UNAUTHORIZED_USERS",),
    )
    authorized_groups: list = setting(
        [],
        "If set (or authorized_users is), only members of these groups (or those users) may launch kernels.",
        env=("EG_AUTHORIZED_GROUPS",),
    )
    unauthorized_groups: list = setting(
        [],
        "Members of these groups may not launch kernels (a kernelspec's unauthorized_groups adds to it).",
        env=("EG_UNAUTHORIZED_GROUPS",),
    )
    max_kernels_per_user: int = setting(
        0,
        "Most kernels one user may have, launches in progress included (0 or -1: no limit).",
        env=("EG_MAX_KERNELS_PER_USER",),
        minimum=-1,
    )
    max_kernels_per_group: int = setting(
        0,
        "Most kernels the members of any one group may have together (0: no limit).",
        env=("EG_MAX_KERNELS_PER_GROUP",),
        minimum=0,
    )
    max_concurrent_launches_per_user: int = setting(
        0,
        "Most launches one user may have in progress at once; more are answered 429 with Retry-After "
        "(0: no limit).",
        env=("EG_MAX_CONCURRENT_LAUNCHES_PER_USER",),
        minimum=0,
    )
    require_profile: bool = setting(
        False,
        "Refuse (403) launches for which no profile is chosen and the user has no default profile.",
        env=("EG_REQUIRE_PROFILE",),
    )


@dataclass(frozen=True)
class OpsConfig:
    drain_retry_after: int = setting(
        30,
        "Seconds a draining gateway tells clients to wait (Retry-After) before asking again for a new kernel.",
        env=("EG_DRAIN_RETRY_AFTER",),
        minimum=1,
    )
    readiness_timeout: float = setting(
        2.0,
        "Seconds /readyz waits for the store to answer before calling the gateway not ready.",
        env=("EG_READINESS_TIMEOUT",),
        minimum=0.1,
    )
    log_format: str = setting(
        "text",
        "Main log format: text, or json (one object per line with time, level, namespace, message and "
        "the event's fields, e.g. kernel_id, user, launcher).",
        env=("EG_LOG_FORMAT",),
        choices=("text", "json"),
    )
    log_level: str = setting(
        "info",
        "Least severe level logged: debug, info, warn, error or critical.",
        env=("EG_LOG_LEVEL",),
        choices=("debug", "info", "warn", "error", "critical"),
    )
    log_file: str = setting(
        "",
        "Main log file, reopened on SIGHUP for logrotate (empty: twistd's --logfile, or standard output).",
        env=("EG_LOG_FILE",),
    )
    stall_warning: float = setting(
        1.0,
        "Log a warning with the reactor thread's stack when the reactor is blocked this many seconds or "
        "longer (nothing relayed, no request answered meanwhile); 0: off.",
        env=("EG_STALL_WARNING",),
        minimum=0.0,
    )
    turn_budget: float = setting(
        0.005,
        "Seconds of kernel traffic the reactor serves per turn before it runs its timers and polls again; "
        "the API's HTTP connections are served first in every turn. 0: Twisted's own turns (every ready "
        "connection at once, no precedence).",
        env=("EG_TURN_BUDGET",),
        minimum=0.0,
    )
    manhole_listen: str = setting(
        "",
        "Endpoint of the SSH manhole (a Python shell in the daemon for operators), loopback or unix: "
        "only, e.g. tcp:2222:interface=127.0.0.1 or unix:/run/egateway/manhole (empty: off).",
        env=("EG_MANHOLE_LISTEN",),
    )
    manhole_authorized_keys: str = setting(
        "",
        "authorized_keys file of the public keys allowed into the manhole (no passwords); required "
        "with manhole_listen.",
        env=("EG_MANHOLE_AUTHORIZED_KEYS",),
    )
    manhole_host_key: str = setting(
        "",
        "The manhole's SSH host key (PEM or OpenSSH private key); empty: manhole_host_key in the data "
        "directory, created on first use.",
        env=("EG_MANHOLE_HOST_KEY",),
    )


@dataclass(frozen=True)
class ProfileConfig:
    """
    One admin-defined profile: a C{[profiles.<name>]} table of the config
    file (profiles have no environment variables or flags).  The keys are
    checked here for type; L{egateway.kernels.profiles} checks the rest.
    """

    description: str = setting("", "One line shown to users by GET /api/profiles.")
    kernelspecs: list = setting([], "Kernelspecs the profile applies to (empty: every kernelspec).")
    users: list = setting([], "Users who may use the profile (users and groups both empty: everyone).")
    groups: list = setting([], "Groups whose members may use the profile.")
    default_for_users: list = setting([], "Users whose launches get this profile when they choose none.")
    default_for_groups: list = setting(
        [], "Groups whose members' launches get this profile when they choose none (user defaults first)."
    )
    env: dict = setting({}, "Environment forced on the kernel: a client may not set these names.")
    default_env: dict = setting(
        {}, "Environment defaults; a client may replace a KERNEL_* one only where overrides allows it."
    )
    cpus: int = setting(0, "CPUs requested: launcher config cpus (0: not set).", minimum=0)
    memory: str = setting("", "Memory requested, e.g. 4G: launcher config memory.")
    gpus: int = setting(0, "GPUs requested: launcher config gpus (0: not set).", minimum=0)
    remote_hosts: list = setting([], "SSH host pool: launcher config remote_hosts.")
    partition: str = setting("", "Slurm partition: launcher config partition.")
    account: str = setting("", "Slurm account: launcher config account.")
    qos: str = setting("", "Slurm QOS: launcher config qos.")
    time_limit: str = setting("", "Slurm time limit, e.g. 8:00:00: launcher config time_limit.")
    queue: str = setting("", "YARN queue: launcher config queue.")
    namespace: str = setting("", "Kubernetes namespace: launcher config namespace.")
    image: str = setting("", "Container image: launcher config image_name (one of allowed_images when that is set).")
    allowed_images: list = setting([], "Images a client may choose with KERNEL_IMAGE (empty: none).")
    launcher_config: dict = setting({}, "Other launcher config keys, merged over the kernelspec's.")
    max_kernels: int = setting(0, "Most kernels with this profile at once (0: no limit).", minimum=0)
    max_kernels_per_user: int = setting(
        0, "Most kernels with this profile one user may have (0: no limit).", minimum=0
    )
    overrides: dict = setting(
        {},
        "KERNEL_* names a client may set, each with its rule: {} (any value), min/max (numbers, or sizes "
        "such as \"16G\"), integer = true, values = [allow-list]. Other KERNEL_* names are refused.",
    )


@dataclass(frozen=True)
class PoolConfig:
    """
    One warm pool: a C{[pools.<name>]} table of the config file (pools have
    no environment variables or flags).  L{egateway.kernels.pools} checks
    the kernelspec and profile it names.
    """

    kernelspec: str = setting("", "Kernelspec the pool's kernels run (empty: the table's name).")
    profile: str = setting("", "Profile the pool's kernels are launched with (empty: none).")
    size: int = setting(
        0, "Kernels kept started ahead, ready to be bound to the next matching start request.", minimum=0
    )
    bindable_envs: list = setting(
        [],
        "KERNEL_* names besides KERNEL_USERNAME and KERNEL_WORKING_DIR that binding may apply to a pooled "
        "kernel (names the kernel only reads from its environment; a request setting any other is cold-started).",
    )


@dataclass(frozen=True)
class ImpersonationConfig:
    impersonation_enabled: bool = setting(
        False,
        "Run each kernel as its user's OS account: local kernels with the user's uid, groups and HOME (the "
        "gateway must run as root), SSH kernels through sudo_command or a login as the user, Slurm jobs "
        "submitted for the user; exported to kernels as EG_IMPERSONATION_ENABLED.",
        env=("EG_IMPERSONATION_ENABLED",),
    )
    prohibited_users: list = setting(
        ["root"],
        "Users kernels are never started as when impersonating (uid 0 and primary gid 0 are always refused).",
        env=("EG_PROHIBITED_USERS",),
    )
    min_uid: int = setting(
        1000,
        "Lowest uid a kernel may run as when impersonating; system accounts below it are refused.",
        env=("EG_MIN_UID",),
        minimum=0,
    )
    ssh_impersonation: str = setting(
        "sudo",
        "How SSH kernels run as their user: sudo (log in as remote_user and start through sudo_command) or "
        "login (log in as the user with ssh_user_key_file).",
        env=("EG_SSH_IMPERSONATION",),
        choices=("sudo", "login"),
    )
    sudo_command: str = setting(
        "sudo -n -H -E -u {user} --",
        "Command prefix (split like a shell would, never run by one) that runs what follows as {user}; the "
        "user name replaces {user} as one argument.",
        env=("EG_SUDO_COMMAND",),
    )
    ssh_user_key_file: str = setting(
        "~{user}/.ssh/id_ed25519",
        "Private key the gateway logs in to SSH hosts with as {user} when ssh_impersonation is login.",
        env=("EG_SSH_USER_KEY_FILE",),
    )
    impersonation_runtime_dir: str = setting(
        "/run/egateway/kernels",
        "Directory for impersonated local kernels' connection and output files (each owned by its user, mode "
        "0600); made root-owned with mode 0711, and every directory above it must be searchable by all.",
        env=("EG_IMPERSONATION_RUNTIME_DIR",),
    )


@dataclass(frozen=True)
class MetricsConfig:
    metrics_token: str = setting(
        "",
        "Token a Prometheus scraper presents (Authorization: Bearer) for GET /metrics on the main listener; "
        "the API's credentials do not open it (empty, with metrics_networks empty: no /metrics there).",
        env=("EG_METRICS_TOKEN",),
        secret=True,
    )
    metrics_networks: list = setting(
        [],
        "Addresses or CIDRs whose requests may read /metrics without metrics_token (the peer address, "
        "X-Forwarded-For is not believed).",
        env=("EG_METRICS_NETWORKS",),
    )
    metrics_listen: str = setting(
        "",
        "Endpoint string for a listener of its own serving only /metrics (e.g. tcp:9464:interface=127.0.0.1); "
        "metrics_token and metrics_networks apply there too when set (empty: none).",
        env=("EG_METRICS_LISTEN",),
    )
    metrics_users: int = setting(
        0,
        "Label the egateway_kernels gauge with the user for this many users with most kernels, the "
        "rest as user=\"(other)\" (0: no user label, the default; each user is a time series).",
        env=("EG_METRICS_USERS",),
        minimum=0,
        maximum=1000,
    )

    @property
    def on_main_listener(self) -> bool:
        """
        Whether the main listener serves C{/metrics}: only once the operator
        has said who may read it.
        """
        return bool(self.metrics_token or self.metrics_networks)

    @property
    def enabled(self) -> bool:
        return self.on_main_listener or bool(self.metrics_listen)


# -- Docker and Docker Swarm (issue 15): a self-contained block, easy to move --


@dataclass(frozen=True)
class DockerConfig:
    docker_host: str = setting(
        "unix:///var/run/docker.sock",
        "Docker engine socket the docker and docker-swarm launchers talk to (unix:///path only).",
        env=("EG_DOCKER_HOST", "DOCKER_HOST"),
    )
    docker_network: str = setting(
        "",
        "Docker network of kernel containers when the kernelspec names none (Enterprise Gateway's "
        "EG_DOCKER_NETWORK).",
        env=("EG_DOCKER_NETWORK",),
    )
    docker_mounts: str = setting(
        "",
        "Comma-separated /source:/target[:ro|rw] bind mounts of kernel containers whose kernelspec names none "
        "(read-only unless :rw).",
        env=("EG_DOCKER_MOUNTS",),
    )
    docker_max_cpus: str = setting(
        "4",
        "Most CPUs a client may ask for with KERNEL_CPUS (a kernelspec's max_cpus overrides).",
        env=("EG_DOCKER_MAX_CPUS",),
    )
    docker_max_memory: str = setting(
        "8G",
        "Most memory a client may ask for with KERNEL_MEMORY, e.g. 8G (a kernelspec's max_memory overrides).",
        env=("EG_DOCKER_MAX_MEMORY",),
    )
    docker_max_gpus: str = setting(
        "0",
        "Most GPUs a client may ask for with KERNEL_GPUS (a kernelspec's max_gpus overrides).",
        env=("EG_DOCKER_MAX_GPUS",),
    )
    docker_name_prefix: str = setting(
        "egateway-",
        "Kernel containers and Swarm services are named this prefix followed by the kernel id.",
        env=("EG_DOCKER_NAME_PREFIX",),
    )
    docker_poll_interval: float = setting(
        0.5,
        "Seconds between checks while a container or Swarm task starts (deaths come from the event stream).",
        env=("EG_DOCKER_POLL_INTERVAL",),
        minimum=0.05,
    )


# -- IBM Spectrum Conductor (issue 14 item 7): a self-contained block, easy to move --


@dataclass(frozen=True)
class ConductorConfig:
    conductor_endpoint: str = setting(
        "",
        "Conductor REST base URL the conductor launcher asks for applications and kills drivers at "
        "({endpoint}/v1/applications, {endpoint}/v1/submissions/kill/<driver>); a kernelspec's "
        "conductor_endpoint overrides.",
        env=("EG_CONDUCTOR_ENDPOINT",),
    )
    conductor_master_rest: str = setting(
        "",
        "Spark master REST URL of the Conductor instance group that kernel drivers are submitted to "
        "({url}/v1/submissions/create; Enterprise Gateway's KERNEL_NOTEBOOK_MASTER_REST, which clients may not "
        "set here); empty: conductor_endpoint. A kernelspec's master_rest overrides.",
        env=("EG_CONDUCTOR_MASTER_REST",),
    )
    conductor_credential: str = setting(
        "",
        "Conductor service credential sent as 'Authorization: PlatformToken token=...' (Enterprise Gateway's "
        "EGO_SERVICE_CREDENTIAL).",
        env=("EGO_SERVICE_CREDENTIAL", "EG_CONDUCTOR_CREDENTIAL"),
        secret=True,
    )
    conductor_poll_interval: float = setting(
        1.0,
        "Seconds between Conductor application queries while a kernel starts.",
        env=("EG_CONDUCTOR_POLL_INTERVAL",),
        minimum=0.05,
    )


# -- Hadoop YARN (issue 14): a self-contained block, easy to move --


@dataclass(frozen=True)
class YarnConfig:
    yarn_endpoint: str = setting(
        "",
        "The ResourceManager's web address (http://rm:8088, or Enterprise Gateway's http://rm:8088/ws/v1/cluster "
        "form); empty: yarn.resourcemanager.webapp.address from yarn-site.xml in HADOOP_CONF_DIR.",
        env=("EG_YARN_ENDPOINT",),
    )
    alt_yarn_endpoint: str = setting(
        "",
        "The second ResourceManager of an HA pair; the yarn launcher follows whichever is active.",
        env=("EG_ALT_YARN_ENDPOINT",),
    )
    yarn_spark_home: str = setting(
        "",
        "Spark installation whose bin/spark-submit submits kernels (empty: the kernel's SPARK_HOME, else "
        "spark-submit on the gateway's PATH).",
        env=("EG_YARN_SPARK_HOME",),
    )
    yarn_am_wait_time: str = setting(
        "3600s",
        "spark.yarn.am.waitTime of kernel applications: how long the ApplicationMaster waits for a Spark "
        "context before failing the kernel (other launchers than launch_ipykernel.py in mode none never create one).",
        env=("EG_YARN_AM_WAIT_TIME",),
    )
    yarn_poll_interval: float = setting(
        1.0,
        "Seconds between the ResourceManager queries that follow every kernel application (one query for all).",
        env=("EG_YARN_POLL_INTERVAL",),
        minimum=0.05,
    )


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    culling: CullingConfig = field(default_factory=CullingConfig)
    response: ResponseConfig = field(default_factory=ResponseConfig)
    ssh: SSHConfig = field(default_factory=SSHConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    docker: DockerConfig = field(default_factory=DockerConfig)
    kubernetes: KubernetesConfig = field(default_factory=KubernetesConfig)
    conductor: ConductorConfig = field(default_factory=ConductorConfig)
    yarn: YarnConfig = field(default_factory=YarnConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    impersonation: ImpersonationConfig = field(default_factory=ImpersonationConfig)
    tenancy: TenancyConfig = field(default_factory=TenancyConfig)
    ops: OpsConfig = field(default_factory=OpsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    profiles: dict = field(default_factory=dict, hash=False, metadata={"tables": ProfileConfig})
    """
    The C{[profiles.<name>]} tables: L{ProfileConfig}s by name.
    """
    pools: dict = field(default_factory=dict, hash=False, metadata={"tables": PoolConfig})
    """
    The C{[pools.<name>]} tables: L{PoolConfig}s by name (see
    L{egateway.kernels.pools}).
    """

    @property
    def listen_endpoint(self) -> str:
        """
        The endpoint description to listen on: C{EG_IP}/C{EG_PORT} style
        settings, when given, build a TCP endpoint; otherwise C{listen}.
        """
        server = self.server
        if server.port or server.ip:
            if server.listen != _default_of(ServerConfig, "listen"):
                return server.listen
            ip = server.ip or "127.0.0.1"
            port = server.port or 8888
            return f"tcp:{port}:interface={ip.replace(':', chr(92) + ':')}"
        return server.listen


@dataclass(frozen=True)
class SettingInfo:
    """
    Everything known about one leaf setting, for loaders and docs.
    """

    section: str
    name: str
    kind: type
    default: Any
    help: str
    env: tuple[str, ...]
    minimum: float | None
    maximum: float | None
    secret: bool
    choices: tuple[str, ...] | None = None

    @property
    def key(self) -> str:
        return f"{self.section}.{self.name}"

    @property
    def flag(self) -> str:
        return self.name.replace("_", "-")


_SECTIONS: dict[str, type] = {
    f.name: f.default_factory  # type: ignore[misc]
    for f in dataclasses.fields(Config)
    if "tables" not in f.metadata
}

_TABLES: dict[str, type] = {
    f.name: f.metadata["tables"] for f in dataclasses.fields(Config) if "tables" in f.metadata
}
"""
Sections that hold a table of tables (C{[profiles.<name>]}), each table
one dataclass.
"""

_KINDS = {"str": str, "int": int, "float": float, "bool": bool, "list": list, "dict": dict}


def _default_of(section: type, name: str) -> Any:
    for f in dataclasses.fields(section):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            return f.default_factory()  # type: ignore[misc]
    raise KeyError(name)


def settings() -> Iterator[SettingInfo]:
    """
    Every leaf setting, in declaration order.
    """
    for section_name, section in _SECTIONS.items():
        yield from _leaves(section_name, section)


def table_settings(table: str) -> Iterator[SettingInfo]:
    """
    The keys of each table of a table-of-tables section (C{profiles}), with
    C{section} the section's name.
    """
    yield from _leaves(table, _TABLES[table])


def _leaves(section_name: str, section: type) -> Iterator[SettingInfo]:
    for f in dataclasses.fields(section):
        kind = f.type if isinstance(f.type, type) else _KINDS[str(f.type)]
        yield SettingInfo(
            section=section_name,
            name=f.name,
            kind=kind,
            default=_default_of(section, f.name),
            help=f.metadata["help"],
            env=f.metadata["env"],
            minimum=f.metadata.get("minimum"),
            maximum=f.metadata.get("maximum"),
            secret=f.metadata.get("secret", False),
            choices=f.metadata.get("choices"),
        )
