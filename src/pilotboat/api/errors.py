"""Map service errors, validation errors and HTTP errors to responses, in each door's error style.

Native API: ``{"detail": "...", "field": "..."}``; Magistrala routes: ``{"message": "..."}``;
Mainflux 0.13 routes: ``{"error": "..."}``; WebAccess/DMP routes: ``{"success": false, "message": "..."}``;
Creator routes: ``{"ErrorCode": "...", "ErrorMessage": "..."}``.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from pilotboat.services.errors import (
    Conflict,
    DeviceTimeout,
    Forbidden,
    InvalidInput,
    NotFound,
    ServiceError,
    Unauthenticated,
    TooManyRequests,
    Unavailable,
)

log = logging.getLogger("pilotboat.api")

STATUS_BY_ERROR: dict[type[ServiceError], int] = {
    InvalidInput: 400,
    Unauthenticated: 401,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    TooManyRequests: 429,
    Unavailable: 503,
    DeviceTimeout: 504,
}


#: Creator's ``ErrorCode`` for a status; other statuses use their reason phrase without spaces.
CREATOR_ERROR_CODES: dict[int, str] = {
    400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 405: "MethodNotAllowed", 409: "Conflict",
    413: "PayloadTooLarge", 415: "UnsupportedMediaType", 429: "TooManyRequests", 500: "ServerError", 503: "ServiceUnavailable",
}


def door_family(path: str) -> str:
    if path == "/api/v1" or path.startswith("/api/v1/"):
        return "native"
    if path.startswith("/api/"):
        return "dmp"
    if path == "/identities" or path.startswith("/identities/"):
        return "creator"
    if path.startswith("/things"):
        return "mainflux"
    return "magistrala"


def _challenge(path: str, family: str) -> str:
    """The scheme a 401 asks for: device bootstrap routes take ``Client``/``Thing`` keys, the rest bearer tokens."""
    if "/bootstrap/" in path and not path.startswith("/api/"):
        return "Thing" if family == "mainflux" else "Client"
    return "Bearer"


def error_response(
    path: str, status: int, message: str, field: str | None = None, headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> JSONResponse:
    family = door_family(path)
    if family == "native":
        body: dict[str, Any] = {"detail": message}
        if field:
            body["field"] = field
    elif family == "mainflux":
        body = {"error": message}
    elif family == "dmp":
        body = {"success": False, "message": message}
    elif family == "creator":
        code = CREATOR_ERROR_CODES.get(status) or HTTPStatus(status).phrase.replace(" ", "")
        body = {"ErrorCode": code, "ErrorMessage": message}
    else:
        body = {"message": message}
    if status == 401 and headers is None:
        headers = {"WWW-Authenticate": _challenge(path, family)}
    if extra and family in ("native", "dmp"):
        body.update(extra)
    return JSONResponse(body, status_code=status, headers=headers)


def _field_of(error: dict[str, Any]) -> str:
    location = [str(part) for part in error.get("loc", ()) if part not in ("body", "query", "path", "header")]
    return ".".join(location)


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    first = errors[0] if errors else {}
    field = _field_of(first) or None
    if first.get("type") == "json_invalid":
        return "malformed JSON body", None
    if first.get("type") == "missing" and not field:
        return "a JSON request body is required", None
    if first.get("type") == "extra_forbidden":
        return f"unknown field '{field}'", field
    message = str(first.get("msg", "invalid request"))
    return (f"{field}: {message}" if field else message), field


def install(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, TooManyRequests) else None
        extra = {"request_id": exc.request_id} if isinstance(exc, DeviceTimeout) and exc.request_id else None
        return error_response(request.url.path, STATUS_BY_ERROR.get(type(exc), 400), exc.message, exc.field, headers, extra)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        message, field = validation_message(errors)
        malformed = bool(errors) and errors[0].get("type") == "json_invalid"
        native = door_family(request.url.path) == "native"
        status = 422 if native and not malformed else 400
        return error_response(request.url.path, status, message, field)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(request.url.path, exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", extra={"path": request.url.path})
        return error_response(request.url.path, 500, "internal server error; the server log has the details")
