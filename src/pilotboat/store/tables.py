"""SQL tables of record (SQLAlchemy 2 declarative). Schema changes go through Alembic migrations."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


def new_id() -> str:
    return str(uuid.uuid4())


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC timestamps on every backend (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return value.astimezone(UTC) if value is not None and value.tzinfo else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


UUID = String(36)
Timestamp = UTCDateTime()


class Organisation(Base):
    __tablename__ = "organisations"

    id: Mapped[str] = mapped_column(UUID, primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    #: Validity of device certificates issued by the organisation's CA.
    cert_validity_days: Mapped[int] = mapped_column(Integer, default=365)
    #: Keep a sealed copy of server-generated device keys (for bootstrap provisioning).
    keep_device_keys: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)


class User(Base):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(UUID, primary_key=True, default=new_id)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    is_system_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)


class Membership(Base):
    __tablename__ = "memberships"

    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organisations.id", ondelete="CASCADE"), primary_key=True)
    role: Mapped[str] = mapped_column(String(16))
    #: Permissions granted on top of the role (``model.roles.GRANTABLE``).
    grants: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    org_id: Mapped[str | None] = mapped_column(ForeignKey("organisations.id", ondelete="CASCADE"), nullable=True)
    secret_digest: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)


class Channel(Base):
    __tablename__ = "channels"

    id: Mapped[str] = mapped_column(UUID, primary_key=True, default=new_id)
    org_id: Mapped[str] = mapped_column(ForeignKey("organisations.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(256), default="")
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow, onupdate=utcnow)


class Device(Base):
    """A device (the Magistrala "client"); its bootstrap config lives in the ``external_*`` columns."""

    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(UUID, primary_key=True, default=new_id)
    org_id: Mapped[str] = mapped_column(ForeignKey("organisations.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(256), default="")
    secret_sealed: Mapped[str] = mapped_column(Text)
    external_id: Mapped[str | None] = mapped_column(String(256), unique=True, nullable=True)
    external_key_digest: Mapped[str | None] = mapped_column(String(128), nullable=True)
    endpoint: Mapped[str | None] = mapped_column(String(256), unique=True, nullable=True)
    mac_address: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    serial_number: Mapped[str | None] = mapped_column(String(128), nullable=True, index=True)
    imei: Mapped[str | None] = mapped_column(String(32), nullable=True)
    alias: Mapped[str | None] = mapped_column(String(256), nullable=True)
    content: Mapped[str] = mapped_column(Text, default="")
    client_cert: Mapped[str] = mapped_column(Text, default="")
    client_key_sealed: Mapped[str | None] = mapped_column(Text, nullable=True)
    ca_cert: Mapped[str] = mapped_column(Text, default="")
    state: Mapped[int] = mapped_column(Integer, default=0)
    #: The management server the device is sent to at bootstrap; NULL is the deployment's default.
    #: No ON DELETE action: SQLite can add a column's reference only inline, where its schema reflection
    #: does not see actions. Deleting a definition clears its assignments in the same transaction.
    management_server_id: Mapped[str | None] = mapped_column(ForeignKey("management_servers.id"), nullable=True, index=True)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow, onupdate=utcnow)


class ManagementServer(Base):
    """A management server an organisation's devices can be sent to (``model.management_server``)."""

    __tablename__ = "management_servers"
    __table_args__ = (UniqueConstraint("org_id", "address", "port", name="uq_management_servers_org_address_port"),)

    id: Mapped[str] = mapped_column(UUID, primary_key=True, default=new_id)
    org_id: Mapped[str] = mapped_column(ForeignKey("organisations.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    #: Host name (lower case) or IP address (compressed form), without brackets.
    address: Mapped[str] = mapped_column(String(253))
    port: Mapped[int] = mapped_column(Integer)
    uri_scheme: Mapped[str] = mapped_column(String(8))
    security_mode: Mapped[int] = mapped_column(Integer)
    short_server_id: Mapped[int] = mapped_column(Integer)
    lifetime: Mapped[int] = mapped_column(Integer)
    binding: Mapped[str] = mapped_column(String(8))
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow, onupdate=utcnow)


class DeviceChannel(Base):
    """A channel in a device's config; ``connected`` is true while the device is active (state 1)."""

    __tablename__ = "device_channels"

    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    channel_id: Mapped[str] = mapped_column(ForeignKey("channels.id", ondelete="CASCADE"), primary_key=True, index=True)
    connected: Mapped[bool] = mapped_column(Boolean, default=False)


class CertificateAuthority(Base):
    """An organisation's issuing CA. One is active (it signs); the others stay trusted until deleted."""

    __tablename__ = "certificate_authorities"

    id: Mapped[str] = mapped_column(UUID, primary_key=True, default=new_id)
    org_id: Mapped[str] = mapped_column(ForeignKey("organisations.id", ondelete="CASCADE"), index=True)
    source: Mapped[str] = mapped_column(String(16))  # generated | imported
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    subject: Mapped[str] = mapped_column(String(1024))
    fingerprint: Mapped[str] = mapped_column(String(64), unique=True)
    #: The issuing certificate, and its parents up to the root (root last; may be empty).
    certificate_pem: Mapped[str] = mapped_column(Text)
    parents_pem: Mapped[str] = mapped_column(Text, default="")
    key_sealed: Mapped[str] = mapped_column(Text)
    root_key_sealed: Mapped[str | None] = mapped_column(Text, nullable=True)
    not_after: Mapped[datetime] = mapped_column(Timestamp)
    #: Bumped on every revocation, so that each CRL content has its own number.
    crl_number: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)


