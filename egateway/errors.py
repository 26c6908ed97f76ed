"""
Errors that carry the HTTP status a client should see.

Every layer raises these (or subclasses); the API turns any of them into a
JSON C{{"reason", "message"}} response with that status.  The message is for
the person reading it: it says what happened and, where it can, what to do.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from twisted.web.iweb import IRequest

JSON = b"application/json"


class GatewayError(Exception):
    status: int = 500

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status

    @property
    def message(self) -> str:
        return str(self)

    @property
    def reason(self) -> str:
        try:
            return HTTPStatus(self.status).phrase
        except ValueError:
            return "Error"


class BadRequest(GatewayError):
    status = 400


class Unauthorized(GatewayError):
    status = 401


class Forbidden(GatewayError):
    status = 403


class NotFound(GatewayError):
    status = 404


class Conflict(GatewayError):
    status = 409


class LimitReached(Forbidden):
    pass


class Unavailable(GatewayError):
    status = 503


class TooManyRequests(GatewayError):
    """
    A rate limit refused the request; C{retry_after} is how many whole
    seconds the client should wait (sent as C{Retry-After}).
    """

    status = 429

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def write_json(request: IRequest, value: Any, status: int = 200) -> bytes:
    """
    C{value} as the JSON body of a response with C{status}: how the API
    and the operator views (L{egateway.ops}) answer.
    """
    request.setResponseCode(status)
    request.setHeader(b"content-type", JSON)
    return json.dumps(value).encode("utf-8")


def error_body(request: IRequest, status: int, reason: str, message: str) -> bytes:
    return write_json(request, {"reason": reason, "message": message}, status)


def write_error(request: IRequest, error: GatewayError) -> bytes:
    return error_body(request, error.status, error.reason, error.message)
