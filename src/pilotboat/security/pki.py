"""X.509 for organisation CAs and device certificates: pure functions over ``cryptography`` objects.

No I/O and no database: the credential services store what these functions build. Every parse error
becomes a ``PkiError`` whose message says what was wrong, for the API to show the caller.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import ExtensionPolicy, PolicyBuilder, Store, VerificationError

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey

ROOT_VALIDITY = timedelta(days=20 * 365)
INTERMEDIATE_VALIDITY = timedelta(days=10 * 365)
#: Certificates are back-dated a little so that devices with a slightly late clock accept them.
CLOCK_SKEW = timedelta(minutes=5)
CRL_VALIDITY = timedelta(days=7)
MIN_RSA_BITS = 2048
EC_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
#: The largest PEM document accepted from a caller (a bundle of a few hundred CA certificates).
MAX_PEM_CHARS = 1_000_000


class PkiError(ValueError):
    """Bad certificate material from a caller."""


@dataclass(frozen=True)
class CertificateAuthority:
    """An issuing CA: its certificate and key, its parents up to the root (root last, may be empty)."""

    certificate: x509.Certificate
    key: PrivateKey
    parents: tuple[x509.Certificate, ...] = ()
    #: The root key of a generated chain, kept to re-issue the intermediate; None for imported CAs.
    root_key: PrivateKey | None = None

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        """Issuing certificate first, root last."""
        return (self.certificate, *self.parents)


# --- encoding -----------------------------------------------------------------------------------


def certificate_pem(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


def chain_pem(certificates: tuple[x509.Certificate, ...] | list[x509.Certificate]) -> str:
    return "".join(certificate_pem(certificate) for certificate in certificates)


def key_pem(key: PrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def fingerprint(certificate: x509.Certificate) -> str:
    """SHA-256 of the DER encoding, lower-case hex."""
    return certificate.fingerprint(hashes.SHA256()).hex()


def der_fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def subject_text(certificate: x509.Certificate) -> str:
    return certificate.subject.rfc4514_string()


# --- parsing ------------------------------------------------------------------------------------


def load_certificates(pem: str, *, field: str = "certificates") -> list[x509.Certificate]:
    """Every certificate of a PEM bundle; anything else in it (or no certificate at all) is an error."""
    if len(pem) > MAX_PEM_CHARS:
        raise PkiError(f"{field}: the PEM text is larger than {MAX_PEM_CHARS} characters")
    stripped = pem.strip()
    if not stripped.startswith("-----BEGIN CERTIFICATE-----"):
        raise PkiError(f"{field}: expected PEM certificates ('-----BEGIN CERTIFICATE-----')")
    try:
        certificates = x509.load_pem_x509_certificates(stripped.encode())
    except ValueError as exc:
        raise PkiError(f"{field}: not a valid PEM certificate bundle ({exc})") from exc
    # load_pem_x509_certificates skips text between blocks; a bundle must hold certificates only.
    if stripped.count("-----BEGIN") != len(certificates):
        raise PkiError(f"{field}: the bundle holds something other than certificates")
    return certificates


def load_private_key(pem: str, *, field: str = "private_key") -> PrivateKey:
    if len(pem) > MAX_PEM_CHARS:
        raise PkiError(f"{field}: the PEM text is too large")
    try:
        key = serialization.load_pem_private_key(pem.strip().encode(), password=None)
    except (ValueError, TypeError) as exc:
        raise PkiError(f"{field}: not an unencrypted PEM private key ({exc})") from exc
    check_key_strength(key.public_key(), field=field)
    return key  # type: ignore[return-value]


def check_key_strength(public_key: object, *, field: str) -> None:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if not isinstance(public_key.curve, EC_CURVES):
            raise PkiError(f"{field}: elliptic curve {public_key.curve.name} is not supported (use P-256, P-384 or P-521)")
    elif isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_BITS:
            raise PkiError(f"{field}: RSA keys must have at least {MIN_RSA_BITS} bits")
    else:
        raise PkiError(f"{field}: only EC (P-256/384/521) and RSA keys are supported")


def load_csr(pem: str) -> PublicKey:
    """The public key of a PKCS#10 request whose signature proves possession of the private key."""
    if len(pem) > MAX_PEM_CHARS:
        raise PkiError("csr: the PEM text is too large")
    try:
        request = x509.load_pem_x509_csr(pem.strip().encode())
    except ValueError as exc:
        raise PkiError(f"csr: not a PEM certificate signing request ({exc})") from exc
    if not request.is_signature_valid:
        raise PkiError("csr: the request's signature does not verify")
    public_key = request.public_key()
    check_key_strength(public_key, field="csr")
    return public_key  # type: ignore[return-value]


