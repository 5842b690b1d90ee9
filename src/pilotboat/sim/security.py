"""DTLS credentials of a simulated device as its Security object holds them, and from files.

A Security instance (``/0/x``) carries what a client needs to reach its server over DTLS: the Security
Mode (``/0/x/2``: PSK or Certificate), the identity (``/0/x/3``: the PSK identity, or the device's
certificate in DER, a chain as DER certificates one after the other), the Server Public Key (``/0/x/4``:
the server's trust anchor in DER, several one after the other) and the Secret Key (``/0/x/5``: the PSK,
or the private key in DER). Fleets read one credential per device from a CSV file.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from pilotboat.dtls.client import ClientCredentials
from pilotboat.lwm2m import objects
from pilotboat.model.management_server import SecurityMode
from pilotboat.security import pki

#: Columns of a fleet credentials file; a row fills the PSK pair or the three certificate files.
CSV_COLUMNS = ("endpoint", "psk_identity", "psk_key", "certificate", "private_key", "server_certificate")
_DER_SEQUENCE = 0x30


def split_der(data: bytes) -> tuple[bytes, ...]:
    """DER certificates stored one after the other, as separate items; ``ValueError`` when ``data`` is
    not a sequence of whole DER SEQUENCEs."""
    items: list[bytes] = []
    offset = 0
    while offset < len(data):
        if data[offset] != _DER_SEQUENCE or offset + 2 > len(data):
            raise ValueError("not DER certificates")
        first = data[offset + 1]
        if first < 0x80:
            header, length = 2, first
        else:
            count = first & 0x7F
            if not 1 <= count <= 4 or offset + 2 + count > len(data):
                raise ValueError("not DER certificates")
            header, length = 2 + count, int.from_bytes(data[offset + 2:offset + 2 + count], "big")
        end = offset + header + length
        if end > len(data):
            raise ValueError("a truncated DER certificate")
        items.append(data[offset:end])
        offset = end
    return tuple(items)


def security_resources(credentials: ClientCredentials | None) -> dict[int, int | bytes]:
    """The Security Mode, identity, Server Public Key and Secret Key resources for ``credentials``
    (NoSec and empty values for none)."""
    if credentials is None:
        mode, identity, public_key, secret = SecurityMode.NOSEC, b"", b"", b""
    elif credentials.psk_identity is not None:
        mode, identity, public_key, secret = SecurityMode.PSK, credentials.psk_identity, b"", credentials.psk_key or b""
    else:
        mode = SecurityMode.CERTIFICATE
        identity, public_key = b"".join(credentials.certificate_chain), b"".join(credentials.trust_anchors)
        secret = credentials.private_key or b""
    return {
        objects.SECURITY_MODE: int(mode), objects.SECURITY_IDENTITY: identity,
        objects.SECURITY_SERVER_PUBLIC_KEY: public_key, objects.SECURITY_SECRET_KEY: secret,
    }


def credentials_from_security(mode: int | None, identity: bytes, server_public_key: bytes, secret_key: bytes
                              ) -> ClientCredentials:
    """The DTLS credentials a Security instance describes; ``ValueError`` for a mode the simulator has
    no DTLS for (NoSec, raw public keys, EST) or incomplete values."""
    if mode == SecurityMode.PSK:
        return ClientCredentials.psk(identity, secret_key)
    if mode == SecurityMode.CERTIFICATE:
        return ClientCredentials.certificate(split_der(identity), secret_key, split_der(server_public_key))
    name = SecurityMode(mode).name if mode in iter(SecurityMode) else str(mode)
    raise ValueError(f"a coaps:// server needs security mode PSK or certificate, not {name}")


def _pem_file(path: Path, what: str) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the {what} {path}: {exc}") from None


def load_credentials(*, psk_identity: str | None = None, psk_key: str | None = None,
                     certificate: Path | None = None, private_key: Path | None = None,
                     server_certificate: Path | None = None) -> ClientCredentials | None:
    """Credentials from text and PEM files: a PSK identity and key (hex), or a certificate (chain, leaf
    first), its private key and the server's trust anchor; None when nothing is given. ``ValueError``
    with the reason for an incomplete or unreadable set."""
    psk = psk_identity is not None or psk_key is not None
    files = certificate is not None or private_key is not None or server_certificate is not None
    if not psk and not files:
        return None
    if psk and files:
        raise ValueError("give a PSK (identity and key) or a certificate, not both")
    if psk:
        if not psk_identity or not psk_key:
            raise ValueError("a PSK needs both the identity and the key")
        try:
            key = bytes.fromhex(psk_key)
        except ValueError:
            raise ValueError("the PSK key must be hexadecimal") from None
        return ClientCredentials.psk(psk_identity.encode(), key)
    if certificate is None or private_key is None or server_certificate is None:
        raise ValueError("certificate mode needs the certificate, its private key and the server certificate")
    chain = pki.load_certificates(_pem_file(certificate, "certificate"), field="certificate")
    anchors = pki.load_certificates(_pem_file(server_certificate, "server certificate"), field="server_certificate")
    key_object = pki.load_private_key(_pem_file(private_key, "private key"), field="private_key")
    der = serialization.Encoding.DER
    return ClientCredentials.certificate(
        tuple(item.public_bytes(der) for item in chain),
        key_object.private_bytes(der, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        tuple(item.public_bytes(der) for item in anchors),
    )


def read_credentials_csv(path: Path) -> dict[str, ClientCredentials]:
    """One credential per endpoint from a CSV file with a header naming some of ``CSV_COLUMNS``:
    ``endpoint,psk_identity,psk_key`` (key in hex) or ``endpoint,certificate,private_key,server_certificate``
    (PEM files, relative to the CSV file's folder). ``ValueError`` naming the line for a bad row."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    reader = csv.DictReader(text.splitlines())
    unknown = set(reader.fieldnames or ()) - set(CSV_COLUMNS)
    if "endpoint" not in (reader.fieldnames or ()) or unknown:
        raise ValueError(f"{path}: the header names endpoint and some of {', '.join(CSV_COLUMNS[1:])}"
                         + (f" (unknown: {', '.join(sorted(unknown))})" if unknown else ""))
    found: dict[str, ClientCredentials] = {}
    for line, row in enumerate(reader, start=2):
        fields: Mapping[str, str] = {key: (value or "").strip() for key, value in row.items() if key}
        endpoint = fields.get("endpoint", "")
        try:
            if not endpoint:
                raise ValueError("no endpoint")
            if endpoint in found:
                raise ValueError(f"{endpoint} appears twice")
            files = {name: path.parent / fields[name] if fields.get(name) else None
                     for name in ("certificate", "private_key", "server_certificate")}
            credentials = load_credentials(psk_identity=fields.get("psk_identity") or None,
                                           psk_key=fields.get("psk_key") or None, **files)
            if credentials is None:
                raise ValueError("no credentials")
        except ValueError as exc:
            raise ValueError(f"{path}, line {line}: {exc}") from None
        found[endpoint] = credentials
    return found
