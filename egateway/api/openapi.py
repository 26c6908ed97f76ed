"""
The OpenAPI 3 document of the REST API, served at C{/api/openapi.json}
(and C{/api/swagger.json} for tools that look there).

A test walks the Klein routes and this document and fails if either has a
route the other lacks, so the document cannot drift from the code.
"""

from __future__ import annotations

from typing import Any

from egateway import __version__

UUID_PATTERN = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


_AUTH = {
    "401": _error("Missing or invalid token"),
    "429": {
        **_error("Too many failed authentications from this address (auth_failure_limit)"),
        "headers": {"Retry-After": {"schema": {"type": "integer"}}},
    },
}
_KERNEL_ID = {
    "name": "kernel_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": UUID_PATTERN},
}
_SESSION_ID = {**_KERNEL_ID, "name": "session_id"}
_USER_QUERY = {
    "name": "user",
    "in": "query",
    "required": False,
    "description": "Show what this user may use: honoured for callers without a verified user "
    "(Enterprise Gateway's advisory filter) and for admins",
    "schema": {"type": "string"},
}
_HIDDEN = {
    "403": _error("Another user's kernel, when hide_kernels is off"),
    "404": _error("No such kernel, or another user's (hide_kernels)"),
}


def openapi_document(base_url: str = "/", metrics: bool = False) -> dict[str, Any]:
    """
    @param metrics: whether C{/metrics} is served (behind its own token).
    """
    b = base_url.rstrip("/")
    paths: dict[str, Any] = {
        f"{b}/api": {
            "get": {
                "summary": "Versions of the API and the gateway",
                "responses": {
                    "200": _json(
                        "Versions",
                        {
                            "type": "object",
                            "properties": {
                                "version": {"type": "string"},
                                "gateway_version": {"type": "string"},
                            },
                        },
                    ),
                    **_AUTH,
                },
            }
        },
        f"{b}/api/openapi.json": {
            "get": {
                "summary": "This document",
                "responses": {"200": _json("OpenAPI document", {"type": "object"}), **_AUTH},
            }
        },
        f"{b}/api/swagger.json": {
            "get": {
                "summary": "This document, where Enterprise Gateway serves its own",
                "responses": {"200": _json("OpenAPI document", {"type": "object"}), **_AUTH},
            }
        },
        f"{b}/api/kernelspecs": {
            "get": {
                "summary": "Kernelspecs the caller may launch",
                "parameters": [_USER_QUERY],
                "responses": {
                    "200": _json(
                        "Kernelspecs by name, and the default",
                        {
                            "type": "object",
                            "required": ["default", "kernelspecs"],
                            "properties": {
                                "default": {"type": "string"},
                                "kernelspecs": {
                                    "type": "object",
                                    "additionalProperties": _ref("KernelSpec"),
                                },
                            },
                        },
                    ),
                    **_AUTH,
                },
            }
        },
        f"{b}/api/kernelspecs/{{name}}": {
            "get": {
                "summary": "One kernelspec",
                "parameters": [
                    {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
                    _USER_QUERY,
                ],
                "responses": {
                    "200": _json("The kernelspec", _ref("KernelSpec")),
                    "404": _error("No such kernelspec, or one the caller may not launch"),
                    **_AUTH,
                },
            }
        },
        f"{b}/kernelspecs/{{name}}/{{resource}}": {
            "get": {
                "summary": "A kernelspec resource (logo, kernel.js)",
                "parameters": [
                    {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
                    {
                        "name": "resource",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                    },
                ],
                "responses": {
                    "200": {"description": "The file", "content": {"*/*": {}}},
                    "404": _error("No such kernelspec or resource"),
                    **_AUTH,
                },
            }
        },
        f"{b}/api/kernels": {
            "get": {
                "summary": "The kernels the caller may see (when listing is enabled): their own, those "
                "shared with them; an admin's: all",
                "responses": {
                    "200": _json("Kernel models", {"type": "array", "items": _ref("Kernel")}),
                    "403": _error("Listing is disabled"),
                    **_AUTH,
                },
            },
            "post": {
                "summary": "Start a kernel; answers once it is ready",
                "requestBody": {
                    "required": False,
                    "content": {"application/json": {"schema": _ref("KernelStart")}},
                },
                "responses": {
                    "201": _json("The started kernel", _ref("Kernel")),
                    "400": _error(
                        "Malformed body or environment; an unknown profile or one not for this kernelspec; "
                        "a KERNEL_* value the profile refuses (the message names the key and the rule)"
                    ),
                    "403": _error(
                        "A kernel limit or quota is reached, the user may not launch this kernelspec or use "
                        "this profile, or a profile is required (the message names the rule or limit); a "
                        "user who is not an admin chose KERNEL_ID while hide_kernels is on"
                    ),
                    "404": _error("No such kernelspec"),
                    "409": _error("KERNEL_ID names an existing kernel"),
                    "500": _error("The launch failed; message names the cause and phase"),
                    "501": _error(
                        "The kernelspec asks for a launcher this gateway does not have (e.g. an Enterprise "
                        "Gateway process proxy class); the message names it"
                    ),
                    "504": _error("The launch timed out; message names the phase"),
                    **_AUTH,
                    "429": {
                        **_error(
                            "Too many launches in progress for this user (max_concurrent_launches_per_user), "
                            "or too many failed authentications from this address"
                        ),
                        "headers": {"Retry-After": {"schema": {"type": "integer"}}},
                    },
                },
            },
        },
        f"{b}/api/kernels/{{kernel_id}}": {
            "parameters": [_KERNEL_ID],
            "get": {
                "summary": "One kernel",
                "responses": {
                    "200": _json("The kernel", _ref("Kernel")),
                    **_HIDDEN,
                    **_AUTH,
                },
            },
            "delete": {
                "summary": "Shut a kernel down",
                "responses": {
                    "204": {"description": "Shut down"},
                    **_HIDDEN,
                    **_AUTH,
                },
            },
        },
        f"{b}/api/kernels/{{kernel_id}}/acl": {
            "parameters": [_KERNEL_ID],
            "put": {
                "summary": "Share a kernel: replace the users and groups (besides its owner and admins) who may "
                "see, connect to, interrupt, restart and shut it down. Its owner or an admin only.",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("Acl")}},
                },
                "responses": {
                    "200": _json("The kernel, with its new ACL", _ref("Kernel")),
                    "400": _error("Malformed ACL"),
                    "403": _error("The caller is not the kernel's owner or an admin"),
                    "404": _error("No such kernel, or another user's (hide_kernels)"),
                    **_AUTH,
                },
            },
        },
        f"{b}/api/profiles": {
            "get": {
                "summary": "The profiles the caller may use: kernelspecs, what a client may override, limits",
                "parameters": [_USER_QUERY],
                "responses": {
                    "200": _json(
                        "Profiles",
                        {
                            "type": "object",
                            "required": ["require_profile", "profiles"],
                            "properties": {
                                "require_profile": {"type": "boolean"},
                                "profiles": {"type": "array", "items": _ref("Profile")},
                            },
                        },
                    ),
                    **_AUTH,
                },
            },
        },
        f"{b}/api/kernels/{{kernel_id}}/interrupt": {
            "parameters": [_KERNEL_ID],
            "post": {
                "summary": "Interrupt a kernel",
                "responses": {
                    "204": {"description": "Interrupted"},
                    **_HIDDEN,
                    "409": _error("The kernel is not running"),
                    **_AUTH,
                },
            },
        },
        f"{b}/api/kernels/{{kernel_id}}/restart": {
            "parameters": [_KERNEL_ID],
            "post": {
                "summary": "Restart a kernel, keeping its id and its clients",
                "responses": {
                    "200": _json("The restarted kernel", _ref("Kernel")),
                    **_HIDDEN,
                    "409": _error("The kernel is shutting down"),
                    "500": _error("The relaunch failed"),
                    "504": _error("The relaunch timed out"),
                    **_AUTH,
                },
            },
        },
        f"{b}/api/kernels/{{kernel_id}}/channels": {
            "parameters": [
                _KERNEL_ID,
                {"name": "session_id", "in": "query", "required": False, "schema": {"type": "string"}},
                {
                    "name": "resume_after",
                    "in": "query",
                    "required": False,
                    "description": "Resume the session after this message number (a reconnecting client)",
                    "schema": {"type": "integer"},
                },
            ],
            "get": {
                "summary": "The kernel's channels over WebSocket (legacy JSON or "
                "v1.kernel.websocket.jupyter.org)",
                "responses": {
                    "101": {"description": "Switching to WebSocket"},
                    "400": _error("Not a WebSocket upgrade, or resume_after is not a number"),
                    "403": _error(
                        "Origin not allowed, another user's kernel when hide_kernels is off, or session_id names "
                        "another user's session"
                    ),
                    "404": _error("No such kernel, or another user's (hide_kernels)"),
                    **_AUTH,
                },
            },
        },
        f"{b}/api/sessions": {
            "get": {
                "summary": "Sessions (when listing is enabled)",
                "responses": {
                    "200": _json("Session models", {"type": "array", "items": _ref("Session")}),
                    "403": _error("Listing is disabled"),
                    **_AUTH,
                },
            },
            "post": {
                "summary": "Create a session (or return the one for that path)",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("SessionCreate")}},
                },
                "responses": {
                    "201": _json("The session", _ref("Session")),
                    "400": _error("Malformed body"),
                    "403": _error("A kernel limit is reached"),
                    "404": _error("No such kernel or kernelspec"),
                    "500": _error("The launch failed"),
                    "501": _error("The kernelspec asks for a launcher this gateway does not have"),
                    "504": _error("The launch timed out"),
                    **_AUTH,
                },
            },
        },
        f"{b}/api/sessions/{{session_id}}": {
            "parameters": [_SESSION_ID],
            "get": {
                "summary": "One session",
                "responses": {
                    "200": _json("The session", _ref("Session")),
                    "403": _error("Another user's session, when hide_kernels is off"),
                    "404": _error("No such session, or another user's (hide_kernels)"),
                    **_AUTH,
                },
            },
            "patch": {
                "summary": "Rename a session or change its kernel",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("SessionUpdate")}},
                },
                "responses": {
                    "200": _json("The session", _ref("Session")),
                    "400": _error("Malformed body"),
                    "403": _error("A kernel limit is reached"),
                    "404": _error("No such session, kernel or kernelspec"),
                    "500": _error("The launch failed"),
                    "501": _error("The kernelspec asks for a launcher this gateway does not have"),
                    "504": _error("The launch timed out"),
                    **_AUTH,
                },
            },
            "delete": {
                "summary": "Delete a session and shut its kernel down",
                "responses": {
                    "204": {"description": "Deleted"},
                    "403": _error("Another user's session, when hide_kernels is off"),
                    "404": _error("No such session, or another user's (hide_kernels)"),
                    **_AUTH,
                },
            },
        },
    }
    paths.update(_admin_paths(b))
    paths.update(_operations_paths(b))
    for path, method in ((f"{b}/api/kernels", "post"), (f"{b}/api/sessions", "post")):
        paths[path][method]["responses"]["503"] = _DRAINING
    if metrics:
        paths[f"{b}/metrics"] = _METRICS
    return {
        "openapi": "3.0.3",
        "info": {"title": "egateway", "version": __version__},
        "components": {
            "securitySchemes": {
                "token": {"type": "apiKey", "in": "header", "name": "Authorization"},
                **({"metricsToken": {"type": "http", "scheme": "bearer"}} if metrics else {}),
            },
            "schemas": _SCHEMAS,
        },
        "security": [{"token": []}],
        "paths": paths,
    }


