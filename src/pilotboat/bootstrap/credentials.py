"""Management-server credentials written to a device at its bootstrap, created in the transaction of
the bootstrap decision.

PSK mode: a new identity and key every time (the device's older issued, never used ones are deleted).
Certificate mode: a new certificate from the organisation's CA, unless the device's current management
certificate (whose key the server holds) stays valid beyond the renewal window; then that one again.
Either way a failed bootstrap leaves at most one issued credential per kind behind.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import and_, select
from sqlalchemy.ext.asyncio import AsyncSession

from pilotboat.bootstrap.plan import PlanRefused
from pilotboat.model.credential import CredentialState, Purpose
from pilotboat.security.sealing import Sealer
from pilotboat.services import events
from pilotboat.services.authorities import NO_CA, AuthorityService
from pilotboat.services.certificates import DEVICE_KEY_PURPOSE, new_certificate, revoke_where
from pilotboat.services.errors import Unavailable
from pilotboat.services.psks import issue_management_psk
from pilotboat.store.tables import CertificateAuthority, Device, DeviceCertificate, Organisation, utcnow

ISSUED_EVENT = "credential.issued"
SUPERSEDED = "superseded"


@dataclass(frozen=True)
class Provisioned:
    """Security object resources 3, 4 and 5 for one management server account."""

    identity: bytes
    server_public_key: bytes
    secret_key: bytes

    def __repr__(self) -> str:  # keeps the secret key out of logs and tracebacks
        return f"Provisioned(identity={len(self.identity)} bytes)"


def _private_key_der(key_pem: bytes) -> bytes:
    key = serialization.load_pem_private_key(key_pem, password=None)
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


class ManagementCredentials:
    def __init__(self, sealer: Sealer, authorities: AuthorityService, renewal: timedelta) -> None:
        self._sealer = sealer
        self._authorities = authorities
        self._renewal = renewal

    async def psk(self, session: AsyncSession, device: Device, *, actor: str) -> Provisioned:
        """A new management PSK (identity and key) for ``device``, state "issued"."""
        created = await issue_management_psk(session, self._sealer, device)
        events.record(
            session, ISSUED_EVENT, org_id=device.org_id, device_id=device.id, actor=actor, credential_kind="psk",
            credential_id=created.record.id, identity=created.record.identity, purpose=Purpose.MANAGEMENT.value,
        )
        return Provisioned(created.record.identity.encode(), b"", created.key)

    async def certificate(self, session: AsyncSession, device: Device, server_anchor: bytes, *, actor: str) -> Provisioned:
        """The device's management certificate (DER), the server's trust anchor (DER) and the
        certificate's private key (DER PKCS#8): the current one when it is valid beyond the renewal
        window, else a new one, state "issued"."""
        mine = (DeviceCertificate.device_id == device.id, DeviceCertificate.purpose == Purpose.MANAGEMENT)
        current = await session.scalar(
            select(DeviceCertificate)
            .where(*mine, DeviceCertificate.revoked_at.is_(None), DeviceCertificate.key_sealed.is_not(None),
                   DeviceCertificate.not_after > utcnow() + self._renewal)
            .order_by(DeviceCertificate.created_at.desc(), DeviceCertificate.id).limit(1)
        )
        if current is not None:
            await revoke_where(session, *mine, DeviceCertificate.state == CredentialState.ISSUED,
                               DeviceCertificate.id != current.id, reason=SUPERSEDED)
            assert current.key_sealed is not None
            certificate_der = x509.load_pem_x509_certificate(current.certificate_pem.encode()).public_bytes(
                serialization.Encoding.DER
            )
            key_der = _private_key_der(self._sealer.open_bytes(current.key_sealed, DEVICE_KEY_PURPOSE))
            return Provisioned(certificate_der, server_anchor, key_der)
        found = (await session.execute(
            select(Organisation, CertificateAuthority)
            .outerjoin(CertificateAuthority, and_(
                CertificateAuthority.org_id == Organisation.id, CertificateAuthority.active.is_(True)
            ))
            .where(Organisation.id == device.org_id)
        )).first()
        if found is None or found[1] is None:
            raise PlanRefused(NO_CA)
        org, ca_row = found
        try:
            issued = new_certificate(
                session, self._sealer, self._authorities.load(ca_row), ca_row, org, device,
                purpose=Purpose.MANAGEMENT, state=CredentialState.ISSUED, keep_key=True,
            )
        except Unavailable as exc:
            raise PlanRefused(str(exc)) from None
        await revoke_where(session, *mine, DeviceCertificate.state == CredentialState.ISSUED,
                           DeviceCertificate.id != issued.record.id, reason=SUPERSEDED)
        assert issued.key is not None
        events.record(
            session, ISSUED_EVENT, org_id=device.org_id, device_id=device.id, actor=actor, credential_kind="certificate",
            credential_id=issued.record.id, purpose=Purpose.MANAGEMENT.value, not_after=issued.record.not_after.isoformat(),
        )
        key_der = issued.key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return Provisioned(issued.certificate.public_bytes(serialization.Encoding.DER), server_anchor, key_der)