class DeviceCertificate(Base):
    """A certificate issued to a device; its id is the GUID in the certificate (serial and SAN)."""

    __tablename__ = "device_certificates"

    id: Mapped[str] = mapped_column(UUID, primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organisations.id", ondelete="CASCADE"), index=True)
    #: Kept (NULL) when the device is deleted: its certificates are revoked, and the CRL must list them.
    device_id: Mapped[str | None] = mapped_column(ForeignKey("devices.id", ondelete="SET NULL"), nullable=True, index=True)
    ca_id: Mapped[str] = mapped_column(ForeignKey("certificate_authorities.id", ondelete="CASCADE"), index=True)
    serial: Mapped[str] = mapped_column(String(64))
    common_name: Mapped[str] = mapped_column(String(256))
    fingerprint: Mapped[str] = mapped_column(String(64), unique=True)
    certificate_pem: Mapped[str] = mapped_column(Text)
    key_source: Mapped[str] = mapped_column(String(16))  # server | csr
    key_sealed: Mapped[str | None] = mapped_column(Text, nullable=True)
    not_before: Mapped[datetime] = mapped_column(Timestamp)
    not_after: Mapped[datetime] = mapped_column(Timestamp, index=True)
    revoked_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)
    revocation_reason: Mapped[str | None] = mapped_column(String(32), nullable=True)
    #: bootstrap (factory credential, bootstrap DTLS port) | management (management DTLS port).
    purpose: Mapped[str] = mapped_column(String(16), default="bootstrap", server_default="bootstrap")
    #: issued (written at a bootstrap, not used yet) | active.
    state: Mapped[str] = mapped_column(String(16), default="active", server_default="active")
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)


class PskIdentity(Base):
    """A device's pre-shared key; the identity is unique in the deployment (DTLS looks it up alone)."""

    __tablename__ = "psk_identities"

    id: Mapped[str] = mapped_column(UUID, primary_key=True, default=new_id)
    identity: Mapped[str] = mapped_column(String(128), unique=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organisations.id", ondelete="CASCADE"), index=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), index=True)
    key_sealed: Mapped[str] = mapped_column(Text)
    key_length: Mapped[int] = mapped_column(Integer)
    source: Mapped[str] = mapped_column(String(16))  # generated | imported
    #: bootstrap (factory credential, bootstrap DTLS port) | management (management DTLS port).
    purpose: Mapped[str] = mapped_column(String(16), default="bootstrap", server_default="bootstrap")
    #: issued (written at a bootstrap, not used yet) | active.
    state: Mapped[str] = mapped_column(String(16), default="active", server_default="active")
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)


class DtlsServerKey(Base):
    """The key pair the deployment's DTLS servers present when no certificate is configured: created
    once (one row per id), so that every node presents the same one."""

    __tablename__ = "dtls_server_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    common_name: Mapped[str] = mapped_column(String(253))
    fingerprint: Mapped[str] = mapped_column(String(64))
    #: The certificate chain, leaf first.
    certificate_pem: Mapped[str] = mapped_column(Text)
    key_sealed: Mapped[str] = mapped_column(Text)
    not_after: Mapped[datetime] = mapped_column(Timestamp)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)


class TrustedCertificate(Base):
    """A CA certificate of the deployment's trust store (besides every organisation's own CAs)."""

    __tablename__ = "trusted_certificates"

    id: Mapped[str] = mapped_column(UUID, primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(256), default="")
    subject: Mapped[str] = mapped_column(String(1024))
    fingerprint: Mapped[str] = mapped_column(String(64), unique=True)
    certificate_pem: Mapped[str] = mapped_column(Text)
    not_after: Mapped[datetime] = mapped_column(Timestamp)
    added_by: Mapped[str] = mapped_column(String(320), default="")
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)