# --- building -----------------------------------------------------------------------------------


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _ca_name(common_name: str, unit: str) -> x509.Name:
    """``CN=<name>, OU=<unit>, O=Pilotboat``; the unit (an organisation id) keeps the subjects of
    same-named organisations of different deployments apart (trust stores are merged by subject)."""
    return x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64]),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit[:64]),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Pilotboat"),
    ])


def _ca_certificate(
    subject: x509.Name, public_key: PublicKey, issuer: x509.Certificate | None, signing_key: PrivateKey,
    validity: timedelta, path_length: int | None, now: datetime,
) -> x509.Certificate:
    ski = x509.SubjectKeyIdentifier.from_public_key(public_key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
    )
    authority = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value if issuer else ski
    builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(authority), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def generate_ca(organisation: str, unit: str | None = None, *, now: datetime | None = None) -> CertificateAuthority:
    """A fresh ECDSA P-256 root and an intermediate (path length 0) that signs device certificates.
    ``unit`` (default: a fresh UUID) goes into both subjects as OU."""
    now = now or datetime.now(UTC)
    unit = unit or str(uuid.uuid4())
    root_key, issuing_key = new_key(), new_key()
    root = _ca_certificate(
        _ca_name(f"{organisation} Root CA", unit), root_key.public_key(), None, root_key, ROOT_VALIDITY, 1, now
    )
    intermediate = _ca_certificate(
        _ca_name(f"{organisation} Device CA", unit), issuing_key.public_key(), root, root_key,
        INTERMEDIATE_VALIDITY, 0, now,
    )
    return CertificateAuthority(intermediate, issuing_key, (root,), root_key)


def import_ca(certificate_pem_text: str, private_key_pem: str, chain_pem_text: str = "", *, now: datetime | None = None) -> CertificateAuthority:
    """Check an organisation's own CA: a CA certificate that is valid now, its matching key, and
    optionally its parents, each signed by the next, up to a root."""
    now = now or datetime.now(UTC)
    certificates = load_certificates(certificate_pem_text, field="certificate")
    if len(certificates) != 1:
        raise PkiError("certificate: give exactly one certificate (the issuing CA); put its parents in 'chain'")
    certificate = certificates[0]
    key = load_private_key(private_key_pem)
    parents = tuple(load_certificates(chain_pem_text, field="chain")) if chain_pem_text.strip() else ()
    for position, candidate in enumerate((certificate, *parents)):
        where = "certificate" if position == 0 else f"chain[{position - 1}]"
        check_ca_certificate(candidate, now, field=where)
    if key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != (
        certificate.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    ):
        raise PkiError("private_key: the key does not belong to the certificate")
    child = certificate
    for position, parent in enumerate(parents):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError) as exc:
            raise PkiError(f"chain[{position}]: did not issue the certificate before it ({exc})") from exc
        child = parent
    return CertificateAuthority(certificate, key, parents)


