"""Device certificates issued by the organisation's CA: from a server-generated key or a caller's CSR."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from sqlalchemy import ColumnElement, and_, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from pilotboat.model.credential import CredentialState, Purpose, parse_purpose
from pilotboat.model.principal import Principal
from pilotboat.model.roles import Permission
from pilotboat.security import pki
from pilotboat.security.sealing import Sealer
from pilotboat.services import events
from pilotboat.services.access import require, require_org
from pilotboat.services.authorities import NO_CA, AuthorityService, chain_pem
from pilotboat.services.errors import Conflict, InvalidInput, NotFound, Unavailable
from pilotboat.services.transaction import writing
from pilotboat.store.tables import CertificateAuthority, Device, DeviceCertificate, Organisation, utcnow

DEVICE_KEY_PURPOSE = "device_certificate.key"
#: Reasons a caller may give for a revocation (RFC 5280 CRLReason, without removeFromCRL).
REASONS = frozenset(reason.name for reason in x509.ReasonFlags if reason is not x509.ReasonFlags.remove_from_crl)
STATUSES = ("active", "revoked", "expired")


@dataclass(frozen=True)
class IssuedCertificate:
    record: DeviceCertificate
    chain_pem: str
    #: The server-generated private key (PEM), returned once; None when issued from a CSR.
    private_key_pem: str | None


@dataclass(frozen=True)
class CertificateFilter:
    device_id: str | None = None
    status: str | None = None
    expiring_before: datetime | None = None
    offset: int = 0
    limit: int = 50


async def revoke_for_device(session: AsyncSession, device_id: str, reason: str = "cessation_of_operation") -> int:
    """Revoke every valid certificate of a device, in the caller's transaction (a deleted device's
    certificates must stay on the CRL). Returns how many were revoked."""
    return len(await revoke_where(session, DeviceCertificate.device_id == device_id, reason=reason))


async def revoke_where(session: AsyncSession, *conditions: ColumnElement[bool], reason: str) -> list[str]:
    """Revoke the valid certificates matching ``conditions`` in the caller's transaction, bumping
    their CAs' CRL numbers. Returns their ids."""
    found = list(await session.execute(
        select(DeviceCertificate.id, DeviceCertificate.ca_id).where(DeviceCertificate.revoked_at.is_(None), *conditions)
    ))
    if not found:
        return []
    ids = [certificate_id for certificate_id, _ in found]
    await session.execute(
        update(DeviceCertificate).where(DeviceCertificate.id.in_(ids)).values(revoked_at=utcnow(), revocation_reason=reason)
        .execution_options(synchronize_session="fetch")
    )
    await _bump_crl_numbers(session, {ca_id for _, ca_id in found})
    return ids


@dataclass(frozen=True)
class NewCertificate:
    """A certificate just signed, its record (added to the session) and the generated key (None for a CSR)."""

    record: DeviceCertificate
    certificate: x509.Certificate
    key: pki.PrivateKey | None


def new_certificate(
    session: AsyncSession, sealer: Sealer, ca: pki.CertificateAuthority, ca_row: CertificateAuthority, org: Organisation,
    device: Device, public_key: pki.PublicKey | None = None, *, purpose: Purpose = Purpose.BOOTSTRAP,
    state: CredentialState = CredentialState.ACTIVE, keep_key: bool | None = None,
) -> NewCertificate:
    """Sign a client certificate for ``device`` with the organisation's CA and add its record to the
    caller's session. Its CN is the device's endpoint name; a device without one gets
    ``urn:uuid:<GUID>`` as its endpoint name. The key is generated unless ``public_key`` is given,
    and kept (sealed) when ``keep_key`` says so (default: the organisation's policy)."""
    if ca_row.not_after <= utcnow() + timedelta(days=1):
        raise Unavailable(
            f"the organisation's CA expires on {ca_row.not_after.isoformat()}; import a new CA "
            "(POST /api/v1/orgs/{org_id}/cas) before issuing more certificates"
        )
    guid = uuid.uuid4()
    if not device.endpoint:
        device.endpoint = guid.urn
    key = pki.new_key() if public_key is None else None
    certificate = pki.issue_device_certificate(
        ca, key.public_key() if key else public_key,  # type: ignore[arg-type]
        device.endpoint, guid, timedelta(days=org.cert_validity_days),
    )
    keep = org.keep_device_keys if keep_key is None else keep_key
    record = DeviceCertificate(
        id=str(guid), org_id=org.id, device_id=device.id, ca_id=ca_row.id, serial=format(certificate.serial_number, "x"),
        common_name=device.endpoint, fingerprint=pki.fingerprint(certificate),
        certificate_pem=pki.certificate_pem(certificate), key_source="server" if key else "csr",
        key_sealed=sealer.seal(pki.key_pem(key), DEVICE_KEY_PURPOSE) if key and keep else None,
        not_before=certificate.not_valid_before_utc, not_after=certificate.not_valid_after_utc,
        purpose=purpose.value, state=state.value,
    )
    session.add(record)
    return NewCertificate(record, certificate, key)


async def _bump_crl_numbers(session: AsyncSession, ca_ids: set[str]) -> None:
    await session.execute(
        update(CertificateAuthority).where(CertificateAuthority.id.in_(ca_ids))
        .values(crl_number=CertificateAuthority.crl_number + 1)
    )


