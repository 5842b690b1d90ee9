"""Operations endpoints and middleware: /health, Prometheus /metrics, offline /docs, request logs."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

import swagger_ui_bundle
from fastapi import APIRouter, FastAPI, Response
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pilotboat import __version__

if TYPE_CHECKING:
    from pilotboat.dtls.transport import DtlsServerTransport
    from pilotboat.services.container import Services

log = logging.getLogger("pilotboat.http")

_CONVERTER = re.compile(r":[a-z]+}")
REQUESTS = Counter("pilotboat_http_requests_total", "HTTP requests", ["method", "route", "status"])
LATENCY = Histogram("pilotboat_http_request_seconds", "HTTP request latency", ["method", "route"])
REGISTRATIONS = Gauge("pilotboat_lwm2m_registrations", "LwM2M registrations held by this node")
EVENTS_QUEUED = Gauge("pilotboat_events_queued", "Events of the hot paths waiting to be written")
DTLS_SESSIONS = Gauge("pilotboat_dtls_sessions", "DTLS sessions (handshakes under way and established) held by a port", ["server"])
EVENTS_DROPPED = Gauge("pilotboat_events_dropped", "Events dropped since start because the database was away too long")
SWAGGER_DIR = Path(str(swagger_ui_bundle.swagger_ui_path))

router = APIRouter(tags=["operations"])


@router.get("/health", summary="Liveness and version")
async def health() -> dict[str, str]:
    return {"status": "pass", "version": __version__, "service": "pilotboat"}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def watch(services: Services) -> None:
    """Read the node's LwM2M and event-writer state at each scrape."""
    REGISTRATIONS.set_function(lambda: services.registry.registered)
    EVENTS_QUEUED.set_function(lambda: len(services.event_log))
    EVENTS_DROPPED.set_function(lambda: services.event_log.dropped)


def watch_dtls(server: str, transport: DtlsServerTransport) -> None:
    """Export the session count of one server's DTLS port."""
    DTLS_SESSIONS.labels(server=server).set_function(lambda: transport.session_count)


def install_docs(app: FastAPI) -> None:
    """Swagger UI served from the installed swagger-ui-bundle package: no CDN needed."""
    app.mount("/static/swagger-ui", StaticFiles(directory=SWAGGER_DIR), name="swagger-ui")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="Pilotboat API",
            swagger_js_url="/static/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url="/static/swagger-ui/swagger-ui.css",
            swagger_favicon_url="/static/swagger-ui/favicon-32x32.png",
        )


class RequestMetrics:
    """Counts and times every request by route template, and logs one line per request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            elapsed = time.perf_counter() - started
            # The template as the OpenAPI document names it: converters such as {identity:path} dropped.
            route = _CONVERTER.sub("}", getattr(scope.get("route"), "path", None) or "unmatched")
            REQUESTS.labels(scope["method"], route, str(status)).inc()
            LATENCY.labels(scope["method"], route).observe(elapsed)
            if route not in ("/health", "/metrics"):
                log.info(
                    "request",
                    extra={"method": scope["method"], "route": route, "status": status, "ms": round(elapsed * 1000, 2)},
                )
