"""The certificate and key the deployment's DTLS servers present to devices.

Either configured (PEM files named by PILOTBOAT_DTLS_CERTIFICATE and PILOTBOAT_DTLS_PRIVATE_KEY,
checked at start) or the deployment certificate: a self-signed ECDSA P-256 leaf for
PILOTBOAT_PUBLIC_HOST, created by the first node that needs it and kept in the database with its key
sealed, so that every node of a deployment presents the same one.
"""

from __future__ import annotations

import ipaddress
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from pilotboat.security import pki
from pilotboat.security.sealing import Sealer
from pilotboat.store.tables import DtlsServerKey

SERVER_KEY_PURPOSE = "dtls_server.key"
DEPLOYMENT_KEY_ID = "deployment"
DEPLOYMENT_VALIDITY = timedelta(days=20 * 365)
CERTIFICATE_SETTING = "PILOTBOAT_DTLS_CERTIFICATE"
KEY_SETTING = "PILOTBOAT_DTLS_PRIVATE_KEY"


class ServerCredentialsError(ValueError):
    """The configured DTLS server certificate or key cannot be used; the message names the setting."""


@dataclass(frozen=True)
class ServerKeyPair:
    """The DTLS server certificate chain (DER, leaf first) and its private key (DER PKCS#8)."""

    certificate_chain: tuple[bytes, ...]
    private_key: bytes

    @property
    def trust_anchor(self) -> bytes:
        """What a device must trust to accept the server: the last certificate of the chain (DER)."""
        return self.certificate_chain[-1]

    @property
    def chain_pem(self) -> str:
        """The certificate chain as PEM, leaf first (what operators give device makers)."""
        return pki.chain_pem([x509.load_der_x509_certificate(der) for der in self.certificate_chain])

    def __repr__(self) -> str:  # keeps the key out of logs and tracebacks
        return f"ServerKeyPair(certificates={len(self.certificate_chain)})"


def _der(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.DER)


def _key_der(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _spki(key: object) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)  # type: ignore[attr-defined]


def _read(path: Path, setting: str) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ServerCredentialsError(f"{setting}: cannot read {path} ({exc})") from None


def key_pair_from_pem(certificate_pem: str, key_pem: str, *, now: datetime | None = None) -> ServerKeyPair:
    """Check a PEM chain (leaf first) and its key: an ECDSA P-256 key that belongs to the leaf, a leaf
    valid now, each certificate issued by the next one. ``ServerCredentialsError`` names the setting."""
    now = now or datetime.now(UTC)
    try:
        chain = pki.load_certificates(certificate_pem, field=CERTIFICATE_SETTING)
        key = pki.load_private_key(key_pem, field=KEY_SETTING)
    except pki.PkiError as exc:
        raise ServerCredentialsError(str(exc)) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ServerCredentialsError(f"{KEY_SETTING}: the DTLS server key must be an ECDSA P-256 (secp256r1) key")
    leaf = chain[0]
    if _spki(key.public_key()) != _spki(leaf.public_key()):
        raise ServerCredentialsError(f"{KEY_SETTING}: the key does not belong to the first certificate of {CERTIFICATE_SETTING}")
    if leaf.not_valid_after_utc <= now:
        raise ServerCredentialsError(f"{CERTIFICATE_SETTING}: the certificate expired on {leaf.not_valid_after_utc.isoformat()}")
    if leaf.not_valid_before_utc > now + pki.CLOCK_SKEW:
        raise ServerCredentialsError(
            f"{CERTIFICATE_SETTING}: the certificate is not valid before {leaf.not_valid_before_utc.isoformat()}"
        )
    for position, (child, parent) in enumerate(zip(chain, chain[1:], strict=False)):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise ServerCredentialsError(
                f"{CERTIFICATE_SETTING}: certificate {position + 1} was not issued by the one after it; "
                f"give the chain leaf first ({exc or 'bad signature'})"
            ) from None
    return ServerKeyPair(tuple(_der(certificate) for certificate in chain), _key_der(key))


def load_configured(certificate: Path, private_key: Path) -> ServerKeyPair:
    """The key pair of the PEM files the settings name (see :func:`key_pair_from_pem`)."""
    return key_pair_from_pem(_read(certificate, CERTIFICATE_SETTING), _read(private_key, KEY_SETTING))


def _host_name(public_host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(public_host))
    except ValueError:
        return x509.DNSName(public_host)


def self_signed(public_host: str, *, now: datetime | None = None) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed ECDSA P-256 server certificate (no CA) with CN and SAN ``public_host``."""
    now = now or datetime.now(UTC)
    key = pki.new_key()
    name = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, public_host[:64]),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Pilotboat"),
    ])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(uuid.uuid4().int)
        .not_valid_before(now - pki.CLOCK_SKEW)
        .not_valid_after(now + DEPLOYMENT_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=True, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([_host_name(public_host)]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return certificate, key


class DeploymentKeyStore:
    """The deployment certificate in the database: read, or created once (insert-or-read, so that
    nodes starting together end up with the same one)."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], sealer: Sealer) -> None:
        self._sessions = sessions
        self._sealer = sealer

    async def key_pair(self, public_host: str) -> ServerKeyPair:
        row = await self._read()
        if row is None:
            certificate, key = self_signed(public_host)
            candidate = DtlsServerKey(
                id=DEPLOYMENT_KEY_ID, common_name=public_host[:253], fingerprint=pki.fingerprint(certificate),
                certificate_pem=pki.certificate_pem(certificate), key_sealed=self._sealer.seal(pki.key_pem(key), SERVER_KEY_PURPOSE),
                not_after=certificate.not_valid_after_utc,
            )
            try:
                async with self._sessions.begin() as session:
                    session.add(candidate)
            except IntegrityError:
                pass  # another node created it first: use theirs
            row = await self._read()
            assert row is not None
        return self._open(row)

    async def _read(self) -> DtlsServerKey | None:
        async with self._sessions() as session:
            return await session.get(DtlsServerKey, DEPLOYMENT_KEY_ID)

    def _open(self, row: DtlsServerKey) -> ServerKeyPair:
        chain = pki.load_certificates(row.certificate_pem)
        key = serialization.load_pem_private_key(self._sealer.open_bytes(row.key_sealed, SERVER_KEY_PURPOSE), password=None)
        return ServerKeyPair(tuple(_der(certificate) for certificate in chain), _key_der(key))  # type: ignore[arg-type]