class CertificateService:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], sealer: Sealer, authorities: AuthorityService) -> None:
        self._sessions = sessions
        self._sealer = sealer
        self._authorities = authorities

    async def issue(
        self, principal: Principal, org_id: str, device_id: str, csr_pem: str | None = None, *,
        purpose: str = Purpose.BOOTSTRAP,
    ) -> IssuedCertificate:
        """Issue a client certificate for a device (see :func:`new_certificate`). A "bootstrap"
        certificate opens the bootstrap DTLS port, a "management" one the management DTLS port."""
        require(principal, org_id, Permission.WRITE)
        try:
            chosen = parse_purpose(purpose)
        except ValueError as exc:
            raise InvalidInput(str(exc), field="purpose") from None
        public_key = None
        if csr_pem is not None:
            try:
                public_key = pki.load_csr(csr_pem)
            except pki.PkiError as exc:
                raise InvalidInput(str(exc), field="csr") from exc
        async with writing(self._sessions, "the device's endpoint name is already in use") as session:
            # One round trip for the organisation (its policy), the device and the issuing CA.
            found = (await session.execute(
                select(Organisation, Device, CertificateAuthority)
                .join(Device, Device.org_id == Organisation.id)
                .outerjoin(CertificateAuthority, and_(
                    CertificateAuthority.org_id == Organisation.id, CertificateAuthority.active.is_(True)
                ))
                .where(Organisation.id == org_id, Device.id == device_id)
            )).first()
            if found is None:
                raise NotFound("device not found")
            org, device, ca_row = found
            if ca_row is None:
                raise Unavailable(NO_CA)
            issued = new_certificate(
                session, self._sealer, self._authorities.load(ca_row), ca_row, org, device, public_key, purpose=chosen,
            )
            record = issued.record
            events.record(
                session, "certificate.issued", org_id=org_id, device_id=device.id, actor=principal.email,
                certificate_id=record.id, key_source=record.key_source, not_after=record.not_after.isoformat(),
                key_kept=record.key_sealed is not None, purpose=record.purpose,
            )
        return IssuedCertificate(record, chain_pem(ca_row), pki.key_pem(issued.key) if issued.key else None)

    async def list(self, principal: Principal, org_id: str, flt: CertificateFilter) -> tuple[int, list[DeviceCertificate]]:
        require(principal, org_id, Permission.READ)
        if flt.status is not None and flt.status not in STATUSES:
            raise InvalidInput(f"status must be one of {', '.join(STATUSES)}", field="status")
        query = select(DeviceCertificate).where(DeviceCertificate.org_id == org_id)
        now = utcnow()
        if flt.device_id is not None:
            query = query.where(DeviceCertificate.device_id == flt.device_id)
        if flt.status == "active":
            query = query.where(DeviceCertificate.revoked_at.is_(None), DeviceCertificate.not_after > now)
        elif flt.status == "revoked":
            query = query.where(DeviceCertificate.revoked_at.is_not(None))
        elif flt.status == "expired":
            query = query.where(DeviceCertificate.not_after <= now)
        if flt.expiring_before is not None:
            query = query.where(DeviceCertificate.not_after < flt.expiring_before)
        async with self._sessions() as session:
            await require_org(session, org_id)
            total = await session.scalar(select(func.count()).select_from(query.subquery()))
            rows = await session.scalars(
                query.order_by(DeviceCertificate.created_at, DeviceCertificate.id).offset(flt.offset).limit(flt.limit)
            )
            return int(total or 0), list(rows)

    async def get(self, principal: Principal, org_id: str, certificate_id: str) -> DeviceCertificate:
        require(principal, org_id, Permission.READ)
        async with self._sessions() as session:
            return await self._load(session, org_id, certificate_id)

    async def revoke(self, principal: Principal, org_id: str, certificate_id: str, reason: str = "unspecified") -> DeviceCertificate:
        require(principal, org_id, Permission.WRITE)
        if reason not in REASONS:
            raise InvalidInput(f"reason must be one of {', '.join(sorted(REASONS))}", field="reason")
        async with self._sessions.begin() as session:
            record = await self._load(session, org_id, certificate_id)
            if record.revoked_at is not None:
                raise Conflict(f"the certificate was already revoked at {record.revoked_at.isoformat()}")
            record.revoked_at = utcnow()
            record.revocation_reason = reason
            await _bump_crl_numbers(session, {record.ca_id})
            events.record(
                session, "certificate.revoked", org_id=org_id, device_id=record.device_id, actor=principal.email,
                certificate_id=record.id, reason=reason,
            )
        return record

    # --- for the bootstrap server (no caller: the device itself is authenticated) -------------

    async def expiring(self, before: datetime, limit: int = 1000) -> list[DeviceCertificate]:
        """Valid certificates that expire before ``before``, soonest first: the ones to renew."""
        async with self._sessions() as session:
            return list(await session.scalars(
                select(DeviceCertificate)
                .where(DeviceCertificate.revoked_at.is_(None), DeviceCertificate.device_id.is_not(None),
                       DeviceCertificate.not_after < before)
                .order_by(DeviceCertificate.not_after).limit(limit)
            ))

    def private_key(self, record: DeviceCertificate) -> str | None:
        """The kept device key (PEM) for bootstrap provisioning; None when it was not kept."""
        return self._sealer.open(record.key_sealed, DEVICE_KEY_PURPOSE) if record.key_sealed else None

    async def _load(self, session: AsyncSession, org_id: str, certificate_id: str) -> DeviceCertificate:
        await require_org(session, org_id)
        record = await session.get(DeviceCertificate, certificate_id)
        if record is None or record.org_id != org_id:
            raise NotFound("certificate not found")
        return record
