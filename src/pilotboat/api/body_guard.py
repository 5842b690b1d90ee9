"""ASGI middleware: request body size limit (413) and JSON content type (415), before any route runs.

It also refuses (400) what one backend would store and another would fail on: NaN/Infinity and
out-of-range numbers (not JSON) and NUL characters (PostgreSQL text cannot hold them), in JSON bodies,
form bodies, paths and query strings.
"""

from __future__ import annotations

import json
import math
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pilotboat.api.errors import error_response

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


class _Refused(ValueError):
    pass


def _no_constant(name: str) -> Any:
    raise _Refused(f"{name} is not a JSON value")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"number {text[:32]} is out of range")
    return value


def _has_nul(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _json_problem(body: bytes) -> str | None:
    """Why a JSON body is refused; None when it is fine or malformed (the route answers malformed ones)."""
    try:
        parsed = json.loads(body, parse_constant=_no_constant, parse_float=_finite)
    except _Refused as exc:
        return f"malformed JSON body: {exc}"
    except (ValueError, RecursionError):
        return None
    return "NUL characters (\\u0000) are not allowed" if _has_nul(parsed) else None


class BodyGuard:
    def __init__(self, app: ASGIApp, *, max_bytes: int, form_paths: frozenset[str]) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.form_paths = form_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and ("\x00" in scope["path"] or b"%00" in scope.get("query_string", b"")):
            await self._reject(scope, receive, send, 400, "NUL characters are not allowed in the path or query")
            return
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                await self._reject(scope, receive, send, 400, "invalid Content-Length header")
                return
            if int(declared) > self.max_bytes:
                await self._reject(scope, receive, send, 413, f"request body larger than {self.max_bytes} bytes")
                return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._reject(scope, receive, send, 413, f"request body larger than {self.max_bytes} bytes")
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if body and path not in self.form_paths and not _is_json(headers.get("content-type", "")):
            await self._reject(scope, receive, send, 415, "Content-Type must be application/json")
            return
        if path in self.form_paths:
            problem = "NUL characters are not allowed" if b"%00" in body else None
        else:
            problem = _json_problem(body) if body else None
        if problem is not None:
            await self._reject(scope, receive, send, 400, problem)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _reject(scope: Scope, receive: Receive, send: Send, status: int, message: str) -> None:
        response = error_response(scope["path"], status, message)
        await response(scope, receive, send)