class Event(Base):
    __tablename__ = "events"
    __table_args__ = (Index("ix_events_org_time", "org_id", "id"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    org_id: Mapped[str | None] = mapped_column(UUID, nullable=True)
    device_id: Mapped[str | None] = mapped_column(UUID, nullable=True, index=True)
    kind: Mapped[str] = mapped_column(String(64), index=True)
    outcome: Mapped[str] = mapped_column(String(16), default="ok")
    reason: Mapped[str | None] = mapped_column(String(256), nullable=True)
    actor: Mapped[str | None] = mapped_column(String(320), nullable=True)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow, index=True)


class DirectoryEntry(Base):
    """A device's entry in the device directory (Pelion style): created by its first LwM2M
    registration, then updated by every registration, update that changes something, and end. The
    device keeps its id (``devices.id``) whatever endpoint name it registers with later."""

    __tablename__ = "device_directory"

    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organisations.id", ondelete="CASCADE"), index=True)
    #: The endpoint name of the first registration.
    first_endpoint: Mapped[str] = mapped_column(String(256))
    endpoint: Mapped[str] = mapped_column(String(256))
    #: registered | deregistered | expired | replaced
    status: Mapped[str] = mapped_column(String(16))
    registration_id: Mapped[str] = mapped_column(String(64))
    registrations: Mapped[int] = mapped_column(Integer, default=1)
    first_registered_at: Mapped[datetime] = mapped_column(Timestamp)
    last_registered_at: Mapped[datetime] = mapped_column(Timestamp)
    last_updated_at: Mapped[datetime] = mapped_column(Timestamp)
    ended_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)
    #: "host:port" the device last registered or updated from.
    address: Mapped[str] = mapped_column(String(64))
    lwm2m_version: Mapped[str] = mapped_column(String(8))
    binding: Mapped[str] = mapped_column(String(8))
    queue_mode: Mapped[bool] = mapped_column(Boolean, default=False)
    lifetime: Mapped[int] = mapped_column(Integer)
    #: Object and instance links, e.g. ["/1/0", "/3/0", "/3303/0"].
    objects: Mapped[list[str]] = mapped_column(JSON, default=list)
    content_formats: Mapped[list[int]] = mapped_column(JSON, default=list)


class Observation(Base):
    """An observation an application asked for: kept so that it is set up again whenever the device
    registers anew."""

    __tablename__ = "observations"
    __table_args__ = (UniqueConstraint("device_id", "path", name="uq_observations_device_path"),)

    id: Mapped[str] = mapped_column(UUID, primary_key=True, default=new_id)
    org_id: Mapped[str] = mapped_column(ForeignKey("organisations.id", ondelete="CASCADE"), index=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), index=True)
    path: Mapped[str] = mapped_column(String(64))
    #: Write-Attributes sent before observing (pmin, pmax, gt, lt, st), may be empty.
    attributes: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_by: Mapped[str] = mapped_column(String(320), default="")
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)


class Webhook(Base):
    """An organisation's webhook: events after ``cursor`` are POSTed to ``url``, signed with its secret."""

    __tablename__ = "webhooks"

    id: Mapped[str] = mapped_column(UUID, primary_key=True, default=new_id)
    org_id: Mapped[str] = mapped_column(ForeignKey("organisations.id", ondelete="CASCADE"), index=True)
    url: Mapped[str] = mapped_column(String(2048))
    secret_sealed: Mapped[str] = mapped_column(Text)
    #: Event kinds (or prefixes ending in ".") delivered; empty: all.
    kinds: Mapped[list[str]] = mapped_column(JSON, default=list)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    #: Id of the last event delivered (or skipped by the kinds filter).
    cursor: Mapped[int] = mapped_column(BigInteger, default=0)
    consecutive_failures: Mapped[int] = mapped_column(Integer, default=0)
    #: When the current run of failed deliveries began (None while deliveries succeed).
    failing_since: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)
    disabled_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)
    disabled_reason: Mapped[str | None] = mapped_column(String(256), nullable=True)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow, onupdate=utcnow)


class WebhookDelivery(Base):
    """One delivery attempt of a batch of events to a webhook (the delivery log)."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_webhook_id_id", "webhook_id", "id"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    webhook_id: Mapped[str] = mapped_column(ForeignKey("webhooks.id", ondelete="CASCADE"))
    first_event_id: Mapped[int] = mapped_column(BigInteger)
    last_event_id: Mapped[int] = mapped_column(BigInteger)
    events: Mapped[int] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer)
    #: pending (being sent) | delivered | failed
    outcome: Mapped[str] = mapped_column(String(16))
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(String(256), nullable=True)
    duration_ms: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)


__all__ = [
    "ApiKey",
    "Base",
    "CertificateAuthority",
    "Channel",
    "Device",
    "DeviceCertificate",
    "DeviceChannel",
    "DirectoryEntry",
    "DtlsServerKey",
    "Event",
    "ManagementServer",
    "Membership",
    "Observation",
    "Organisation",
    "PskIdentity",
    "TrustedCertificate",
    "User",
    "Webhook",
    "WebhookDelivery",
    "new_id",
    "utcnow",
]
