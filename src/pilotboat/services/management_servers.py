"""Management-server definitions: an organisation's own ones, the deployment's default one (built from
the settings, read-only, id ``default``), and which one each device is sent to at bootstrap."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, fields, replace
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from pilotboat.model.management_server import (
    BINDING_LETTERS,
    DEFAULT_BINDING,
    DEFAULT_ID,
    DEFAULT_LIFETIME,
    DEFAULT_SHORT_SERVER_ID,
    MAX_LIFETIME,
    SCHEMES,
    SecurityMode,
    ServerDefinition,
)
from pilotboat.model.principal import Principal
from pilotboat.model.roles import Permission
from pilotboat.services import events
from pilotboat.services.access import require, require_org
from pilotboat.services.errors import Conflict, InvalidInput, NotFound
from pilotboat.services.mac_addresses import writable_device_by_mac
from pilotboat.services.transaction import writing
from pilotboat.store.tables import Device, ManagementServer, new_id

MAX_NAME_CHARS = 128
MAX_ADDRESS_CHARS = 253
MAX_PORT = 65535
MAX_SHORT_SERVER_ID = 65534
#: The IANA port of CoAP over DTLS.
COAPS_PORT = 5684
DEFAULT_READ_ONLY = (
    "the default management server is this deployment's own; it comes from the settings PILOTBOAT_PUBLIC_HOST "
    "and PILOTBOAT_LWM2M_PORT and cannot be changed or deleted here"
)
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


@dataclass(frozen=True)
class ServerFields:
    """Fields of a definition as a caller gives them (None: not given); the service checks the values.
    ``security_mode`` is a :class:`SecurityMode` number or name."""

    name: str | None = None
    address: str | None = None
    port: int | None = None
    uri_scheme: str | None = None
    security_mode: int | str | None = None
    short_server_id: int | None = None
    lifetime: int | None = None
    binding: str | None = None

    def given(self) -> dict[str, Any]:
        return {field.name: getattr(self, field.name) for field in fields(self) if getattr(self, field.name) is not None}


@dataclass(frozen=True)
class ManagementServerRecord:
    definition: ServerDefinition
    #: None for the default definition, which is not stored.
    created_at: datetime | None = None
    updated_at: datetime | None = None


# --- values -------------------------------------------------------------------------------------


def to_definition(row: ManagementServer) -> ServerDefinition:
    return ServerDefinition(
        id=row.id, org_id=row.org_id, name=row.name, address=row.address, port=row.port, uri_scheme=row.uri_scheme,
        security_mode=SecurityMode(row.security_mode), short_server_id=row.short_server_id, lifetime=row.lifetime,
        binding=row.binding,
    )


def transport_for_port(port: int) -> tuple[str, SecurityMode]:
    """Scheme and security mode of a definition that names neither: coaps with certificates (mutual
    TLS) on the CoAPS port 5684, plain coap without security on any other."""
    return ("coaps", SecurityMode.CERTIFICATE) if port == COAPS_PORT else ("coap", SecurityMode.NOSEC)


def normalise_address(value: str) -> str:
    """A host name (lower case) or an IP address (compressed; IPv6 may come in brackets); InvalidInput
    for anything else, such as a URI, a host with a port or a name with spaces."""
    if not isinstance(value, str) or not value:
        raise InvalidInput("address: a host name or IP address is required", field="address")
    if len(value) > MAX_ADDRESS_CHARS:
        raise InvalidInput(f"address: at most {MAX_ADDRESS_CHARS} characters", field="address")
    bracketed = value.startswith("[") and value.endswith("]")
    try:
        ip = ipaddress.ip_address(value[1:-1] if bracketed else value)
    except ValueError:
        ip = None
    if ip is not None and not (bracketed and ip.version == 4):
        if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
            raise InvalidInput(f"address: '{value}' has an IPv6 zone, which a device cannot use", field="address")
        return ip.compressed
    labels = value.lower().split(".")
    if bracketed or not all(_LABEL.match(label) for label in labels) or labels[-1].isdigit():
        raise InvalidInput(
            f"address: '{value}' is not a host name or IP address; give the host alone, without scheme, port, "
            "path or spaces (e.g. mgmt.example.com or 192.0.2.10)",
            field="address",
        )
    return ".".join(labels)


def _address_key(value: str) -> str:
    """An address as stored, for lookups: a value that is no address matches nothing."""
    try:
        return normalise_address(value)
    except InvalidInput:
        return value.lower()


def _integer(field: str, value: Any, low: int, high: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidInput(f"{field}: {what} must be an integer from {low} to {high}", field=field)
    return value


def _security_mode(value: Any) -> SecurityMode:
    try:
        if isinstance(value, str):
            return SecurityMode[value.strip().upper()]
        if isinstance(value, int) and not isinstance(value, bool):
            return SecurityMode(value)
    except (KeyError, ValueError):
        pass
    known = ", ".join(f"{mode.name} ({mode.value})" for mode in SecurityMode)
    raise InvalidInput(f"security_mode: '{value}' is not a security mode; known: {known}", field="security_mode")


def _binding(value: Any) -> str:
    letters = value.upper() if isinstance(value, str) else ""
    if not letters or set(letters) - BINDING_LETTERS or len(set(letters)) != len(letters):
        known = ", ".join(sorted(BINDING_LETTERS))
        raise InvalidInput(
            f"binding: '{value}' is not a binding; use each of the letters {known} at most once (e.g. U, UQ, T)",
            field="binding",
        )
    return letters


def _name(value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_NAME_CHARS:
        raise InvalidInput(f"name: 1 to {MAX_NAME_CHARS} characters, not only spaces", field="name")
    return value


def _scheme(value: Any) -> str:
    scheme = value.lower() if isinstance(value, str) else ""
    if scheme not in SCHEMES:
        raise InvalidInput(f"uri_scheme: '{value}' is not one of {', '.join(SCHEMES)}", field="uri_scheme")
    return scheme


_CHECKS: dict[str, Any] = {
    "name": _name,
    "address": normalise_address,
    "port": lambda value: _integer("port", value, 1, MAX_PORT, "the port"),
    "uri_scheme": _scheme,
    "security_mode": _security_mode,
    "short_server_id": lambda value: _integer("short_server_id", value, 1, MAX_SHORT_SERVER_ID, "the Short Server ID"),
    "lifetime": lambda value: _integer("lifetime", value, 1, MAX_LIFETIME, "the lifetime in seconds"),
    "binding": _binding,
}


def _checked(given: dict[str, Any]) -> dict[str, Any]:
    return {name: _CHECKS[name](value) for name, value in given.items()}


def _check_consistent(definition: ServerDefinition) -> None:
    secure = definition.security_mode is not SecurityMode.NOSEC
    if definition.uri_scheme == "coaps" and not secure:
        raise InvalidInput(
            "security_mode: NOSEC is for coap servers; a coaps server needs PSK, RPK, CERTIFICATE or EST",
            field="security_mode",
        )
    if definition.uri_scheme == "coap" and secure:
        raise InvalidInput(
            f"security_mode: {definition.security_mode.name} needs a coaps server (uri_scheme coaps); "
            "a coap server takes NOSEC only",
            field="security_mode",
        )


def _new_definition(server_id: str, org_id: str, given: dict[str, Any]) -> ServerDefinition:
    values = _checked(given)
    missing = [name for name in ("name", "address", "port") if name not in values]
    if missing:
        raise InvalidInput(f"{missing[0]} is required", field=missing[0])
    scheme, mode = values.get("uri_scheme"), values.get("security_mode")
    if scheme is None and mode is None:
        scheme, mode = transport_for_port(values["port"])
    elif scheme is None:
        scheme = "coap" if mode is SecurityMode.NOSEC else "coaps"
    elif mode is None:
        mode = SecurityMode.NOSEC if scheme == "coap" else SecurityMode.CERTIFICATE
    definition = ServerDefinition(
        id=server_id, org_id=org_id, name=values["name"], address=values["address"], port=values["port"],
        uri_scheme=scheme, security_mode=mode,
        short_server_id=values.get("short_server_id", DEFAULT_SHORT_SERVER_ID),
        lifetime=values.get("lifetime", DEFAULT_LIFETIME), binding=values.get("binding", DEFAULT_BINDING),
    )
    _check_consistent(definition)
    return definition


def _columns(definition: ServerDefinition) -> dict[str, Any]:
    return {
        "name": definition.name, "address": definition.address, "port": definition.port,
        "uri_scheme": definition.uri_scheme, "security_mode": int(definition.security_mode),
        "short_server_id": definition.short_server_id, "lifetime": definition.lifetime, "binding": definition.binding,
    }


def _summary(definition: ServerDefinition) -> dict[str, Any]:
    """Event detail of a definition (it holds no secret)."""
    return {
        "server_id": definition.id, "name": definition.name, "uri": definition.uri,
        "security_mode": definition.security_mode.name, "short_server_id": definition.short_server_id,
        "lifetime": definition.lifetime, "binding": definition.binding,
    }


def _record(row: ManagementServer) -> ManagementServerRecord:
    return ManagementServerRecord(to_definition(row), row.created_at, row.updated_at)


# --- the service --------------------------------------------------------------------------------


class ManagementServerService:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], default: ServerDefinition) -> None:
        self._sessions = sessions
        self._default = default

    @property
    def default(self) -> ServerDefinition:
        return self._default

    # --- reading ------------------------------------------------------------------------------

    async def list(
        self, principal: Principal, org_id: str | None = None, *, address: str | None = None
    ) -> list[ManagementServerRecord]:
        """The default definition first, then the definitions of ``org_id`` (or of every organisation
        the caller can read), by name; with ``address``, only those at that address."""
        if org_id is not None:
            require(principal, org_id, Permission.READ)
            org_ids = [org_id]
        else:
            org_ids = [org for org in principal.visible_org_ids() if principal.can(org, Permission.READ)]
        wanted = _address_key(address) if address else None
        query = select(ManagementServer).where(ManagementServer.org_id.in_(org_ids))
        if wanted is not None:
            query = query.where(ManagementServer.address == wanted)
        async with self._sessions() as session:
            if org_id is not None:
                await require_org(session, org_id)
            rows = list(await session.scalars(query.order_by(ManagementServer.name, ManagementServer.id))) if org_ids else []
        default = [] if wanted is not None and _address_key(self._default.address) != wanted else [ManagementServerRecord(self._default)]
        return default + [_record(row) for row in rows]

    async def get(self, principal: Principal, org_id: str | None, server_id: str) -> ManagementServerRecord:
        """One definition; ``org_id=None`` finds it in any organisation the caller can read."""
        if org_id is not None:
            require(principal, org_id, Permission.READ)
        async with self._sessions() as session:
            if org_id is not None:
                await require_org(session, org_id)
            if server_id == DEFAULT_ID:
                return ManagementServerRecord(self._default)
            return _record(await self._row(session, principal, org_id, server_id, Permission.READ))

    async def definition_for_device(self, session: AsyncSession, device: Device) -> ServerDefinition:
        """The definition ``device`` is assigned, or the default; at most one query, in the caller's session."""
        if device.management_server_id is None:
            return self._default
        row = await session.get(ManagementServer, device.management_server_id)
        if row is None or row.org_id != device.org_id:
            return self._default
        return to_definition(row)

    # --- writing ------------------------------------------------------------------------------

    async def create(self, principal: Principal, org_id: str, data: ServerFields) -> ManagementServerRecord:
        """A new definition. Without ``uri_scheme`` and ``security_mode`` they follow the port
        (:func:`transport_for_port`); with only one of them, the other follows it."""
        require(principal, org_id, Permission.WRITE)
        definition = _new_definition(new_id(), org_id, data.given())
        async with self._writing() as session:
            await require_org(session, org_id)
            await self._check_unique(session, definition)
            row = ManagementServer(id=definition.id, org_id=org_id, **_columns(definition))
            session.add(row)
            await session.flush()
            events.record(session, "management_server.created", org_id=org_id, actor=principal.email, **_summary(definition))
            return _record(row)

    async def update(
        self, principal: Principal, org_id: str | None, server_id: str, data: ServerFields
    ) -> ManagementServerRecord:
        """Change the given fields; the result must be consistent as a whole (scheme and mode)."""
        if org_id is not None:
            require(principal, org_id, Permission.WRITE)
        if server_id == DEFAULT_ID:
            raise InvalidInput(DEFAULT_READ_ONLY, field="server_id")
        values = _checked(data.given())
        async with self._writing() as session:
            row = await self._row(session, principal, org_id, server_id, Permission.WRITE)
            current = to_definition(row)
            changed = sorted(name for name, value in values.items() if getattr(current, name) != value)
            definition = replace(current, **values)
            _check_consistent(definition)
            if changed:
                if {"address", "port"} & set(changed):
                    await self._check_unique(session, definition)
                for name, value in _columns(definition).items():
                    setattr(row, name, value)
                await session.flush()
                events.record(
                    session, "management_server.updated", org_id=row.org_id, actor=principal.email, fields=changed,
                    **_summary(definition),
                )
            return _record(row)

    async def delete(self, principal: Principal, org_id: str | None, server_id: str) -> int:
        """Delete a definition; the devices assigned to it fall back to the default. Returns their number."""
        if org_id is not None:
            require(principal, org_id, Permission.WRITE)
        if server_id == DEFAULT_ID:
            raise InvalidInput(DEFAULT_READ_ONLY, field="server_id")
        async with self._writing() as session:
            row = await self._row(session, principal, org_id, server_id, Permission.WRITE)
            result = await session.execute(
                update(Device).where(Device.management_server_id == row.id).values(management_server_id=None)
                .execution_options(synchronize_session=False)
            )
            reassigned = int(result.rowcount or 0)
            definition = to_definition(row)
            await session.delete(row)
            events.record(
                session, "management_server.deleted", org_id=row.org_id, actor=principal.email,
                server_id=definition.id, name=definition.name, uri=definition.uri, devices_reassigned=reassigned,
            )
            return reassigned

    async def assign(self, principal: Principal, org_id: str, device_id: str, server_id: str) -> ServerDefinition:
        """Send the device to ``server_id`` (a definition of its organisation, or ``default``) at its
        next bootstrap."""
        require(principal, org_id, Permission.WRITE)
        async with self._writing() as session:
            device = await session.get(Device, device_id)
            if device is None or device.org_id != org_id:
                raise NotFound("device not found")
            return await self._assign(session, principal, device, server_id)

    async def assign_by_mac(self, principal: Principal, mac_address: str, server_id: str) -> tuple[Device, ServerDefinition]:
        """:meth:`assign` for the one device with ``mac_address`` (case and ``:``/``-``/``.`` separators
        ignored) among the organisations where the caller may write."""
        async with self._writing() as session:
            device = await writable_device_by_mac(
                session, principal, mac_address, by_id="PUT /api/v1/orgs/{org_id}/devices/{device_id}/management-server",
            )
            return device, await self._assign(session, principal, device, server_id)

    # --- helpers ------------------------------------------------------------------------------

    def _writing(self) -> writing:
        return writing(self._sessions, "a management server with this address and port is already defined in the organisation")

    @staticmethod
    async def _row(
        session: AsyncSession, principal: Principal, org_id: str | None, server_id: str, permission: Permission
    ) -> ManagementServer:
        """The stored definition, in ``org_id`` or, when None, in an organisation the caller belongs to."""
        row = await session.get(ManagementServer, server_id)
        if row is None or (org_id is not None and row.org_id != org_id) or not principal.is_member(row.org_id):
            raise NotFound("management server not found")
        require(principal, row.org_id, permission)
        return row

    @staticmethod
    async def _check_unique(session: AsyncSession, definition: ServerDefinition) -> None:
        clash = await session.scalar(
            select(ManagementServer.id).where(
                ManagementServer.org_id == definition.org_id, ManagementServer.address == definition.address,
                ManagementServer.port == definition.port, ManagementServer.id != definition.id,
            )
        )
        if clash is not None:
            raise Conflict(
                f"management server {clash} of this organisation is already at {definition.address} port {definition.port}",
                field="address",
            )

    async def _assign(self, session: AsyncSession, principal: Principal, device: Device, server_id: str) -> ServerDefinition:
        if server_id == DEFAULT_ID:
            definition = self._default
        else:
            row = await session.get(ManagementServer, server_id)
            if row is None or row.org_id != device.org_id:
                raise NotFound("management server not found")
            definition = to_definition(row)
        previous = device.management_server_id or DEFAULT_ID
        device.management_server_id = None if definition.is_default else definition.id
        events.record(
            session, "management_server.assigned", org_id=device.org_id, device_id=device.id, actor=principal.email,
            server_id=definition.id, previous_server_id=previous, uri=definition.uri,
        )
        return definition
