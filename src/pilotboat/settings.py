"""Pilotboat settings: one object, read from ``PILOTBOAT_*`` environment variables and CLI flags."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Environment variables holding secrets: removed from ``os.environ`` once read.
SECRET_ENV_VARS = ("PILOTBOAT_BOOTSTRAP_ENCRYPT_KEY", "PILOTBOAT_ADMIN_PASSWORD", "PILOTBOAT_MASTER_KEY")


class Settings(BaseSettings):
    """Every knob of a Pilotboat node. Field docs are shown by ``pilotboat serve --help``."""

    model_config = SettingsConfigDict(env_prefix="PILOTBOAT_", extra="ignore")

    data_dir: Path = Field(
        default=Path("pilotboat-data"),
        description="Folder for the SQLite database, the master key file and the first admin password.",
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL. Default: sqlite+aiosqlite:///<data_dir>/pilotboat.db. "
        "PostgreSQL: postgresql+asyncpg://user:pass@host/db.",
    )
    http_host: str = Field(default="127.0.0.1", description="Address the HTTP API listens on.")
    http_port: int = Field(default=8080, ge=0, le=65535, description="Port of the HTTP API.")
    admin_email: str | None = Field(default=None, description="Email of the first system administrator.")
    admin_password: SecretStr | None = Field(
        default=None,
        description="Password of the first system administrator (a random one is written to the data dir if unset).",
    )
    bootstrap_encrypt_key: SecretStr | None = Field(
        default=None,
        description="Service-wide AES key (16, 24 or 32 characters) for Magistrala/Mainflux secure bootstrap.",
    )
    master_key: SecretStr | None = Field(
        default=None,
        description=(
            "Base64 of 32 random bytes sealing secrets at rest; during a rotation 'NEW,OLD' (the first seals). "
            "Default: the key file master.key created in the data dir."
        ),
    )
    public_host: str = Field(
        default="127.0.0.1",
        description="Host name or address devices use to reach this deployment: the host of the default management server's URI.",
    )
    coap_host: str = Field(default="127.0.0.1", description="Address the CoAP (LwM2M) servers listen on.")
    bootstrap_port: int = Field(
        default=5783, ge=0, le=65535, description="UDP port of the LwM2M bootstrap server (plain CoAP); 0 switches it off.",
    )
    lwm2m_port: int = Field(
        default=5683, ge=1, le=65535, description="UDP port of the LwM2M management server (plain CoAP), written into the default definition.",
    )
    bootstrap_dtls_port: int = Field(
        default=5784, ge=0, le=65535, description="UDP port of the LwM2M bootstrap server over DTLS (PSK and X.509); 0 switches it off.",
    )
    lwm2m_dtls_port: int = Field(
        default=5684, ge=0, le=65535,
        description="UDP port of the LwM2M management server over DTLS, written into the default definition for devices with credentials; 0 switches it off.",
    )
    allow_nosec: bool = Field(
        default=True,
        description=(
            "Serve LwM2M over plain CoAP too (the bootstrap and LwM2M ports). Plain CoAP authenticates no device: "
            "convenient for a first try, unsafe in production; false keeps devices on DTLS only."
        ),
    )
    dtls_certificate: Path | None = Field(
        default=None,
        description="PEM certificate chain (leaf first, ECDSA P-256) the DTLS servers present. Default: a certificate "
        "for PILOTBOAT_PUBLIC_HOST created on first start and kept (key sealed) in the database.",
    )
    dtls_private_key: Path | None = Field(
        default=None, description="PEM private key of PILOTBOAT_DTLS_CERTIFICATE (unencrypted PKCS#8 or SEC1).",
    )
    dtls_max_sessions: int = Field(
        default=10_000, ge=1, description="DTLS sessions (handshakes and established) one port keeps; the least recently active goes first.",
    )
    dtls_idle_timeout: float = Field(
        default=600.0, gt=0, le=86400, description="Seconds without traffic after which an established DTLS session is dropped.",
    )
    certificate_renewal_days: int = Field(
        default=30, ge=0, le=3650,
        description="A device bootstrapping in certificate mode gets a new management certificate when its current one "
        "expires within this many days.",
    )
    http_tls_certificate: Path | None = Field(
        default=None, description="PEM certificate chain for serving the HTTP API over TLS (with PILOTBOAT_HTTP_TLS_PRIVATE_KEY).",
    )
    http_tls_private_key: Path | None = Field(
        default=None, description="PEM private key of PILOTBOAT_HTTP_TLS_CERTIFICATE.",
    )
    bootstrap_request_timeout: float = Field(
        default=10.0, gt=0, le=300,
        description="Seconds the bootstrap server waits for a device's answer to each request (CoAP retransmissions included).",
    )
    bootstrap_max_sessions: int = Field(
        default=10_000, ge=1, description="Bootstrap sessions running at once; further requests are answered 5.03 with Max-Age.",
    )
    lwm2m_listen: bool = Field(
        default=True, description="Run the LwM2M management server on the LwM2M port (off: devices are sent to another deployment's).",
    )
    registration_grace: float = Field(
        default=30.0, ge=0, le=3600, description="Seconds a registration outlives its lifetime before it expires.",
    )
    registration_hold_seconds: float = Field(
        default=60.0, gt=0, le=3600,
        description="Seconds an endpoint is on hold after more than 10 Register/Update requests within 10 s.",
    )
    lwm2m_request_timeout: float = Field(
        default=10.0, gt=0, le=300,
        description="Default seconds a device operation (read, write…) waits for the device's answer; callers may ask for up to 300.",
    )
    lwm2m_queue_awake_seconds: float = Field(
        default=93.0, gt=0, le=86400,
        description="Seconds a queue-mode device stays reachable after its Register or Update; later requests wait for its next one.",
    )
    lwm2m_queue_request_ttl: float = Field(
        default=86400.0, gt=0, le=7 * 86400, description="Seconds a request held for a sleeping queue-mode device waits before it expires.",
    )
    lwm2m_queue_per_device: int = Field(
        default=32, ge=1, le=10_000, description="Requests held at most per sleeping queue-mode device (more: 429).",
    )
    lwm2m_queue_total: int = Field(
        default=100_000, ge=1, description="Requests held at most for all sleeping queue-mode devices of this node (more: 503).",
    )
    event_stream_max: int = Field(
        default=1000, ge=1, description="Live event streams (SSE) one node serves at once; further ones are answered 503.",
    )
    event_stream_heartbeat: float = Field(
        default=15.0, gt=0, le=300, description="Seconds of quiet after which a live event stream sends a keep-alive comment.",
    )
    webhook_timeout: float = Field(
        default=10.0, gt=0, le=300, description="Seconds a webhook delivery (one POST) may take before it counts as failed.",
    )
    webhook_backoff_initial: float = Field(
        default=1.0, gt=0, le=3600, description="Seconds before the first retry of a failed webhook delivery; doubled after each failure.",
    )
    webhook_backoff_max: float = Field(
        default=300.0, gt=0, le=86400, description="Longest pause between two attempts of a failing webhook delivery.",
    )
    webhook_max_failures: int = Field(
        default=20, ge=1, le=100_000, description="Failed deliveries in a row after which a webhook is disabled.",
    )
    webhook_max_failing_seconds: float = Field(
        default=86400.0, gt=0, description="Seconds of failing deliveries (without a success) after which a webhook is disabled.",
    )
    webhook_delivery_log: int = Field(
        default=200, ge=1, le=100_000, description="Delivery attempts kept in each webhook's delivery log (the newest).",
    )
    webhook_allow_private: bool = Field(
        default=False,
        description="Let webhooks reach loopback, private and link-local addresses (off: such URLs are refused, and so are hosts resolving to them).",
    )
    token_ttl_seconds: int = Field(default=3600, ge=1, le=86400 * 30, description="Lifetime of access tokens.")
    max_body_bytes: int = Field(default=1_048_576, ge=1024, description="Largest accepted HTTP request body.")
    log_level: str = Field(default="INFO", description="Log level: DEBUG, INFO, WARNING, ERROR.")
    log_format: Literal["json", "text"] = Field(default="json", description="Log output format.")

    @field_validator("log_level")
    @classmethod
    def _upper_level(cls, value: str) -> str:
        value = value.upper()
        if value not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return value

    @field_validator("admin_password")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and 0 < len(value.get_secret_value()) < 8:
            raise ValueError("must have at least 8 characters")
        return value

    @model_validator(mode="after")
    def _pairs(self) -> Settings:
        for certificate, key, name in (
            (self.dtls_certificate, self.dtls_private_key, "DTLS"), (self.http_tls_certificate, self.http_tls_private_key, "HTTP TLS"),
        ):
            if (certificate is None) != (key is None):
                raise ValueError(f"the {name} certificate and private key are set together or not at all")
        return self

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'pilotboat.db').resolve()}"


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment (plus CLI overrides) and scrub secrets from ``os.environ``.

    Removing the secret variables mirrors upstream Magistrala, which unsets its bootstrap key after
    reading it, so child processes and crash dumps of the environment do not carry it.
    """
    clean = {key: value for key, value in overrides.items() if value is not None}
    settings = Settings(**clean)
    for name in SECRET_ENV_VARS:
        os.environ.pop(name, None)
    return settings
