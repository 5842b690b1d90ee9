"""The service container built by the composition root (``pilotboat.runtime``)."""

from __future__ import annotations

from dataclasses import dataclass

from pilotboat.bootstrap.service import BootstrapService
from pilotboat.services.accounts import AccountService
from pilotboat.services.authorities import AuthorityService
from pilotboat.services.certificates import CertificateService
from pilotboat.services.devices import DeviceService
from pilotboat.services.events import EventService
from pilotboat.services.keyring import KeyringService
from pilotboat.services.management_servers import ManagementServerService
from pilotboat.services.psks import PskService
from pilotboat.services.trust import TrustService


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
    keyring: KeyringService
    management_servers: ManagementServerService
