"""Finding the one device with a MAC address among the organisations a caller may change, as the
WebAccess/DMP routes address devices (case and the separators ``:``, ``-``, ``.`` ignored)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from pilotboat.model.principal import Principal
from pilotboat.model.roles import Permission
from pilotboat.services.errors import Conflict, InvalidInput, NotFound
from pilotboat.store.tables import Device

#: Longest MAC address a device can have (the size of devices.mac_address).
MAX_MAC_CHARS = 64
#: Separators ignored when MAC addresses are compared.
MAC_SEPARATORS = (":", "-", ".")
#: Devices named in the refusal of an ambiguous MAC address.
MAX_LISTED_DEVICES = 5


def mac_key(mac_address: str) -> str:
    """A MAC address as compared: lower case, without separators."""
    key = mac_address.lower()
    for separator in MAC_SEPARATORS:
        key = key.replace(separator, "")
    return key


def _mac_column_key() -> ColumnElement[str]:
    expression: ColumnElement[Any] = Device.mac_address
    for separator in MAC_SEPARATORS:
        expression = func.replace(expression, separator, "")
    return func.lower(expression)


async def writable_device_by_mac(session: AsyncSession, principal: Principal, mac_address: str, *, by_id: str) -> Device:
    """The one device with ``mac_address`` in the organisations where ``principal`` may write.

    400 for an impossible address, 404 for none, 409 listing them when several organisations have one
    (``by_id`` names the route that addresses a device by its id instead).
    """
    if not mac_address or len(mac_address) > MAX_MAC_CHARS or not mac_key(mac_address):
        raise InvalidInput(f"mac_address: 1 to {MAX_MAC_CHARS} characters", field="mac_address")
    org_ids = [org for org in principal.visible_org_ids() if principal.can(org, Permission.WRITE)]
    devices = list(await session.scalars(
        select(Device).where(Device.org_id.in_(org_ids), _mac_column_key() == mac_key(mac_address))
        .order_by(Device.created_at, Device.id).limit(MAX_LISTED_DEVICES)
    )) if org_ids else []
    if not devices:
        raise NotFound(f"no device with MAC address '{mac_address}' in the organisations you may change")
    if len(devices) > 1:
        listed = ", ".join(f"{device.id} (organisation {device.org_id})" for device in devices)
        raise Conflict(f"several devices have MAC address '{mac_address}': {listed}; use one by its id with {by_id}",
                       field="mac_address")
    return devices[0]