_NOT_ADMIN = {"403": _error("The caller is a user who is not an admin (admin_users, admin_groups)")}


def _admin_action(summary: str, ok: dict[str, Any], *extra: tuple[str, str]) -> dict[str, Any]:
    return {
        "parameters": [_KERNEL_ID],
        "post": {
            "summary": summary,
            "parameters": [_DASHBOARD_HEADER],
            "responses": {
                **ok,
                **_NOT_ADMIN,
                "404": _error("No such kernel"),
                **{code: _error(text) for code, text in extra},
                **_AUTH,
            },
        },
    }


_DASHBOARD_HEADER = {
    "name": "X-Egateway-Dashboard",
    "in": "header",
    "required": False,
    "description": "Required when the request is authenticated by the dashboard's cookie (set by GET /admin?token=)",
    "schema": {"type": "string"},
}


def _admin_paths(b: str) -> dict[str, Any]:
    """
    The admin dashboard's page and routes (L{egateway.ops.dashboard}).
    """
    text = {"type": "string"}
    return {
        f"{b}/admin": {
            "get": {
                "summary": "The admin dashboard (a web page); ?token= on the first load sets its cookie",
                "parameters": [{"name": "token", "in": "query", "required": False, "schema": text}],
                "responses": {
                    "200": {"description": "The page", "content": {"text/html": {"schema": text}}},
                    **_NOT_ADMIN,
                    **_AUTH,
                },
            }
        },
        f"{b}/admin/static/{{name}}": {
            "parameters": [{"name": "name", "in": "path", "required": True, "schema": text}],
            "get": {
                "summary": "The dashboard's script and style sheet",
                "responses": {
                    "200": {
                        "description": "The file",
                        "content": {"text/css": {"schema": text}, "text/javascript": {"schema": text}},
                    },
                    **_NOT_ADMIN,
                    "404": _error("No such file"),
                    **_AUTH,
                },
            },
        },
        f"{b}/api/admin/overview": {
            "get": {
                "summary": "Everything the dashboard shows: kernels, users and quotas, hosts, the store",
                "responses": {
                    "200": _json(
                        "The overview",
                        {
                            "type": "object",
                            "required": ["gateway", "quotas", "users", "groups", "hosts", "store", "kernels"],
                            "properties": {
                                "gateway": {"type": "object"},
                                "quotas": {"type": "object"},
                                "users": {"type": "array", "items": {"type": "object"}},
                                "groups": {"type": "array", "items": {"type": "object"}},
                                "hosts": {"type": "array", "items": {"type": "object"}},
                                "store": {"type": "object"},
                                "kernels": {"type": "array", "items": _ref("Kernel")},
                            },
                        },
                    ),
                    **_NOT_ADMIN,
                    **_AUTH,
                },
            }
        },
        f"{b}/api/admin/events": {
            "get": {
                "summary": "Live updates as Server-Sent Events: kernel (a kernel's model), removed ({id}), "
                "summary (the overview without kernels); needs Accept: text/event-stream",
                "responses": {
                    "200": {"description": "The event stream", "content": {"text/event-stream": {"schema": text}}},
                    **_NOT_ADMIN,
                    "406": _error("The request does not accept text/event-stream"),
                    **_AUTH,
                },
            }
        },
        f"{b}/api/admin/cull": {
            "post": {
                "summary": "Run one culling pass now (with culling off: dead kernels only)",
                "parameters": [_DASHBOARD_HEADER],
                "responses": {
                    "200": _json(
                        "How many kernels were culled",
                        {"type": "object", "required": ["culled"], "properties": {"culled": {"type": "integer"}}},
                    ),
                    **_NOT_ADMIN,
                    **_AUTH,
                },
            }
        },
        f"{b}/api/admin/kernels/{{kernel_id}}/interrupt": _admin_action(
            "Interrupt any user's kernel", {"204": {"description": "Interrupted"}}, ("409", "The kernel is not running")
        ),
        f"{b}/api/admin/kernels/{{kernel_id}}/restart": _admin_action(
            "Restart any user's kernel",
            {"200": _json("The restarted kernel", _ref("Kernel"))},
            ("409", "The kernel is shutting down"),
            ("500", "The relaunch failed"),
            ("504", "The relaunch timed out"),
        ),
        f"{b}/api/admin/kernels/{{kernel_id}}/shutdown": _admin_action(
            "Shut down any user's kernel", {"204": {"description": "Shut down"}}
        ),
    }


