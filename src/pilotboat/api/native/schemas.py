"""Request and response bodies of the native API (``/api/v1``). Unknown fields are refused."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pilotboat.model.management_server import DEFAULT_ID
from pilotboat.model.roles import Permission, Role
from pilotboat.services.devices import DeviceRecord
from pilotboat.services.event_feed import event_json
from pilotboat.store.tables import Channel, Event


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StrictPatch(Strict):
    """A change: any field may be left out, none may be null."""

    @field_validator("*")
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        if value is None:  # only an explicit null reaches here
            raise ValueError("may be omitted, but not null")
        return value


class TokenOut(BaseModel):
    access_token: str
    token_type: str = "bearer"
    expires_in: int


class OrgIn(Strict):
    name: str = Field(min_length=1, max_length=128, pattern=r"\S")


class OrgOut(BaseModel):
    id: str
    name: str
    role: Role | None = None
    cert_validity_days: int
    keep_device_keys: bool
    created_at: datetime


class OrgPatch(Strict):
    """The organisation's credential policy."""

    cert_validity_days: int | None = Field(default=None, ge=1, le=3650, description="Validity of device certificates")
    keep_device_keys: bool | None = Field(
        default=None, description="Keep a sealed copy of server-generated device keys, for bootstrap provisioning"
    )


class UserIn(Strict):
    email: str = Field(min_length=3, max_length=320, pattern=r"^[^@\s]+@[^@\s]+$")
    password: str = Field(min_length=8, max_length=1024)
    role: Role = Role.MEMBER


class MembershipIn(Strict):
    role: Role | None = None
    grants: list[Permission] | None = Field(
        default=None, max_length=8, description="Permissions granted on top of the role (device_management_server)"
    )


class MemberOut(BaseModel):
    id: str
    email: str
    role: Role
    grants: list[Permission] = []
    is_system_admin: bool


class ApiKeyIn(Strict):
    name: str = Field(min_length=1, max_length=128)
    org_id: str | None = Field(default=None, description="Restrict the key to this organisation.")
    expires_in_days: int | None = Field(default=None, ge=1, le=3650)


class ApiKeyOut(BaseModel):
    id: str
    name: str
    org_id: str | None
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None


class ApiKeyCreated(ApiKeyOut):
    key: str = Field(description="The API key; shown only in this response.")


class ChannelIn(Strict):
    name: str = Field(default="", max_length=256)
    metadata: dict[str, Any] = Field(default_factory=dict)


class ChannelPatch(Strict):
    name: str | None = Field(default=None, max_length=256)
    metadata: dict[str, Any] | None = None


class ChannelOut(BaseModel):
    id: str
    name: str
    metadata: dict[str, Any]
    created_at: datetime

    @classmethod
    def of(cls, channel: Channel) -> ChannelOut:
        return cls(id=channel.id, name=channel.name, metadata=channel.metadata_, created_at=channel.created_at)


class ChannelPage(BaseModel):
    total: int
    offset: int
    limit: int
    channels: list[ChannelOut]


class DeviceFields(Strict):
    name: str | None = Field(default=None, max_length=256)
    external_id: str | None = Field(default=None, min_length=1, max_length=256)
    external_key: str | None = Field(default=None, min_length=1, max_length=1024, description="Stored hashed.")
    endpoint: str | None = Field(default=None, min_length=1, max_length=256, description="LwM2M endpoint name.")
    mac_address: str | None = Field(default=None, max_length=64)
    serial_number: str | None = Field(default=None, max_length=128)
    imei: str | None = Field(default=None, max_length=32)
    alias: str | None = Field(default=None, max_length=256)
    content: str | None = Field(default=None, max_length=65536)
    client_cert: str | None = Field(default=None, max_length=65536)
    ca_cert: str | None = Field(default=None, max_length=65536)

    @field_validator("name", "content", "client_cert", "ca_cert")
    @classmethod
    def _not_null(cls, value: str | None) -> str | None:
        if value is None:  # only an explicit null reaches here; these columns cannot be NULL
            raise ValueError("may be omitted, but not null")
        return value

    def columns(self) -> dict[str, Any]:
        return self.model_dump(exclude_unset=True, exclude={"external_key", "client_key", "state", "channels"})


class DeviceIn(DeviceFields):
    client_key: str | None = Field(default=None, max_length=65536, description="Sealed at rest.")
    state: int = Field(default=0, ge=0, le=1, strict=True)
    channels: list[str] | None = None


class StateIn(Strict):
    state: int = Field(strict=True, description="0 inactive (disconnected), 1 active (connected to its channels)")


class ChannelsIn(Strict):
    channels: list[str]


class ChannelLinkOut(BaseModel):
    id: str
    name: str
    metadata: dict[str, Any]
    connected: bool


class LastBootstrapOut(BaseModel):
    at: datetime
    outcome: str = Field(description="ok, or why the attempt did not complete: refused, failed, timeout, superseded")
    reason: str | None
    door: str | None = Field(description="Where the device asked, e.g. magistrala, mainflux, sealed or the LwM2M bootstrap server")


class DeviceOut(BaseModel):
    id: str
    name: str
    external_id: str | None
    endpoint: str | None
    mac_address: str | None
    serial_number: str | None
    imei: str | None
    alias: str | None
    content: str
    client_cert: str
    ca_cert: str
    has_client_key: bool
    state: int
    channels: list[ChannelLinkOut]
    management_server_id: str = Field(description="The management server of its next bootstrap; 'default' for this deployment's own")
    last_bootstrap_at: datetime | None
    last_bootstrap: LastBootstrapOut | None = Field(description="The newest bootstrap attempt, successful or not")
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, record: DeviceRecord) -> DeviceOut:
        device = record.device
        return cls(
            id=device.id, name=device.name, external_id=device.external_id, endpoint=device.endpoint,
            mac_address=device.mac_address, serial_number=device.serial_number, imei=device.imei, alias=device.alias,
            content=device.content, client_cert=device.client_cert, ca_cert=device.ca_cert,
            has_client_key=device.client_key_sealed is not None, state=device.state,
            channels=[
                ChannelLinkOut(id=link.channel.id, name=link.channel.name, metadata=link.channel.metadata_, connected=link.connected)
                for link in record.channels
            ],
            management_server_id=device.management_server_id or DEFAULT_ID,
            last_bootstrap_at=record.last_bootstrap_at,
            last_bootstrap=LastBootstrapOut(**vars(record.last_bootstrap)) if record.last_bootstrap else None,
            created_at=device.created_at, updated_at=device.updated_at,
        )


class DeviceCreated(DeviceOut):
    client_secret: str = Field(description="The device's client secret; shown only in this response.")


class DevicePage(BaseModel):
    total: int
    offset: int
    limit: int
    devices: list[DeviceOut]


class EventOut(BaseModel):
    id: int
    kind: str
    org_id: str | None
    device_id: str | None
    outcome: str
    reason: str | None
    actor: str | None
    detail: dict[str, Any]
    created_at: datetime

    @classmethod
    def of(cls, event: Event) -> EventOut:
        return cls.model_validate(event_json(event))  # the shape the event stream and webhooks send too


class EventPage(BaseModel):
    total: int
    offset: int
    limit: int
    events: list[EventOut]
