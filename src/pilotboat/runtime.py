"""Composition root: builds every store and service from one Settings object (no HTTP here, so the
CLI loads quickly), and the start-up steps shared by the server and the CLI."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine

from pilotboat.bootstrap.service import BootstrapService, SecureKeys
from pilotboat.model.management_server import default_definition
from pilotboat.security.sealing import Sealer, load_master_keys
from pilotboat.security.tokens import TokenCodec
from pilotboat.services.accounts import AccountService
from pilotboat.services.authorities import AuthorityService
from pilotboat.services.certificates import CertificateService
from pilotboat.services.container import Services
from pilotboat.services.devices import DeviceService
from pilotboat.services.events import EventService
from pilotboat.services.keyring import KeyringService
from pilotboat.services.management_servers import ManagementServerService
from pilotboat.services.psks import PskService
from pilotboat.services.trust import TrustService
from pilotboat.settings import Settings
from pilotboat.store import database

log = logging.getLogger("pilotboat")


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
    master_keys = load_master_keys(settings.master_key.get_secret_value() if settings.master_key else None, settings.data_dir)
    sealer = Sealer(master_keys)
    log.info("master keys loaded", extra={"source": master_keys.source, "sealing_key": sealer.key_id, "keys": len(master_keys.keys)})
    engine = database.create_engine(settings.resolved_database_url)
    sessions = database.session_factory(engine)
    tokens = TokenCodec(sealer, settings.token_ttl_seconds)
    devices = DeviceService(sessions, sealer)
    authorities = AuthorityService(sessions, sealer)
    management_servers = ManagementServerService(sessions, default_definition(settings.public_host, settings.lwm2m_port))
    services = Services(
        accounts=AccountService(sessions, tokens, authorities),
        devices=devices,
        bootstrap=BootstrapService(sessions, devices, secure_keys(settings), management_servers),
        events=EventService(sessions),
        authorities=authorities,
        certificates=CertificateService(sessions, sealer, authorities),
        psks=PskService(sessions, sealer),
        trust=TrustService(sessions),
        keyring=KeyringService(sessions, sealer),
        management_servers=management_servers,
    )
    return Runtime(engine, services)


class WrongMasterKey(RuntimeError):
    """The database holds secrets sealed under master keys this node does not have."""


async def check_master_keys(runtime: Runtime) -> None:
    """Raise ``WrongMasterKey`` when the database holds values no key of this node's keyring opens."""
    unknown = await runtime.services.keyring.unknown_key_ids()
    if unknown:
        raise WrongMasterKey(
            f"the database holds secrets sealed under master key(s) {', '.join(sorted(unknown))}, which this node does not "
            f"have (its keys: {', '.join(runtime.services.keyring.sealer.key_ids)}). Set PILOTBOAT_MASTER_KEY, or restore "
            "master.key in the data directory, to the key this database was sealed with."
        )


async def start(settings: Settings, runtime: Runtime) -> None:
    """Migrate the database, check the master key against it, create the first administrator when
    there is none and a CA for every organisation without one."""
    await database.upgrade(runtime.engine)
    await check_master_keys(runtime)
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
    created_cas = await runtime.services.authorities.ensure_all()
    if created_cas:
        log.info("created organisation CAs", extra={"count": created_cas})
