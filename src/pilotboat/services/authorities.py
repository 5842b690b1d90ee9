"""Organisation certificate authorities: one generated on creation, or the organisation's own imported;
their chains, CRLs and the organisation's credential policy."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from pilotboat.model.principal import Principal
from pilotboat.model.roles import Permission
from pilotboat.security import pki
from pilotboat.security.sealing import Sealer
from pilotboat.services import events
from pilotboat.services.access import require, require_org
from pilotboat.services.errors import Conflict, InvalidInput, NotFound, Unavailable
from pilotboat.services.transaction import writing
from pilotboat.store.tables import CertificateAuthority, DeviceCertificate, Organisation

CA_KEY_PURPOSE = "ca.key"
CA_ROOT_KEY_PURPOSE = "ca.root_key"
MAX_VALIDITY_DAYS = 3650
NO_CA = "this organisation has no CA yet; restart the server to create it"


@dataclass(frozen=True)
class CredentialPolicy:
    cert_validity_days: int | None = None
    keep_device_keys: bool | None = None


def parents(row: CertificateAuthority) -> list[x509.Certificate]:
    return pki.load_certificates(row.parents_pem) if row.parents_pem else []


def chain_pem(row: CertificateAuthority) -> str:
    """The issuing certificate and its parents, root last."""
    return row.certificate_pem + row.parents_pem


class AuthorityService:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], sealer: Sealer) -> None:
        self._sessions = sessions
        self._sealer = sealer

    # --- creating -----------------------------------------------------------------------------

    def _row(self, org_id: str, ca: pki.CertificateAuthority, source: str) -> CertificateAuthority:
        return CertificateAuthority(
            org_id=org_id, source=source, active=True, subject=pki.subject_text(ca.certificate),
            fingerprint=pki.fingerprint(ca.certificate), certificate_pem=pki.certificate_pem(ca.certificate),
            parents_pem=pki.chain_pem(ca.parents), key_sealed=self._sealer.seal(pki.key_pem(ca.key), CA_KEY_PURPOSE),
            root_key_sealed=self._sealer.seal(pki.key_pem(ca.root_key), CA_ROOT_KEY_PURPOSE) if ca.root_key else None,
            not_after=ca.certificate.not_valid_after_utc,
        )

    def create_for(self, session: AsyncSession, org: Organisation) -> None:
        """Give a new organisation its generated CA chain, in the caller's transaction."""
        session.add(self._row(org.id, pki.generate_ca(org.name, org.id), "generated"))

    async def ensure_all(self) -> int:
        """At start: generate a CA for every organisation that has none (e.g. created by an older
        version). Returns how many were created."""
        async with self._sessions.begin() as session:
            orgs = list(await session.scalars(
                select(Organisation).where(~select(CertificateAuthority.id).where(CertificateAuthority.org_id == Organisation.id).exists())
            ))
            for org in orgs:
                self.create_for(session, org)
                events.record(session, "ca.created", org_id=org.id, actor="system", source="generated")
        return len(orgs)

    async def import_ca(
        self, principal: Principal, org_id: str, certificate_pem: str, private_key_pem: str, parents_pem: str = ""
    ) -> CertificateAuthority:
        """Make the organisation's own CA its issuing CA. The previous one stays trusted (its
        certificates keep working) but issues no more."""
        require(principal, org_id, Permission.MANAGE_PKI)
        try:
            ca = pki.import_ca(certificate_pem, private_key_pem, parents_pem)
        except pki.PkiError as exc:
            raise InvalidInput(str(exc), field=str(exc).split(":", 1)[0]) from exc
        row = self._row(org_id, ca, "imported")
        async with writing(self._sessions, "this CA certificate is already registered") as session:
            await require_org(session, org_id)
            if await session.scalar(select(CertificateAuthority.id).where(CertificateAuthority.fingerprint == row.fingerprint)):
                raise Conflict("this CA certificate is already registered", field="certificate")
            await session.execute(
                update(CertificateAuthority).where(CertificateAuthority.org_id == org_id).values(active=False)
            )
            session.add(row)
            await session.flush()
            events.record(session, "ca.imported", org_id=org_id, actor=principal.email, ca_id=row.id, subject=row.subject)
        return row

    # --- reading ------------------------------------------------------------------------------

    async def list(self, principal: Principal, org_id: str) -> list[CertificateAuthority]:
        require(principal, org_id, Permission.READ)
        async with self._sessions() as session:
            await require_org(session, org_id)
            return list(await session.scalars(
                select(CertificateAuthority).where(CertificateAuthority.org_id == org_id)
                .order_by(CertificateAuthority.active.desc(), CertificateAuthority.created_at.desc())
            ))

    async def active(self, principal: Principal, org_id: str) -> CertificateAuthority:
        require(principal, org_id, Permission.READ)
        async with self._sessions() as session:
            await require_org(session, org_id)
            return await self.active_row(session, org_id)

    async def active_row(self, session: AsyncSession, org_id: str) -> CertificateAuthority:
        row = await session.scalar(
            select(CertificateAuthority).where(CertificateAuthority.org_id == org_id, CertificateAuthority.active.is_(True))
        )
        if row is None:
            raise Unavailable(NO_CA)
        return row

    def load(self, row: CertificateAuthority) -> pki.CertificateAuthority:
        """The CA with its unsealed signing key (never leaves the process)."""
        key = serialization.load_pem_private_key(self._sealer.open_bytes(row.key_sealed, CA_KEY_PURPOSE), password=None)
        return pki.CertificateAuthority(
            x509.load_pem_x509_certificate(row.certificate_pem.encode()), key, tuple(parents(row))  # type: ignore[arg-type]
        )

    async def crl_pem(self, principal: Principal, org_id: str, ca_id: str) -> str:
        """The CA's current CRL (PEM), signed now, listing every certificate it revoked."""
        require(principal, org_id, Permission.READ)
        async with self._sessions() as session:
            row = await session.get(CertificateAuthority, ca_id)
            if row is None or row.org_id != org_id:
                raise NotFound("CA not found")
            revoked = await session.execute(
                select(DeviceCertificate.serial, DeviceCertificate.revoked_at, DeviceCertificate.revocation_reason)
                .where(DeviceCertificate.ca_id == ca_id, DeviceCertificate.revoked_at.is_not(None))
                .order_by(DeviceCertificate.revoked_at)
            )
            revocations = [
                pki.Revocation(int(serial, 16), revoked_at, x509.ReasonFlags[reason] if reason else None)
                for serial, revoked_at, reason in revoked
            ]
        crl = pki.build_crl(self.load(row), revocations, row.crl_number)
        return crl.public_bytes(serialization.Encoding.PEM).decode()

    # --- policy -------------------------------------------------------------------------------

    async def set_policy(self, principal: Principal, org_id: str, policy: CredentialPolicy) -> Organisation:
        require(principal, org_id, Permission.MANAGE_PKI)
        if policy.cert_validity_days is not None and not 1 <= policy.cert_validity_days <= MAX_VALIDITY_DAYS:
            raise InvalidInput(f"cert_validity_days must be between 1 and {MAX_VALIDITY_DAYS}", field="cert_validity_days")
        async with self._sessions.begin() as session:
            org = await session.get(Organisation, org_id)
            if org is None:
                raise NotFound("organisation not found")
            changed = {}
            if policy.cert_validity_days is not None:
                org.cert_validity_days = changed["cert_validity_days"] = policy.cert_validity_days
            if policy.keep_device_keys is not None:
                org.keep_device_keys = changed["keep_device_keys"] = policy.keep_device_keys
            events.record(session, "org.credential_policy_changed", org_id=org_id, actor=principal.email, **changed)
        return org
