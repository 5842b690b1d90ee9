"""A node of the deployment in the test process (the running server's database and master key) to ask
the services the DTLS servers ask: who a peer is, and what a device gets at its bootstrap."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from credential_helpers import server_settings
from harness import ServerProcess
from pilotboat.model.credential import CredentialState, Purpose
from pilotboat.runtime import Runtime, build_runtime
from pilotboat.security import pki
from pilotboat.services.certificates import new_certificate
from pilotboat.services.container import Services
from pilotboat.services.psks import issue_management_psk
from pilotboat.store import database
from pilotboat.store.tables import CertificateAuthority, Device, DeviceCertificate, Organisation, PskIdentity

T = TypeVar("T")


def der(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.DER)


@dataclass
class Node:
    runtime: Runtime
    loop: asyncio.AbstractEventLoop

    @classmethod
    def start(cls, server: ServerProcess, **settings: Any) -> Node:
        return cls(build_runtime(server_settings(server).model_copy(update=settings)), asyncio.new_event_loop())

    def close(self) -> None:
        self.loop.run_until_complete(self.runtime.engine.dispose())
        self.loop.close()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coroutine)

    @property
    def services(self) -> Services:
        return self.runtime.services

    @property
    def sessions(self) -> async_sessionmaker[AsyncSession]:
        return database.session_factory(self.runtime.engine)

    # --- records the HTTP API does not make: what a bootstrap (or time) leaves behind --------------

    def issued_psk(self, device_id: str) -> tuple[str, bytes]:
        """A management PSK in state "issued", as a bootstrap writes it: (identity, key)."""
        async def make() -> tuple[str, bytes]:
            async with self.sessions.begin() as session:
                device = await session.get(Device, device_id)
                assert device is not None
                created = await issue_management_psk(session, self.runtime.services.keyring.sealer, device)
                return created.record.identity, created.key
        return self.run(make())

    def signed_certificate(
        self, device_id: str, *, purpose: Purpose = Purpose.MANAGEMENT, state: CredentialState = CredentialState.ISSUED,
        signed_at: datetime | None = None, days: int = 365,
    ) -> DeviceCertificate:
        """A certificate from the organisation's CA, on record (signed at ``signed_at``, valid ``days``)."""
        async def make() -> DeviceCertificate:
            services = self.runtime.services
            async with self.sessions.begin() as session:
                device = await session.get(Device, device_id)
                assert device is not None
                org = await session.get(Organisation, device.org_id)
                ca_row = await session.scalar(select(CertificateAuthority).where(
                    CertificateAuthority.org_id == device.org_id, CertificateAuthority.active.is_(True)))
                assert org is not None and ca_row is not None
                ca = services.authorities.load(ca_row)
                if signed_at is None:
                    issued = new_certificate(session, services.keyring.sealer, ca, ca_row, org, device, purpose=purpose,
                                             state=state, keep_key=True)
                    return issued.record
                guid = uuid.uuid4()
                certificate = pki.issue_device_certificate(
                    ca, pki.new_key().public_key(), device.endpoint or guid.urn, guid, timedelta(days=days), now=signed_at,
                )
                record = DeviceCertificate(
                    id=str(guid), org_id=org.id, device_id=device.id, ca_id=ca_row.id, serial=format(certificate.serial_number, "x"),
                    common_name=device.endpoint or guid.urn, fingerprint=pki.fingerprint(certificate),
                    certificate_pem=pki.certificate_pem(certificate), key_source="server", key_sealed=None,
                    not_before=certificate.not_valid_before_utc, not_after=certificate.not_valid_after_utc,
                    purpose=purpose.value, state=state.value,
                )
                session.add(record)
                return record
        return self.run(make())

    def certificate(self, certificate_id: str) -> DeviceCertificate:
        async def read() -> DeviceCertificate:
            async with self.sessions() as session:
                record = await session.get(DeviceCertificate, certificate_id)
                assert record is not None
                return record
        return self.run(read())

    def psks_of(self, device_id: str) -> list[PskIdentity]:
        async def read() -> list[PskIdentity]:
            async with self.sessions() as session:
                return list(await session.scalars(
                    select(PskIdentity).where(PskIdentity.device_id == device_id).order_by(PskIdentity.created_at)))
        return self.run(read())

    def certificates_of(self, device_id: str) -> list[DeviceCertificate]:
        async def read() -> list[DeviceCertificate]:
            async with self.sessions() as session:
                return list(await session.scalars(
                    select(DeviceCertificate).where(DeviceCertificate.device_id == device_id)
                    .order_by(DeviceCertificate.created_at)))
        return self.run(read())


def long_ago(days: int) -> datetime:
    return datetime.now(UTC) - timedelta(days=days)
