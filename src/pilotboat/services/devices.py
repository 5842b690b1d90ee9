"""Devices (Magistrala "clients"), their bootstrap configs, channels and connections.

A device's bootstrap *config* is the set of ``external_*``/content/certificate fields on the device:
a device "has a config" when its ``external_id`` is set. The Magistrala and Mainflux doors and the
native API all go through this one service.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from pilotboat.model.principal import Principal
from pilotboat.model.roles import Permission
from pilotboat.security.digests import digest_secret, random_token
from pilotboat.security.sealing import Sealer
from pilotboat.services import events
from pilotboat.services.access import require, require_org
from pilotboat.services.certificates import revoke_for_device
from pilotboat.services.errors import Conflict, InvalidInput, NotFound
from pilotboat.services.transaction import writing
from pilotboat.store.tables import Channel, Device, DeviceChannel, Event

SECRET_PURPOSE = "device.secret"
CLIENT_KEY_PURPOSE = "device.client_key"

#: Plain columns a caller may set on a device.
DEVICE_COLUMNS = frozenset(
    {"name", "external_id", "endpoint", "mac_address", "serial_number", "imei", "alias", "content", "client_cert", "ca_cert"}
)
#: Columns cleared when a bootstrap config is removed (the device itself stays).
CONFIG_COLUMNS = {"external_id": None, "external_key_digest": None, "content": "", "client_cert": "", "client_key_sealed": None, "ca_cert": ""}
UNIQUE_COLUMNS = ("external_id", "endpoint")
STATES = (0, 1)
#: Events of a bootstrap attempt's end: a device's last bootstrap is the newest of these.
BOOTSTRAP_OUTCOME_KINDS = (events.BOOTSTRAP_SUCCEEDED, events.BOOTSTRAP_FAILED)


@dataclass(frozen=True)
class ChannelLink:
    channel: Channel
    connected: bool


@dataclass(frozen=True)
class LastBootstrap:
    """How the device's newest bootstrap attempt ended (from its event)."""

    at: datetime
    outcome: str
    reason: str | None
    door: str | None


@dataclass(frozen=True)
class DeviceRecord:
    device: Device
    channels: list[ChannelLink]
    #: Time of the last successful bootstrap, read from the events (not stored twice).
    last_bootstrap_at: datetime | None = None
    #: The newest bootstrap attempt, successful or not.
    last_bootstrap: LastBootstrap | None = None


@dataclass(frozen=True)
class DeviceFilter:
    name: str | None = None
    state: int | None = None
    external_id: str | None = None
    endpoint: str | None = None
    mac_address: str | None = None
    serial_number: str | None = None
    imei: str | None = None
    channel_id: str | None = None
    has_config: bool | None = None
    offset: int = 0
    limit: int = 10


@dataclass
class DeviceInput:
    """Fields for a new device. ``external_key``/``client_key`` are plaintext here and never stored so."""

    columns: dict[str, Any] = field(default_factory=dict)
    external_key: str | None = None
    client_key: str | None = None
    state: int = 0
    channels: list[str] | None = None