def check_ca_certificate(certificate: x509.Certificate, now: datetime, *, field: str) -> None:
    """A certificate usable as a CA now: basic constraints say CA, and the validity period holds ``now``."""
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise PkiError(f"{field}: '{subject_text(certificate)}' is not a CA certificate (basic constraints CA:TRUE missing)")
    if certificate.not_valid_after_utc <= now:
        raise PkiError(f"{field}: '{subject_text(certificate)}' expired on {certificate.not_valid_after_utc.isoformat()}")
    if certificate.not_valid_before_utc > now + CLOCK_SKEW:
        raise PkiError(f"{field}: '{subject_text(certificate)}' is not valid before {certificate.not_valid_before_utc.isoformat()}")


def issue_device_certificate(
    ca: CertificateAuthority, public_key: PublicKey, common_name: str, guid: uuid.UUID, validity: timedelta,
    *, now: datetime | None = None,
) -> x509.Certificate:
    """A client-authentication certificate: CN = endpoint name, serial = the GUID, SAN ``urn:uuid:<GUID>``.

    The validity never reaches past the issuing CA's own expiry.
    """
    now = now or datetime.now(UTC)
    not_after = min(now + validity, ca.certificate.not_valid_after_utc)
    subject = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        x509.NameAttribute(NameOID.SERIAL_NUMBER, str(guid)),
    ])
    is_ec = isinstance(public_key, ec.EllipticCurvePublicKey)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.certificate.subject)
        .public_key(public_key)
        .serial_number(guid.int or 1)
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=not is_ec, data_encipherment=False,
                key_agreement=is_ec, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(guid.urn)]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    return builder.sign(ca.key, hashes.SHA256())


@dataclass(frozen=True)
class Revocation:
    serial: int
    revoked_at: datetime
    reason: x509.ReasonFlags | None = None


def build_crl(
    ca: CertificateAuthority, revocations: list[Revocation], number: int, *, now: datetime | None = None
) -> x509.CertificateRevocationList:
    now = now or datetime.now(UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.certificate.subject)
        .last_update(now)
        .next_update(now + CRL_VALIDITY)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    for revocation in revocations:
        entry = x509.RevokedCertificateBuilder().serial_number(revocation.serial).revocation_date(revocation.revoked_at)
        if revocation.reason is not None and revocation.reason != x509.ReasonFlags.unspecified:
            entry = entry.add_extension(x509.CRLReason(revocation.reason), critical=False)
        builder = builder.add_revoked_certificate(entry.build())
    return builder.sign(ca.key, hashes.SHA256())


# --- verifying ----------------------------------------------------------------------------------


def trust_store(anchors: list[x509.Certificate]) -> Store:
    return Store(anchors)


def verify_client_chain(
    store: Store, leaf: x509.Certificate, intermediates: list[x509.Certificate], *, now: datetime | None = None
) -> list[x509.Certificate]:
    """The validated path (leaf first, anchor last) of a client certificate, or ``PkiError``.

    RFC 5280 path validation by ``cryptography``, with extension checks relaxed to what device
    certificates from other CAs carry (no SAN required); the leaf must allow client authentication
    when it states an extended key usage.
    """
    builder = (
        PolicyBuilder()
        .store(store)
        .time(now or datetime.now(UTC))
        .max_chain_depth(8)
        .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ExtensionPolicy.permit_all())
    )
    try:
        path = builder.build_client_verifier().verify(leaf, intermediates).chain
    except VerificationError as exc:
        raise PkiError(f"client certificate not trusted: {exc}") from exc
    try:
        usage = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in usage and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in usage:
        raise PkiError("client certificate not trusted: its extended key usage does not allow client authentication")
    return list(path)


def device_guid(certificate: x509.Certificate) -> uuid.UUID | None:
    """The ``urn:uuid:`` SAN of a device certificate, when it has one."""
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for value in names.get_values_for_type(x509.UniformResourceIdentifier):
        if value.lower().startswith("urn:uuid:"):
            try:
                return uuid.UUID(value[9:])
            except ValueError:
                continue
    return None


def common_name(certificate: x509.Certificate) -> str | None:
    values = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(values[0].value) if values else None
