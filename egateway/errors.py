"""
Errors that carry the HTTP status a client should see.

Every layer raises these (or subclasses); the API turns any of them into a
JSON C{{"reason", "message"}} response with that status.  The message is for
the person reading it: it says what happened and, where it can, what to do.
"""

from __future__ import annotations

from http import HTTPStatus


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
