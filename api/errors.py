"""Error answers: every failure is a JSON body `{"error": {"code", "message", ...}}`."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

import structlog
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from api.contract import ErrorBody, ErrorObject, encode
from timerd.errors import StoreUnavailable, TimerNotFound, TimerStateConflict

log = structlog.get_logger("timerd.api")


class ApiError(Exception):
    """A client mistake, answered with `status` and a code a program can match on."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        **details: Any,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers
        self.details = details


def error_response(
    status: int,
    code: str,
    message: str,
    headers: Mapping[str, str] | None = None,
    **details: Any,
) -> Response:
    """The one shape of every error body (`api.contract.ErrorBody`)."""
    body = ErrorBody(ErrorObject(code, message, **details))
    return Response(encode(body), status, headers, media_type="application/json")


def error_object(exc: ApiError) -> ErrorObject:
    """The error object of `exc`, as an error body or a batch item holds it."""
    return ErrorObject(exc.code, exc.message, **exc.details)


async def on_api_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message, exc.headers, **exc.details)


async def on_not_found(_: Request, exc: Exception) -> Response:
    return error_response(404, "not_found", "no timer with this id")


async def on_conflict(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, TimerStateConflict)
    return error_response(409, "state_conflict", f"the timer is {exc.state}", state=exc.state)


async def on_store_unavailable(_: Request, exc: Exception) -> Response:
    log.warning("store_unavailable", error=str(exc))
    return error_response(
        503, "store_unavailable", "the store is unavailable; try again", {"Retry-After": "1"}
    )


async def on_http_exception(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail), headers=exc.headers)


CLIENT_CLOSED_REQUEST = 499  # nginx's name for it: counted apart from the server's own errors


async def on_client_disconnect(request: Request, _: Exception) -> Response:
    """The client went away before its request was read: not a server error. The answer is
    never sent (there is no one to send it to); it only labels the request in the metrics."""
    log.debug("client_disconnected", path=request.url.path)
    return Response(status_code=CLIENT_CLOSED_REQUEST)


async def on_unexpected(request: Request, exc: Exception) -> Response:
    request_id = uuid.uuid4().hex
    log.error("unexpected_error", request_id=request_id, path=request.url.path, exc_info=exc)
    return error_response(500, "internal", "unexpected error", request_id=request_id)


EXCEPTION_HANDLERS = {
    ApiError: on_api_error,
    TimerNotFound: on_not_found,
    TimerStateConflict: on_conflict,
    StoreUnavailable: on_store_unavailable,
    HTTPException: on_http_exception,
    ClientDisconnect: on_client_disconnect,
    Exception: on_unexpected,
}
