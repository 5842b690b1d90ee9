"""The deployment's trust store, and the answer to "is this client certificate chain trusted, and
whose device is it?" for the DTLS layer.

A management server accepts device certificates issued by any organisation CA of this deployment
(each such certificate is on record) or by a CA of the trust store (devices moved in from another
deployment, identified by their CN as endpoint name).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.x509.verification import Store
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from pilotboat.model.principal import Principal
from pilotboat.model.roles import Permission
from pilotboat.security import pki
from pilotboat.services import events
from pilotboat.services.authorities import parents
from pilotboat.services.errors import Forbidden, InvalidInput, NotFound
from pilotboat.services.transaction import writing
from pilotboat.store.tables import CertificateAuthority, Device, DeviceCertificate, TrustedCertificate

#: How long a node reuses the trust store it read (changes made on this node apply at once).
ANCHOR_CACHE_SECONDS = 10.0


class Untrusted(Exception):
    """A client certificate chain this deployment does not accept; the message says why."""


@dataclass(frozen=True)
class ClientIdentity:
    """Who a trusted client certificate belongs to. ``device_id`` is None for a certificate of a
    trusted foreign CA whose CN names no device here."""

    endpoint: str | None
    org_id: str | None
    device_id: str | None
    #: Our record of the certificate, when one of our organisation CAs issued it.
    certificate_id: str | None
    issuer: str


def _require_admin(principal: Principal) -> None:
    if not principal.acts_as_system_admin:
        raise Forbidden("only system administrators change the trust store")


def _require_reader(principal: Principal) -> None:
    if not principal.can_anywhere(Permission.DEVICE_MANAGEMENT_SERVER):
        raise Forbidden("reading the trust store needs the 'device_management_server' permission in an organisation")


class TrustService:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions
        self._anchors: tuple[float, Store | None] | None = None

    # --- the trust store ----------------------------------------------------------------------

    async def list(self, principal: Principal) -> list[TrustedCertificate]:
        _require_reader(principal)
        async with self._sessions() as session:
            return list(await session.scalars(select(TrustedCertificate).order_by(TrustedCertificate.created_at)))

    async def get(self, principal: Principal, entry_id: str) -> TrustedCertificate:
        _require_reader(principal)
        async with self._sessions() as session:
            entry = await session.get(TrustedCertificate, entry_id)
        if entry is None:
            raise NotFound("trust store entry not found")
        return entry

    async def add(self, principal: Principal, certificate_pem: str, name: str = "") -> TrustedCertificate:
        _require_admin(principal)
        certificates = self._parse(certificate_pem, "certificate")
        if len(certificates) != 1:
            raise InvalidInput("give exactly one certificate; to replace the whole store use the bundle route", field="certificate")
        async with writing(self._sessions, "this certificate is already in the trust store") as session:
            (entry,) = await self._insert(session, certificates, principal.email, name)
            if entry is None:
                raise InvalidInput("this certificate is already trusted (it is in the trust store or is an organisation CA)",
                                   field="certificate")
            events.record(session, "trust.added", org_id=None, actor=principal.email, entry_id=entry.id, subject=entry.subject)
        self._anchors = None
        return entry

    async def delete(self, principal: Principal, entry_id: str) -> None:
        _require_admin(principal)
        async with self._sessions.begin() as session:
            entry = await session.get(TrustedCertificate, entry_id)
            if entry is None:
                raise NotFound("trust store entry not found")
            await session.delete(entry)
            events.record(session, "trust.removed", org_id=None, actor=principal.email, entry_id=entry.id, subject=entry.subject)
        self._anchors = None

    async def replace(self, principal: Principal, bundle_pem: str) -> list[TrustedCertificate]:
        """Replace the trust store with a PEM bundle, all or nothing. Organisation CAs of this
        deployment in the bundle are skipped (they are trusted already), as are duplicates."""
        _require_admin(principal)
        certificates = self._parse(bundle_pem, "certs") if bundle_pem.strip() else []
        async with self._sessions.begin() as session:
            await session.execute(delete(TrustedCertificate))
            added = [entry for entry in await self._insert(session, certificates, principal.email, "") if entry]
            events.record(session, "trust.replaced", org_id=None, actor=principal.email, certificates=len(added))
        self._anchors = None
        return added

    async def bundle(self, principal: Principal) -> list[str]:
        """PEM certificates a management server of this deployment trusts, as the caller may see them:
        the trust store and the CA chains of the organisations the caller belongs to with the
        'device_management_server' permission. (A system administrator gets the chains of its own
        organisations too, not of every tenant: the bundle is what another deployment should trust
        to accept this caller's devices, and it stays small.)"""
        _require_reader(principal)
        orgs = [org for org in principal.visible_org_ids() if principal.can(org, Permission.DEVICE_MANAGEMENT_SERVER)]
        async with self._sessions() as session:
            stored = list(await session.scalars(select(TrustedCertificate.certificate_pem).order_by(TrustedCertificate.created_at)))
            authorities = list(await session.scalars(
                select(CertificateAuthority).where(CertificateAuthority.org_id.in_(orgs)).order_by(CertificateAuthority.created_at)
            ))
        own: list[str] = []
        for row in authorities:
            for certificate in (x509.load_pem_x509_certificate(row.certificate_pem.encode()), *parents(row)):
                pem = pki.certificate_pem(certificate)
                if pem not in own:
                    own.append(pem)
        return stored + [pem for pem in own if pem not in stored]

    # --- for the DTLS layer -------------------------------------------------------------------

    async def identify(self, chain: list[x509.Certificate], *, now: datetime | None = None) -> ClientIdentity:
        """Validate a client certificate chain (leaf first) and say whose device it is; raises
        ``Untrusted`` with the reason otherwise."""
        if not chain:
            raise Untrusted("no client certificate")
        now = now or datetime.now(UTC)
        leaf, intermediates = chain[0], chain[1:]
        async with self._sessions() as session:
            record = await session.scalar(select(DeviceCertificate).where(DeviceCertificate.fingerprint == pki.fingerprint(leaf)))
            if record is not None:
                return await self._identify_issued(session, record, leaf, intermediates, now)
            store = await self._foreign_anchors(session)
            if store is None:
                raise Untrusted("the certificate was not issued here and the trust store is empty")
            try:
                path = pki.verify_client_chain(store, leaf, intermediates, now=now)
            except pki.PkiError as exc:
                raise Untrusted(str(exc)) from exc
            endpoint = pki.common_name(leaf)
            device = await session.scalar(select(Device).where(Device.endpoint == endpoint)) if endpoint else None
        return ClientIdentity(
            endpoint, device.org_id if device else None, device.id if device else None, None, pki.subject_text(path[-1])
        )

    async def _identify_issued(
        self, session: AsyncSession, record: DeviceCertificate, leaf: x509.Certificate,
        intermediates: list[x509.Certificate], now: datetime,
    ) -> ClientIdentity:
        if record.revoked_at is not None:
            raise Untrusted(f"the certificate was revoked ({record.revocation_reason})")
        if record.device_id is None:
            raise Untrusted("the certificate's device was deleted")
        ca = await session.get(CertificateAuthority, record.ca_id)
        assert ca is not None  # foreign key
        issuer = x509.load_pem_x509_certificate(ca.certificate_pem.encode())
        try:
            pki.verify_client_chain(pki.trust_store([issuer]), leaf, intermediates, now=now)
        except pki.PkiError as exc:
            raise Untrusted(str(exc)) from exc
        return ClientIdentity(record.common_name, record.org_id, record.device_id, record.id, ca.subject)

    async def _foreign_anchors(self, session: AsyncSession) -> Store | None:
        cached = self._anchors
        if cached is not None and time.monotonic() - cached[0] < ANCHOR_CACHE_SECONDS:
            return cached[1]
        pems = list(await session.scalars(select(TrustedCertificate.certificate_pem)))
        store = pki.trust_store([x509.load_pem_x509_certificate(pem.encode()) for pem in pems]) if pems else None
        self._anchors = (time.monotonic(), store)
        return store

    # --- helpers ------------------------------------------------------------------------------

    @staticmethod
    def _parse(pem: str, field: str) -> list[x509.Certificate]:
        now = datetime.now(UTC)
        try:
            certificates = pki.load_certificates(pem, field=field)
            for position, certificate in enumerate(certificates):
                pki.check_ca_certificate(certificate, now, field=f"{field}[{position}]")
        except pki.PkiError as exc:
            raise InvalidInput(str(exc), field=field) from exc
        return certificates

    @staticmethod
    async def _insert(
        session: AsyncSession, certificates: list[x509.Certificate], actor: str, name: str
    ) -> list[TrustedCertificate | None]:
        """Insert each certificate not trusted yet; None in place of the ones skipped."""
        known = set(await session.scalars(select(TrustedCertificate.fingerprint)))
        for row in await session.scalars(select(CertificateAuthority)):
            known.add(row.fingerprint)
            known.update(pki.fingerprint(parent) for parent in parents(row))
        inserted: list[TrustedCertificate | None] = []
        for certificate in certificates:
            fingerprint = pki.fingerprint(certificate)
            if fingerprint in known:
                inserted.append(None)
                continue
            known.add(fingerprint)
            entry = TrustedCertificate(
                name=name or pki.subject_text(certificate)[:256], subject=pki.subject_text(certificate),
                fingerprint=fingerprint, certificate_pem=pki.certificate_pem(certificate),
                not_after=certificate.not_valid_after_utc, added_by=actor,
            )
            session.add(entry)
            inserted.append(entry)
        await session.flush()
        return inserted
