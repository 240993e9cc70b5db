"""Errors as OpenAI sends them: ``{"error": {"message", "type", "param", "code"}}``.

Every failure, expected or not, leaves the gateway in this shape; no stack trace reaches a client.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from loragate.registry import Conflict, Forbidden, GateRefused, NotFound, RegistryError

from .keys import retry_after_header
from .openai_types import ErrorResponse

log = logging.getLogger("loragate.gateway")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 405: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error", 502: "api_error", 503: "service_unavailable", 504: "timeout"}


class GatewayError(Exception):
    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}


# Retry-After for what is down or restarting (an engine, the database): a client or balancer may come back shortly.
RETRY_DOWN_S = 5

# The error responses every route declares in the OpenAPI schema.
OPENAI_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 413, 429, 502, 503, 504)}


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "api_error"), "param": param, "code": code}}


def error_response(error: GatewayError) -> JSONResponse:
    return JSONResponse(error_body(error.status, error.message, error.code, error.param), status_code=error.status,
                        headers=error.headers)


def registry_status(exc: RegistryError) -> int:
    """The HTTP status of a registry refusal, for the API and the console alike."""
    return (404 if isinstance(exc, NotFound) else 409 if isinstance(exc, Conflict | GateRefused)
            else 403 if isinstance(exc, Forbidden) else 400)


def validation_problem(exc: RequestValidationError, skip: tuple[str, ...] = ("body",)) -> tuple[str, str | None]:
    """The first thing wrong with a request, as a message naming its field, and the field."""
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":  # its location is a character position, not a parameter
        position = first["loc"][-1] if first.get("loc") else "?"
        reason = (first.get("ctx") or {}).get("error", "invalid")
        return f"the body is not valid JSON ({reason} at character {position})", None
    param = ".".join(str(p) for p in first.get("loc", ()) if p not in skip) or None
    return (f"{param}: {first['msg']}" if param else str(first["msg"])), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RegistryError)
    async def _registry(_: Request, exc: RegistryError) -> JSONResponse:
        return error_response(GatewayError(registry_status(exc), str(exc), code=type(exc).__name__))

    @app.exception_handler(GatewayError)
    async def _gateway(_: Request, exc: GatewayError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_problem(exc)
        return error_response(GatewayError(400, message, code="invalid_request", param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(GatewayError(exc.status_code, str(exc.detail)))

    @app.exception_handler(OperationalError)
    async def _database_down(_: Request, exc: OperationalError) -> JSONResponse:
        # What no cache can answer while the database is away (routes not seen yet, feedback, admin):
        # a client or balancer may come back shortly.
        log.warning("the database is unavailable: %s", exc.orig)
        return error_response(GatewayError(503, "the database is unavailable; try again shortly",
                                           code="database_unavailable", headers=retry_after_header(RETRY_DOWN_S)))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(GatewayError(500, "internal error; see the gateway log", code="internal_error"))
