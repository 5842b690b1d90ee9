"""The service container built by the composition root (``pilotboat.app``)."""

from __future__ import annotations

from dataclasses import dataclass

from pilotboat.bootstrap.service import BootstrapService
from pilotboat.services.accounts import AccountService
from pilotboat.services.devices import DeviceService
from pilotboat.services.events import EventService


@dataclass(frozen=True)
class Services:
    accounts: AccountService
    devices: DeviceService
    bootstrap: BootstrapService
    events: EventService
