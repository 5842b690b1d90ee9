"""Composition root: builds every store and service from one Settings object (no HTTP here, so the
CLI loads quickly), and the start-up steps shared by the server and the CLI."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncEngine

from pilotboat.bootstrap.credentials import ManagementCredentials
from pilotboat.bootstrap.service import BootstrapService, SecureKeys
from pilotboat.lwm2m.management_server import CoapDeviceLink
from pilotboat.model.management_server import DeploymentServer
from pilotboat.registry.hold import RegistrationHold
from pilotboat.registry.service import RegistryService
from pilotboat.registry.store import MemoryRegistrationStore
from pilotboat.security.sealing import Sealer, load_master_keys
from pilotboat.security.tokens import TokenCodec
from pilotboat.services.accounts import AccountService
from pilotboat.services.authorities import AuthorityService
from pilotboat.services.certificates import CertificateService
from pilotboat.services.container import Services
from pilotboat.services.device_identity import DeviceIdentityService, ServerKeySource
from pilotboat.services.device_operations import DeviceOperationService
from pilotboat.services.devices import DeviceService
from pilotboat.services.directory import DirectoryService
from pilotboat.services.event_feed import EventFeed
from pilotboat.services.event_log import EventLog
from pilotboat.services.event_stream import EventStreams
from pilotboat.services.events import EventService
from pilotboat.services.keyring import KeyringService
from pilotboat.services.management_servers import ManagementServerService
from pilotboat.services.observations import ObservationService
from pilotboat.services.psks import PskService
from pilotboat.services.server_key import DeploymentKeyStore
from pilotboat.services.trust import TrustService
from pilotboat.services.webhook_delivery import DeliveryPolicy, WebhookDispatcher
from pilotboat.services.webhooks import WebhookService
from pilotboat.settings import Settings
from pilotboat.store import database

log = logging.getLogger("pilotboat")


@dataclass(frozen=True)
class Runtime:
    """What a running node holds: the engine (to dispose of) and the services."""

    engine: AsyncEngine
    services: Services
    #: Carries the management server's requests to registered devices (plain CoAP).
    device_link: CoapDeviceLink


def secure_keys(settings: Settings) -> SecureKeys | None:
    """Derive the secure-bootstrap keys; raises ``SecureBootstrapKeyError`` on a bad key length."""
    if settings.bootstrap_encrypt_key is None:
        return None
    return SecureKeys.from_setting(settings.bootstrap_encrypt_key.get_secret_value())


def delivery_policy(settings: Settings) -> DeliveryPolicy:
    return DeliveryPolicy(
        timeout=settings.webhook_timeout, backoff_initial=settings.webhook_backoff_initial,
        backoff_max=settings.webhook_backoff_max, max_failures=settings.webhook_max_failures,
        max_failing=settings.webhook_max_failing_seconds, log_size=settings.webhook_delivery_log,
        allow_private=settings.webhook_allow_private,
    )


def build_runtime(settings: Settings) -> Runtime:
    master_keys = load_master_keys(settings.master_key.get_secret_value() if settings.master_key else None, settings.data_dir)
    sealer = Sealer(master_keys)
    log.info("master keys loaded", extra={"source": master_keys.source, "sealing_key": sealer.key_id, "keys": len(master_keys.keys)})
    engine = database.create_engine(settings.resolved_database_url)
    sessions = database.session_factory(engine)
    tokens = TokenCodec(sealer, settings.token_ttl_seconds)
    devices = DeviceService(sessions, sealer)
    authorities = AuthorityService(sessions, sealer)
    deployment_server = DeploymentServer(
        settings.public_host, settings.lwm2m_port, settings.lwm2m_dtls_port, allow_nosec=settings.allow_nosec,
    )
    management_servers = ManagementServerService(sessions, deployment_server.listed)
    psks = PskService(sessions, sealer)
    trust = TrustService(sessions)
    device_identity = DeviceIdentityService(
        sessions, psks, trust, DeploymentKeyStore(sessions, sealer),
        ServerKeySource(settings.public_host, settings.dtls_certificate, settings.dtls_private_key),
    )
    event_log = EventLog(sessions)
    registry = RegistryService(
        sessions, MemoryRegistrationStore(grace=settings.registration_grace), event_log, identity=device_identity,
        hold=RegistrationHold(hold=settings.registration_hold_seconds),
    )
    device_link = CoapDeviceLink()
    registry.add_listener(device_link)
    device_operations = DeviceOperationService(
        sessions, registry, device_link, event_log, default_timeout=settings.lwm2m_request_timeout,
        awake_seconds=settings.lwm2m_queue_awake_seconds, queue_ttl=settings.lwm2m_queue_request_ttl,
        queue_per_device=settings.lwm2m_queue_per_device, queue_total=settings.lwm2m_queue_total,
    )
    observations = ObservationService(sessions, registry, device_link, event_log, device_operations)
    registry.add_listener(device_operations)
    registry.add_listener(observations)
    event_feed = EventFeed(sessions, event_log)
    webhook_dispatcher = WebhookDispatcher(sessions, sealer, event_feed, delivery_policy(settings))
    services = Services(
        accounts=AccountService(sessions, tokens, authorities),
        devices=devices,
        bootstrap=BootstrapService(
            sessions, devices, secure_keys(settings), management_servers, deployment=deployment_server,
            identity=device_identity,
            credentials=ManagementCredentials(sealer, authorities, timedelta(days=settings.certificate_renewal_days)),
        ),
        events=EventService(sessions),
        authorities=authorities,
        certificates=CertificateService(sessions, sealer, authorities),
        psks=psks,
        trust=trust,
        device_identity=device_identity,
        keyring=KeyringService(sessions, sealer),
        management_servers=management_servers,
        event_log=event_log,
        event_feed=event_feed,
        event_streams=EventStreams(
            sessions, event_feed, max_streams=settings.event_stream_max, heartbeat=settings.event_stream_heartbeat,
        ),
        webhooks=WebhookService(
            sessions, sealer, allow_private=settings.webhook_allow_private, changed=webhook_dispatcher.changed,
        ),
        webhook_dispatcher=webhook_dispatcher,
        registry=registry,
        directory=DirectoryService(sessions, registry),
        device_operations=device_operations,
        observations=observations,
    )
    return Runtime(engine, services, device_link)


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