_DRAINING = {
    **_error("The gateway is draining and starts no new kernels (or is not ready)"),
    "headers": {"Retry-After": {"schema": {"type": "integer"}}},
}
_STATUS = {"type": "object", "properties": {"status": {"type": "string"}}}
_DRAIN_STATE = {"type": "object", "properties": {"draining": {"type": "boolean"}}}


def _operations_paths(b: str) -> dict[str, Any]:
    """
    Health probes (no authentication) and the administrators' drain switch.
    """
    admin = {"403": _error("The caller is not an administrator"), **_AUTH}
    drain_state = _json("Whether the gateway is draining", _DRAIN_STATE)
    return {
        f"{b}/healthz": {
            "get": {
                "summary": "Liveness: the process runs and serves requests (no authentication)",
                "security": [],
                "responses": {"200": _json("Alive", _STATUS)},
            }
        },
        f"{b}/readyz": {
            "get": {
                "summary": "Readiness: store reachable, listener up, not draining (no authentication)",
                "security": [],
                "responses": {"200": _json("Ready", _STATUS), "503": _DRAINING},
            }
        },
        f"{b}/api/admin/drain": {
            "get": {"summary": "Whether the gateway is draining", "responses": {"200": drain_state, **admin}},
            "post": {
                "summary": "Drain: refuse new kernels (503), keep serving existing ones; /readyz turns 503",
                "responses": {"200": drain_state, **admin},
            },
            "delete": {"summary": "End the drain: admit new kernels again", "responses": {"200": drain_state, **admin}},
        },
        f"{b}/api/admin/undrain": {
            "post": {"summary": "End the drain (as DELETE /api/admin/drain)", "responses": {"200": drain_state, **admin}},
        },
    }


