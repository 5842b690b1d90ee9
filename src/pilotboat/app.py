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
from pilotboat.coap.udp import PortInUse
from pilotboat.lwm2m.bootstrap_server import BootstrapServer
from pilotboat.runtime import WrongMasterKey, build_runtime, start
from pilotboat.settings import Settings

log = logging.getLogger("pilotboat")

#: Routes that take form bodies (OAuth2 password grant) instead of JSON.
FORM_PATHS = frozenset({"/api/v1/auth/token"})


def create_app(settings: Settings) -> FastAPI:
    runtime = build_runtime(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        bootstrap_server = None
        try:
            await start(settings, runtime)
            if settings.bootstrap_port:
                bootstrap_server = await BootstrapServer.start(
                    runtime.services.bootstrap, settings.coap_host, settings.bootstrap_port,
                    request_timeout=settings.bootstrap_request_timeout, max_sessions=settings.bootstrap_max_sessions,
                )
        except (WrongMasterKey, PortInUse) as exc:
            log.error(str(exc))
            print(f"error: {exc}", file=sys.stderr, flush=True)
            raise
        log.info("pilotboat ready", extra={"version": __version__, "database": runtime.engine.url.get_backend_name()})
        yield
        if bootstrap_server is not None:
            await bootstrap_server.close()
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
