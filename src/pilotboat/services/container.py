"""The service container built by the composition root (``pilotboat.runtime``)."""

from __future__ import annotations

from dataclasses import dataclass

from pilotboat.bootstrap.service import BootstrapService
from pilotboat.registry.service import RegistryService
from pilotboat.services.accounts import AccountService
from pilotboat.services.authorities import AuthorityService
from pilotboat.services.certificates import CertificateService
from pilotboat.services.device_identity import DeviceIdentityService
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
from pilotboat.services.trust import TrustService
from pilotboat.services.webhook_delivery import WebhookDispatcher
from pilotboat.services.webhooks import WebhookService


@dataclass(frozen=True)
class Services:
    accounts: AccountService
    devices: DeviceService
    bootstrap: BootstrapService
    events: EventService
    authorities: AuthorityService
    certificates: CertificateService
    psks: PskService
    trust: TrustService
    device_identity: DeviceIdentityService
    keyring: KeyringService
    management_servers: ManagementServerService
    event_log: EventLog
    event_feed: EventFeed
    event_streams: EventStreams
    webhooks: WebhookService
    webhook_dispatcher: WebhookDispatcher
    registry: RegistryService
    directory: DirectoryService
    device_operations: DeviceOperationService
    observations: ObservationService