_METRICS = {
    "get": {
        "summary": "Prometheus metrics (text format); needs metrics_token or an address in metrics_networks, "
        "not the API's credentials",
        "security": [{"metricsToken": []}],
        "responses": {
            "200": {"description": "Metrics", "content": {"text/plain": {"schema": {"type": "string"}}}},
            "401": _error("Missing or invalid metrics token"),
            "403": _error("The address is not in metrics_networks and no metrics token is configured"),
        },
    }
}


_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["reason", "message"],
        "properties": {"reason": {"type": "string"}, "message": {"type": "string"}},
    },
    "KernelSpec": {
        "type": "object",
        "required": ["name", "spec", "resources"],
        "properties": {
            "name": {"type": "string"},
            "spec": {
                "type": "object",
                "properties": {
                    "argv": {"type": "array", "items": {"type": "string"}},
                    "env": {"type": "object", "additionalProperties": {"type": "string"}},
                    "display_name": {"type": "string"},
                    "language": {"type": "string"},
                    "interrupt_mode": {"type": "string", "enum": ["signal", "message"]},
                    "metadata": {"type": "object"},
                },
            },
            "resources": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    },
    "Kernel": {
        "type": "object",
        "required": ["id", "name", "last_activity", "execution_state", "connections"],
        "properties": {
            "id": {"type": "string", "pattern": UUID_PATTERN},
            "name": {"type": "string"},
            "last_activity": {"type": "string", "format": "date-time"},
            "execution_state": {"type": "string"},
            "connections": {"type": "integer", "minimum": 0},
            "started": {"type": "string", "format": "date-time"},
            "state": {"type": "string"},
            "username": {"type": "string"},
            "owner": {"type": "string"},
            "acl": _ref("Acl"),
            "profile": {"type": "string", "nullable": True},
            "launcher": {"type": "string"},
            "restarts": {"type": "integer", "minimum": 0},
            "pool": {"type": "string", "description": "The warm pool the kernel was started in, if any."},
            "pooled": {
                "type": "boolean",
                "description": "Still waiting in its pool, bound to no user (only admins' views show these).",
            },
            "phases": {"type": "array", "items": {"type": "object"}},
            "placement": {"type": "object"},
            "encrypted": {"type": "boolean", "description": "Whether the kernel's channels use CurveZMQ."},
            "encryption_reason": {
                "type": "string",
                "description": "Why the kernel's channels are not encrypted (only when encrypted is false).",
            },
            "reason": {"type": "string"},
        },
    },
    "Acl": {
        "type": "object",
        "properties": {
            "users": {"type": "array", "items": {"type": "string"}, "maxItems": 256},
            "groups": {"type": "array", "items": {"type": "string"}, "maxItems": 256},
        },
        "additionalProperties": False,
    },
    "Profile": {
        "type": "object",
        "required": ["name", "kernelspecs", "overrides", "limits"],
        "properties": {
            "name": {"type": "string"},
            "description": {"type": "string"},
            "kernelspecs": {"type": "array", "items": {"type": "string"}},
            "default": {"type": "boolean"},
            "overrides": {
                "type": "object",
                "description": "KERNEL_* names a client may set, each with its rule (min, max, integer, values)",
                "additionalProperties": {"type": "object"},
            },
            "fixed": {"type": "array", "items": {"type": "string"}},
            "defaults": {"type": "object", "additionalProperties": {"type": "string"}},
            "resources": {"type": "object"},
            "limits": {"type": "object", "additionalProperties": {"type": "integer"}},
        },
    },
    "KernelStart": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "profile": {"type": "string", "description": "A profile (GET /api/profiles); or KERNEL_PROFILE in env"},
            "env": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 4096}},
        },
    },
    "Session": {
        "type": "object",
        "required": ["id", "path", "name", "type", "kernel"],
        "properties": {
            "id": {"type": "string"},
            "path": {"type": "string"},
            "name": {"type": "string"},
            "type": {"type": "string"},
            "kernel": _ref("Kernel"),
            "notebook": {"type": "object"},
        },
    },
    "SessionCreate": {
        "type": "object",
        "required": ["path", "type"],
        "properties": {
            "path": {"type": "string", "minLength": 1},
            "name": {"type": "string"},
            "type": {"type": "string", "minLength": 1},
            "kernel": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "id": {"type": "string"}, "profile": {"type": "string"}},
            },
        },
    },
    "SessionUpdate": {
        "type": "object",
        "properties": {
            "path": {"type": "string"},
            "name": {"type": "string"},
            "type": {"type": "string"},
            "kernel": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "id": {"type": "string"}, "profile": {"type": "string"}},
            },
        },
    },
}
