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
                        "this profile, or a profile is required (the message names the rule or limit)"
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
                    "403": _error("Origin not allowed, or another user's kernel when hide_kernels is off"),
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
            "phases": {"type": "array", "items": {"type": "object"}},
            "placement": {"type": "object"},
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
