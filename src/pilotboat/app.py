"""Composition root: builds every store and service from one Settings object, and the HTTP app."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine

from pilotboat import __version__
from pilotboat.api import errors, ops
from pilotboat.api.body_guard import BodyGuard
from pilotboat.api.compat import magistrala, mainflux
from pilotboat.api.native import router as native_router
from pilotboat.bootstrap.service import BootstrapService, SecureKeys
from pilotboat.security.sealing import Sealer, load_master_key
from pilotboat.security.tokens import TokenCodec
from pilotboat.services.accounts import AccountService
from pilotboat.services.container import Services
from pilotboat.services.devices import DeviceService
from pilotboat.services.events import EventService
from pilotboat.settings import Settings
from pilotboat.store import database

log = logging.getLogger("pilotboat")

#: Routes that take form bodies (OAuth2 password grant) instead of JSON.
FORM_PATHS = frozenset({"/api/v1/auth/token"})


@dataclass(frozen=True)
class Runtime:
    """What a running node holds: the engine (to dispose of) and the services."""

    engine: AsyncEngine
    services: Services


def secure_keys(settings: Settings) -> SecureKeys | None:
    """Derive the secure-bootstrap keys; raises ``SecureBootstrapKeyError`` on a bad key length."""
    if settings.bootstrap_encrypt_key is None:
        return None
    return SecureKeys.from_setting(settings.bootstrap_encrypt_key.get_secret_value())


def build_runtime(settings: Settings) -> Runtime:
    master_key, source = load_master_key(
        settings.master_key.get_secret_value() if settings.master_key else None, settings.data_dir
    )
    log.info("master key loaded", extra={"source": source})
    sealer = Sealer(master_key)
    engine = database.create_engine(settings.resolved_database_url)
    sessions = database.session_factory(engine)
    tokens = TokenCodec(sealer.derive("pilotboat access tokens v1"), settings.token_ttl_seconds)
    devices = DeviceService(sessions, sealer)
    services = Services(
        accounts=AccountService(sessions, tokens),
        devices=devices,
        bootstrap=BootstrapService(sessions, devices, secure_keys(settings)),
        events=EventService(sessions),
    )
    return Runtime(engine, services)


async def start(settings: Settings, runtime: Runtime) -> None:
    """Migrate the database and create the first administrator when there is none."""
    await database.upgrade(runtime.engine)
    created = await runtime.services.accounts.ensure_first_admin(
        settings.admin_email,
        settings.admin_password.get_secret_value() if settings.admin_password else None,
        settings.data_dir,
    )
    if created is not None:
        if created.password_file is not None:
            message = f"created system administrator {created.email}; its password is in {created.password_file.resolve()}"
        else:
            message = f"created system administrator {created.email} with the configured password"
        log.warning(message)
        print(message, flush=True)


def create_app(settings: Settings) -> FastAPI:
    runtime = build_runtime(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await start(settings, runtime)
        log.info("pilotboat ready", extra={"version": __version__, "database": runtime.engine.url.get_backend_name()})
        yield
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
    app.include_router(ops.router)
    app.include_router(native_router.router)
    app.add_middleware(BodyGuard, max_bytes=settings.max_body_bytes, form_paths=FORM_PATHS)
    app.add_middleware(ops.RequestMetrics)
    return app
