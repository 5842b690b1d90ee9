"""Bodies of the native credential routes: CAs, device certificates, PSKs and the trust store."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from pilotboat.api.native.schemas import Strict
from pilotboat.model.credential import Purpose
from pilotboat.services.authorities import chain_pem
from pilotboat.store.tables import CertificateAuthority, DeviceCertificate, PskIdentity, TrustedCertificate

PEM_CHARS = 1_000_000
PURPOSE_DESCRIPTION = (
    "bootstrap: a factory credential, accepted by the bootstrap DTLS server only; management: accepted by the "
    "management DTLS server only (pre-provisioned; the bootstrap issues them too)"
)
STATE_DESCRIPTION = "issued: written to the device at a bootstrap, not used yet; active: in use"


class CaImport(Strict):
    certificate: str = Field(min_length=1, max_length=PEM_CHARS, description="The issuing CA certificate (PEM)")
    private_key: str = Field(min_length=1, max_length=PEM_CHARS, description="Its unencrypted private key (PEM); sealed at rest")
    chain: str = Field(default="", max_length=PEM_CHARS, description="Its parent certificates up to the root (PEM)")


class CaOut(BaseModel):
    id: str
    source: str
    active: bool
    subject: str
    fingerprint: str
    not_after: datetime
    chain_pem: str
    created_at: datetime

    @classmethod
    def of(cls, row: CertificateAuthority) -> CaOut:
        return cls(
            id=row.id, source=row.source, active=row.active, subject=row.subject, fingerprint=row.fingerprint,
            not_after=row.not_after, chain_pem=chain_pem(row), created_at=row.created_at,
        )


class CertificateRequest(Strict):
    csr: str | None = Field(
        default=None, max_length=PEM_CHARS,
        description="PKCS#10 request (PEM). Without it the server generates the key pair and returns the key once.",
    )
    purpose: Purpose = Field(default=Purpose.BOOTSTRAP, description=PURPOSE_DESCRIPTION)


class CertificateOut(BaseModel):
    id: str = Field(description="The GUID in the certificate (serial number and urn:uuid SAN)")
    device_id: str | None
    ca_id: str
    serial: str
    common_name: str
    fingerprint: str
    key_source: str
    key_kept: bool
    not_before: datetime
    not_after: datetime
    revoked_at: datetime | None
    revocation_reason: str | None
    purpose: str = Field(description=PURPOSE_DESCRIPTION)
    state: str = Field(description=STATE_DESCRIPTION)
    certificate_pem: str
    created_at: datetime

    @classmethod
    def of(cls, row: DeviceCertificate) -> CertificateOut:
        return cls(
            id=row.id, device_id=row.device_id, ca_id=row.ca_id, serial=row.serial, common_name=row.common_name,
            fingerprint=row.fingerprint, key_source=row.key_source, key_kept=row.key_sealed is not None,
            not_before=row.not_before, not_after=row.not_after, revoked_at=row.revoked_at,
            revocation_reason=row.revocation_reason, purpose=row.purpose, state=row.state,
            certificate_pem=row.certificate_pem, created_at=row.created_at,
        )


class CertificateIssued(CertificateOut):
    chain_pem: str = Field(description="The issuing CA and its parents, root last")
    private_key_pem: str | None = Field(description="The generated key, shown this once; null for a CSR")


class CertificatePage(BaseModel):
    total: int
    offset: int
    limit: int
    certificates: list[CertificateOut]


class RevokeIn(Strict):
    reason: str = Field(default="unspecified", max_length=32, description="RFC 5280 reason, e.g. key_compromise, superseded")


class PskIn(Strict):
    identity: str | None = Field(default=None, min_length=1, max_length=128, description="Import: the factory identity")
    key: str | None = Field(default=None, min_length=32, max_length=128, pattern=r"^[0-9A-Fa-f]+$",
                            description="Import: the factory key in hex")
    key_length: int = Field(default=32, ge=16, le=64, description="Generate: key length in bytes (16 for tinydtls clients)")
    purpose: Purpose = Field(default=Purpose.BOOTSTRAP, description=PURPOSE_DESCRIPTION)


class PskOut(BaseModel):
    id: str
    identity: str
    device_id: str
    key_length: int
    source: str
    purpose: str = Field(description=PURPOSE_DESCRIPTION)
    state: str = Field(description=STATE_DESCRIPTION)
    created_at: datetime

    @classmethod
    def of(cls, row: PskIdentity) -> PskOut:
        return cls(
            id=row.id, identity=row.identity, device_id=row.device_id, key_length=row.key_length, source=row.source,
            purpose=row.purpose, state=row.state, created_at=row.created_at,
        )


class PskCreated(PskOut):
    key: str = Field(description="The key in hex, shown this once")


class PskPage(BaseModel):
    total: int
    offset: int
    limit: int
    psks: list[PskOut]


class TrustedIn(Strict):
    certificate: str = Field(min_length=1, max_length=PEM_CHARS, description="One CA certificate (PEM)")
    name: str = Field(default="", max_length=256)


class TrustedOut(BaseModel):
    id: str
    name: str
    subject: str
    fingerprint: str
    not_after: datetime
    certificate_pem: str
    added_by: str
    created_at: datetime

    @classmethod
    def of(cls, row: TrustedCertificate) -> TrustedOut:
        return cls(
            id=row.id, name=row.name, subject=row.subject, fingerprint=row.fingerprint, not_after=row.not_after,
            certificate_pem=row.certificate_pem, added_by=row.added_by, created_at=row.created_at,
        )