class DeviceService:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], sealer: Sealer) -> None:
        self._sessions = sessions
        self._sealer = sealer

    # --- reading ------------------------------------------------------------------------------

    async def get(self, principal: Principal, org_id: str, device_id: str, *, config: bool = False) -> DeviceRecord:
        """One device; with ``config=True`` a device without a bootstrap config is NotFound."""
        require(principal, org_id, Permission.READ)
        async with self._sessions() as session:
            device = await self._load(session, org_id, device_id, config=config)
            return (await self._records(session, [device]))[0]

    async def list(self, principal: Principal, org_id: str, flt: DeviceFilter) -> tuple[int, list[DeviceRecord]]:
        require(principal, org_id, Permission.READ)
        query = self._filtered(select(Device).where(Device.org_id == org_id), flt)
        async with self._sessions() as session:
            await require_org(session, org_id)
            total = await session.scalar(select(func.count()).select_from(query.subquery()))
            rows = list(await session.scalars(query.order_by(Device.created_at, Device.id).offset(flt.offset).limit(flt.limit)))
            return int(total or 0), await self._records(session, rows)

    def client_secret(self, device: Device) -> str:
        return self._sealer.open(device.secret_sealed, SECRET_PURPOSE)

    def client_key(self, device: Device) -> str:
        return self._sealer.open(device.client_key_sealed, CLIENT_KEY_PURPOSE) if device.client_key_sealed else ""

    # --- writing ------------------------------------------------------------------------------

    async def create(
        self, principal: Principal, org_id: str, data: DeviceInput, *, kind: str = "device.created"
    ) -> tuple[DeviceRecord, str]:
        """Create a device; returns it and its client secret (shown to the caller once)."""
        require(principal, org_id, Permission.WRITE)
        self._check_state(data.state)
        secret = random_token()
        device = Device(
            org_id=org_id,
            secret_sealed=self._sealer.seal(secret, SECRET_PURPOSE),
            state=data.state,
            **{name: value for name, value in data.columns.items() if name in DEVICE_COLUMNS},
        )
        self._apply_secrets(device, data.external_key, data.client_key)
        async with self._writing() as session:
            await require_org(session, org_id)
            await self._check_unique(session, data.columns)
            session.add(device)
            await session.flush()
            if data.channels is not None:
                await self._replace_channels(session, device, data.channels)
            events.record(
                session, kind, org_id=org_id, device_id=device.id, actor=principal.email,
                name=device.name, external_id=device.external_id, fields=sorted(data.columns),
            )
            return (await self._records(session, [device]))[0], secret

    async def create_config(self, principal: Principal, org_id: str, device_id: str | None, data: DeviceInput) -> str:
        """Magistrala "create config": attach a bootstrap config to an existing device, or create the
        device when ``device_id`` is empty. Returns the device id."""
        if not data.columns.get("external_id") or not data.external_key:
            raise InvalidInput("external_id and external_key are required", field="external_id")
        if not device_id:
            record, _ = await self.create(principal, org_id, data, kind="config.created")
            return record.device.id
        require(principal, org_id, Permission.WRITE)
        async with self._writing() as session:
            device = await self._load(session, org_id, device_id)
            if device.external_id is not None:
                raise Conflict("this device already has a bootstrap config", field="client_id")
            await self._check_unique(session, data.columns, device_id)
            for name, value in data.columns.items():
                setattr(device, name, value)
            self._apply_secrets(device, data.external_key, data.client_key)
            if data.channels is not None:
                await self._replace_channels(session, device, data.channels)
            events.record(
                session, "config.created", org_id=org_id, device_id=device.id, actor=principal.email,
                external_id=device.external_id,
            )
            return device.id

    async def update(
        self, principal: Principal, org_id: str, device_id: str, columns: dict[str, Any], *,
        external_key: str | None = None, config: bool = False,
    ) -> DeviceRecord:
        require(principal, org_id, Permission.WRITE)
        unknown = set(columns) - DEVICE_COLUMNS
        if unknown:
            raise InvalidInput(f"cannot change {', '.join(sorted(unknown))}", field=sorted(unknown)[0])
        async with self._writing() as session:
            device = await self._load(session, org_id, device_id, config=config)
            await self._check_unique(session, columns, device_id)
            for name, value in columns.items():
                setattr(device, name, value)
            if external_key is not None:
                device.external_key_digest = digest_secret(external_key)
            if device.external_id is not None and device.external_key_digest is None:
                raise InvalidInput("a device with an external_id needs an external_key", field="external_key")
            changed = sorted(columns) + (["external_key"] if external_key is not None else [])
            events.record(session, "device.updated", org_id=org_id, device_id=device.id, actor=principal.email, fields=changed)
            return (await self._records(session, [device]))[0]

    async def update_certs(
        self, principal: Principal, org_id: str, device_id: str, *, client_cert: str | None, client_key: str | None,
        ca_cert: str | None,
    ) -> Device:
        require(principal, org_id, Permission.WRITE)
        async with self._writing() as session:
            device = await self._load(session, org_id, device_id, config=True)
            if client_cert is not None:
                device.client_cert = client_cert
            if ca_cert is not None:
                device.ca_cert = ca_cert
            if client_key is not None:
                self._apply_secrets(device, None, client_key)
            changed = [name for name, value in (("client_cert", client_cert), ("client_key", client_key), ("ca_cert", ca_cert)) if value is not None]
            events.record(session, "config.certs_updated", org_id=org_id, device_id=device.id, actor=principal.email, fields=changed)
            return device

    async def set_state(self, principal: Principal, org_id: str, device_id: str, state: int, *, config: bool = False) -> None:
        """1 activates the device and connects it to its channels; 0 deactivates and disconnects."""
        require(principal, org_id, Permission.WRITE)
        self._check_state(state)
        async with self._writing() as session:
            device = await self._load(session, org_id, device_id, config=config)
            links = list(await session.scalars(select(DeviceChannel).where(DeviceChannel.device_id == device.id)))
            for link in links:
                link.connected = state == 1
            previous, device.state = device.state, state
            events.record(
                session, "device.state_changed", org_id=org_id, device_id=device.id, actor=principal.email,
                previous=previous, state=state, channels=sorted(link.channel_id for link in links),
            )

    async def set_channels(self, principal: Principal, org_id: str, device_id: str, channel_ids: list[str], *, config: bool = False) -> None:
        """Replace the device's channel list; connections follow only while the device is active."""
        require(principal, org_id, Permission.WRITE)
        async with self._writing() as session:
            device = await self._load(session, org_id, device_id, config=config)
            added, removed = await self._replace_channels(session, device, channel_ids)
            events.record(
                session, "device.channels_changed", org_id=org_id, device_id=device.id, actor=principal.email,
                added=added, removed=removed, connected=device.state == 1,
            )

    async def delete(self, principal: Principal, org_id: str, device_id: str, *, missing_ok: bool = False) -> None:
        require(principal, org_id, Permission.WRITE)
        async with self._writing() as session:
            device = await self._find(session, org_id, device_id)
            if device is None:
                if missing_ok:
                    return
                raise NotFound("device not found")
            revoked = await revoke_for_device(session, device.id)
            await session.delete(device)
            events.record(
                session, "device.deleted", org_id=org_id, device_id=device_id, actor=principal.email, name=device.name,
                certificates_revoked=revoked,
            )

    async def remove_config(self, principal: Principal, org_id: str, device_id: str) -> None:
        """Magistrala "remove config": the bootstrap config goes and the device is disconnected;
        the device record stays. An unknown id is not an error (upstream answers 204)."""
        require(principal, org_id, Permission.WRITE)
        async with self._writing() as session:
            device = await self._find(session, org_id, device_id)
            if device is None or device.external_id is None:
                return
            for name, value in CONFIG_COLUMNS.items():
                setattr(device, name, value)
            device.state = 0
            links = list(await session.scalars(select(DeviceChannel).where(DeviceChannel.device_id == device.id)))
            for link in links:
                await session.delete(link)
            events.record(session, "config.removed", org_id=org_id, device_id=device_id, actor=principal.email)

    # --- channels -----------------------------------------------------------------------------

    async def create_channel(self, principal: Principal, org_id: str, name: str, metadata: dict[str, Any]) -> Channel:
        require(principal, org_id, Permission.WRITE)
        async with self._writing() as session:
            await require_org(session, org_id)
            channel = Channel(org_id=org_id, name=name, metadata_=metadata)
            session.add(channel)
            await session.flush()
            events.record(session, "channel.created", org_id=org_id, actor=principal.email, channel_id=channel.id, name=name)
            return channel

    async def get_channel(self, principal: Principal, org_id: str, channel_id: str) -> Channel:
        require(principal, org_id, Permission.READ)
        async with self._sessions() as session:
            return await self._load_channel(session, org_id, channel_id)

    async def list_channels(
        self, principal: Principal, org_id: str, *, name: str | None, offset: int, limit: int
    ) -> tuple[int, list[Channel]]:
        require(principal, org_id, Permission.READ)
        query = select(Channel).where(Channel.org_id == org_id)
        if name:
            query = query.where(func.lower(Channel.name).contains(name.lower(), autoescape=True))
        async with self._sessions() as session:
            await require_org(session, org_id)
            total = await session.scalar(select(func.count()).select_from(query.subquery()))
            rows = await session.scalars(query.order_by(Channel.created_at, Channel.id).offset(offset).limit(limit))
            return int(total or 0), list(rows)

    async def update_channel(
        self, principal: Principal, org_id: str, channel_id: str, *, name: str | None, metadata: dict[str, Any] | None
    ) -> Channel:
        require(principal, org_id, Permission.WRITE)
        async with self._writing() as session:
            channel = await self._load_channel(session, org_id, channel_id)
            if name is not None:
                channel.name = name
            if metadata is not None:
                channel.metadata_ = metadata
            events.record(session, "channel.updated", org_id=org_id, actor=principal.email, channel_id=channel_id)
            return channel

    async def delete_channel(self, principal: Principal, org_id: str, channel_id: str) -> None:
        require(principal, org_id, Permission.WRITE)
        async with self._writing() as session:
            channel = await self._load_channel(session, org_id, channel_id)
            await session.delete(channel)
            events.record(session, "channel.deleted", org_id=org_id, actor=principal.email, channel_id=channel_id)

    # --- helpers ------------------------------------------------------------------------------

    def _writing(self) -> writing:
        return writing(self._sessions, "the change conflicts with an existing device (duplicate external_id or endpoint)")

    def _apply_secrets(self, device: Device, external_key: str | None, client_key: str | None) -> None:
        if external_key is not None:
            device.external_key_digest = digest_secret(external_key)
        if client_key is not None:
            device.client_key_sealed = self._sealer.seal(client_key, CLIENT_KEY_PURPOSE) if client_key else None

    @staticmethod
    def _check_state(state: int) -> None:
        if state not in STATES:
            raise InvalidInput("state must be 0 (inactive) or 1 (active)", field="state")

    @staticmethod
    def _filtered(query: Select[Any], flt: DeviceFilter) -> Select[Any]:
        if flt.name:
            query = query.where(func.lower(Device.name).contains(flt.name.lower(), autoescape=True))
        for column in ("state", "external_id", "endpoint", "mac_address", "serial_number", "imei"):
            value = getattr(flt, column)
            if value is not None:
                query = query.where(getattr(Device, column) == value)
        if flt.has_config is not None:
            query = query.where(Device.external_id.is_not(None) if flt.has_config else Device.external_id.is_(None))
        if flt.channel_id:
            query = query.where(
                Device.id.in_(select(DeviceChannel.device_id).where(DeviceChannel.channel_id == flt.channel_id))
            )
        return query

    @staticmethod
    async def _find(session: AsyncSession, org_id: str, device_id: str) -> Device | None:
        device = await session.get(Device, device_id)
        return device if device is not None and device.org_id == org_id else None

    async def _load(self, session: AsyncSession, org_id: str, device_id: str, *, config: bool = False) -> Device:
        device = await self._find(session, org_id, device_id)
        if device is None or (config and device.external_id is None):
            raise NotFound("config not found" if config else "device not found")
        return device

    @staticmethod
    async def _load_channel(session: AsyncSession, org_id: str, channel_id: str) -> Channel:
        channel = await session.get(Channel, channel_id)
        if channel is None or channel.org_id != org_id:
            raise NotFound("channel not found")
        return channel

    @staticmethod
    async def _check_unique(session: AsyncSession, columns: dict[str, Any], device_id: str | None = None) -> None:
        for column in UNIQUE_COLUMNS:
            value = columns.get(column)
            if value is None:
                continue
            query = select(Device.id).where(getattr(Device, column) == value)
            if device_id:
                query = query.where(Device.id != device_id)
            if await session.scalar(query) is not None:
                raise Conflict(f"{column} '{value}' is already in use", field=column)

    async def _records(self, session: AsyncSession, devices: list[Device]) -> list[DeviceRecord]:
        ids = [device.id for device in devices]
        links = await self._links_for(session, ids)
        last_bootstrap: dict[str, datetime] = {}
        if ids:
            rows = await session.execute(
                select(Event.device_id, func.max(Event.created_at))
                .where(Event.device_id.in_(ids), Event.kind == events.BOOTSTRAP_SUCCEEDED)
                .group_by(Event.device_id)
            )
            last_bootstrap = dict(rows.tuples().all())
        attempts = await self._last_attempts(session, ids)
        return [
            DeviceRecord(device, links.get(device.id, []), last_bootstrap.get(device.id), attempts.get(device.id))
            for device in devices
        ]

    @staticmethod
    async def _last_attempts(session: AsyncSession, device_ids: list[str]) -> dict[str, LastBootstrap]:
        """The newest bootstrap outcome event of each device, in one query."""
        if not device_ids:
            return {}
        newest = (
            select(func.max(Event.id))
            .where(Event.device_id.in_(device_ids), Event.kind.in_(BOOTSTRAP_OUTCOME_KINDS))
            .group_by(Event.device_id)
        )
        rows = await session.scalars(select(Event).where(Event.id.in_(newest)))
        return {
            event.device_id: LastBootstrap(event.created_at, event.outcome, event.reason, event.detail.get("door"))
            for event in rows
            if event.device_id is not None
        }

    @staticmethod
    async def _links_for(session: AsyncSession, device_ids: list[str]) -> dict[str, list[ChannelLink]]:
        if not device_ids:
            return {}
        rows = await session.execute(
            select(DeviceChannel.device_id, DeviceChannel.connected, Channel)
            .join(Channel, Channel.id == DeviceChannel.channel_id)
            .where(DeviceChannel.device_id.in_(device_ids))
            .order_by(Channel.name, Channel.id)
        )
        links: dict[str, list[ChannelLink]] = {}
        for device_id, connected, channel in rows:
            links.setdefault(device_id, []).append(ChannelLink(channel, connected))
        return links

    @staticmethod
    async def _replace_channels(session: AsyncSession, device: Device, channel_ids: list[str]) -> tuple[list[str], list[str]]:
        wanted = list(dict.fromkeys(channel_ids))
        if any(not channel_id for channel_id in wanted):
            raise InvalidInput("channel ids must not be empty", field="channels")
        if wanted:
            found = set(await session.scalars(select(Channel.id).where(Channel.org_id == device.org_id, Channel.id.in_(wanted))))
            missing = [channel_id for channel_id in wanted if channel_id not in found]
            if missing:
                raise NotFound(f"channel not found: {', '.join(missing)}")
        current = {link.channel_id: link for link in await session.scalars(select(DeviceChannel).where(DeviceChannel.device_id == device.id))}
        removed = sorted(set(current) - set(wanted))
        added = [channel_id for channel_id in wanted if channel_id not in current]
        for channel_id in removed:
            await session.delete(current[channel_id])
        for channel_id in added:
            session.add(DeviceChannel(device_id=device.id, channel_id=channel_id, connected=device.state == 1))
        await session.flush()
        return added, removed
