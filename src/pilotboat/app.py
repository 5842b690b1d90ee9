"""The HTTP application: the FastAPI app over the runtime built by ``pilotboat.runtime``."""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from pilotboat import __version__
from pilotboat.api import errors, ops
from pilotboat.api.body_guard import BodyGuard
from pilotboat.api.compat import creator, dmp, magistrala, mainflux
from pilotboat.api.native import router as native_router
from pilotboat.api.native.event_stream import end_streams_on_exit_signal
from pilotboat.coap.load import settle_garbage_collector
from pilotboat.coap.udp import PortInUse
from pilotboat.dtls.transport import Limits
from pilotboat.lwm2m.bootstrap_server import BootstrapServer
from pilotboat.lwm2m.listener import DoorCredentials, Ports
from pilotboat.lwm2m.management_server import ManagementServer
from pilotboat.runtime import Runtime, WrongMasterKey, build_runtime, start
from pilotboat.services.device_identity import Door
from pilotboat.services.server_key import ServerCredentialsError
from pilotboat.settings import Settings

log = logging.getLogger("pilotboat")

#: Routes that take form bodies (OAuth2 password grant) instead of JSON.
FORM_PATHS = frozenset({"/api/v1/auth/token"})


def bootstrap_ports(settings: Settings) -> Ports:
    """The bootstrap server's ports: plain CoAP only when NoSec is allowed; 0 = not opened."""
    return Ports(settings.coap_host, settings.bootstrap_port if settings.allow_nosec else 0, settings.bootstrap_dtls_port)


def management_ports(settings: Settings) -> Ports:
    """The management server's ports (none when it does not listen here)."""
    if not settings.lwm2m_listen:
        return Ports(settings.coap_host, 0, 0)
    return Ports(settings.coap_host, settings.lwm2m_port if settings.allow_nosec else 0, settings.lwm2m_dtls_port)


async def start_lwm2m(settings: Settings, runtime: Runtime) -> tuple[BootstrapServer | None, ManagementServer | None]:
    """Start the LwM2M bootstrap and management servers on their ports."""
    services = runtime.services
    limits = Limits(max_sessions=settings.dtls_max_sessions, idle_timeout=settings.dtls_idle_timeout)
    if not settings.allow_nosec:
        log.info("plain CoAP ports not opened: PILOTBOAT_ALLOW_NOSEC is false, devices connect over DTLS only")
    bootstrap_server = management_server = None
    ports = bootstrap_ports(settings)
    if ports.plain or ports.dtls:
        bootstrap_server = await BootstrapServer.start(
            services.bootstrap, ports, credentials=DoorCredentials(services.device_identity, Door.BOOTSTRAP),
            limits=limits, request_timeout=settings.bootstrap_request_timeout, max_sessions=settings.bootstrap_max_sessions,
        )
    ports = management_ports(settings)
    if ports.plain or ports.dtls:
        try:
            management_server = await ManagementServer.start(
                services.registry, runtime.device_link, ports,
                credentials=DoorCredentials(services.device_identity, Door.MANAGEMENT), limits=limits,
            )
        except BaseException:
            if bootstrap_server is not None:
                await bootstrap_server.close()
            raise
    for name, server in (("bootstrap", bootstrap_server), ("lwm2m", management_server)):
        if server is not None and server.listener.dtls is not None:
            ops.watch_dtls(name, server.listener.dtls)
    return bootstrap_server, management_server


def create_app(settings: Settings) -> FastAPI:
    runtime = build_runtime(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        bootstrap_server = management_server = None
        services = runtime.services
        try:
            await start(settings, runtime)
            services.event_log.start()
            await services.event_feed.start()
            services.webhook_dispatcher.start()
            bootstrap_server, management_server = await start_lwm2m(settings, runtime)
            if management_server is not None:
                await services.registry.start()
        except (WrongMasterKey, PortInUse, ServerCredentialsError) as exc:
            log.error(str(exc))
            print(f"error: {exc}", file=sys.stderr, flush=True)
            raise
        settle_garbage_collector()
        log.info("pilotboat ready", extra={"version": __version__, "database": runtime.engine.url.get_backend_name()})
        # Open event streams end at once on SIGTERM/SIGINT: the HTTP server waits for open responses.
        restore_signals = end_streams_on_exit_signal(services.event_feed.stop_streams)
        yield
        restore_signals()
        await services.webhook_dispatcher.close()
        await services.event_feed.close()
        if bootstrap_server is not None:
            await bootstrap_server.close()
        if management_server is not None:
            await services.registry.close()
            await management_server.close()
        await services.event_log.close()
        await runtime.engine.dispose()

    app = FastAPI(
        title="Pilotboat",
        version=__version__,
        summary="Device onboarding: Magistrala-compatible HTTP bootstrap, devices, channels, accounts.",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.services = runtime.services
    app.state.settings = settings
    errors.install(app)
    ops.watch(runtime.services)
    ops.install_docs(app)
    # Routes match in order: the device-facing compat routes (the hot path) come first.
    app.include_router(magistrala.router)
    app.include_router(mainflux.router)
    app.include_router(dmp.router)
    app.include_router(creator.router)
    app.include_router(ops.router)
    app.include_router(native_router.router)
    app.add_middleware(BodyGuard, max_bytes=settings.max_body_bytes, form_paths=FORM_PATHS)
    app.add_middleware(ops.RequestMetrics)
    return app
